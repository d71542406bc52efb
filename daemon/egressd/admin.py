"""Admin operations behind the API: the pushed state over the baked one, changed one serialized,
atomic step at a time.

A change is a function that edits a copy of the pushed state. It is validated (every object, the
joined plan, ``max_destinations``), written to a temporary file, applied to the kernel, and only
then committed on disk and swapped in memory. A failure at any step leaves the kernel, the disk and
memory as they were."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from .baked import Baked
from .core.connections import Connections, parse_connections
from .core.policy import DEFAULT_POLICY_ID, PRODUCTS, Policy, parse_policy
from .core.workloads import WORKSPACE_ID_RE, Workload, parse_workload
from .engine import Engine, State
from .core.verdict import CompiledPolicy
from .errors import AlreadyExists, ApplyError, Conflict, FieldError, NotFound, ValidationError
from .statestore import Pushed, StateStore, StateWriteError

log = structlog.get_logger("egressd.admin")


def _doc_id(doc: object) -> str | None:
    pid = doc.get("network_policy_id") if isinstance(doc, dict) else None
    return pid if isinstance(pid, str) else None


def pause_gc_until_idle() -> None:
    """No cyclic garbage collection until the event loop's current step is over (for an API
    call: until its reply is written). A change of a policy of 100,000 destinations makes some
    10^6 objects; the collections they triggered walked every object of the daemon (cached IPs
    included), time and again: 0.3 s of a 1.4 s apply (bench/bench_apply.py). With collection
    paused, the first collection after it still walks every object made meanwhile (about 0.1 s
    for such a policy): it runs from the loop once the reply is out, not before it. Must be
    called from the event loop's thread, with the loop running."""
    if gc.isenabled():
        gc.disable()
        asyncio.get_running_loop().call_soon(gc.enable)


IMAGE, API = "image", "api"


@dataclass(frozen=True)
class Effective:
    """The state in force: every object with where it came from."""

    policies: dict[str, tuple[Policy, str]]
    bindings: dict[str, tuple[str, str]]
    workloads: dict[str, tuple[Workload, str]]
    connections: dict[str, Connections]

    def state(self) -> State:
        return State(
            {k: p for k, (p, _) in self.policies.items()},
            {k: b for k, (b, _) in self.bindings.items()},
            tuple(w for w, _ in self.workloads.values()),
            self.connections,
        )

    def policy_of(self, ws: str) -> str:
        return self.bindings.get(ws, (DEFAULT_POLICY_ID, IMAGE))[0]

    def workspaces(self) -> set[str]:
        return set(self.bindings) | {w.workspace_id for w, _ in self.workloads.values()} | set(self.connections)

    def destination_count(self, ws: str) -> int:
        pol = self.policies[self.policy_of(ws)][0]
        conns = self.connections.get(ws)
        return pol.destination_count() + (conns.destination_count() if conns else 0)


def check_workspace_id(ws: str) -> None:
    if not WORKSPACE_ID_RE.fullmatch(ws):
        raise ValidationError(FieldError("workspace_id", f"{ws[:80]!r} must be 1-64 characters of [A-Za-z0-9_.-]"))


class Admin:
    def __init__(self, engine: Engine, store: StateStore, baked: Baked) -> None:
        self.engine = engine
        self.store = store
        self.baked = baked
        self.max_destinations = baked.config.limits.max_destinations
        # Parsed pushed objects by id, with the very document they were parsed from: a change
        # re-parses only the documents it replaced.
        self._parsed: dict[tuple[str, str], tuple[dict, object]] = {}
        self.pushed = store.load()
        self.effective = self._merge(self.pushed)
        self._lock = asyncio.Lock()
        self.last_change: float | None = None
        self._retired: list[object] = []  # what the last change replaced, freed once its reply is out

    # --- merging -----------------------------------------------------------------------------
    def _parse(self, kind: str, key: str, doc: dict, parse: Callable[[dict], object], errors: list[FieldError]):
        hit = self._parsed.get((kind, key))
        if hit is not None and hit[0] is doc:
            return hit[1]
        try:
            obj = parse(doc)
        except ValidationError as e:
            errors.extend(FieldError(f"{kind}[{key}].{fe.path}", fe.message) for fe in e.errors)
            return None
        self._parsed[(kind, key)] = (doc, obj)
        return obj

    def _remember(self, kind: str, key: str, doc: dict, obj: object) -> None:
        self._parsed[(kind, key)] = (doc, obj)

    def _merge(self, pushed: Pushed, baked: Baked | None = None) -> Effective:
        baked = baked or self.baked
        errors: list[FieldError] = []
        policies = {k: (p, IMAGE) for k, p in baked.policies.items()}
        for pid, doc in pushed.policies.items():
            pol = self._parse("policies", pid, doc, parse_policy, errors)
            if pol is not None:
                policies[pid] = (pol, API)
        bindings = {k: (v, IMAGE) for k, v in baked.bindings.items()}
        bindings.update({k: (v, API) for k, v in pushed.bindings.items()})
        workloads = {w.workload_id: (w, IMAGE) for w in baked.workloads}
        for wid, doc in pushed.workloads.items():
            w = self._parse("workloads", wid, doc, parse_workload, errors)
            if w is not None:
                workloads[wid] = (w, API)
        connections = {}
        for ws, doc in pushed.connections.items():
            c = self._parse("connections", ws, doc, parse_connections, errors)
            if c is not None:
                connections[ws] = c
        for ws, (pid, _src) in bindings.items():
            if pid not in policies:
                errors.append(FieldError(f"workspaces[{ws}].network_policy_id", f"policy {pid!r} does not exist"))
        if errors:
            raise ValidationError(errors)
        return Effective(policies, bindings, workloads, connections)

    def _check_limits(self, old: Effective, new: Effective) -> None:
        """Refuse a change that puts a workspace it touches over max_destinations."""
        errors = []
        for ws in sorted(new.workspaces()):
            n = new.destination_count(ws)
            if n <= self.max_destinations:
                continue
            before = old.destination_count(ws) if ws in old.workspaces() else None
            same_policy = before is not None and old.policies[old.policy_of(ws)][0] == new.policies[new.policy_of(ws)][0]
            if before == n and same_policy and old.connections.get(ws) == new.connections.get(ws):
                continue  # untouched by this change (it was over the limit already, from the image)
            errors.append(
                FieldError(
                    f"workspaces[{ws}]",
                    f"would have {n} destinations (policy {new.policy_of(ws)} plus connections), "
                    f"over max_destinations={self.max_destinations}",
                )
            )
        if errors:
            raise ValidationError(errors)

    # --- the one way to change anything --------------------------------------------------------
    async def change(self, edit: Callable[[Pushed], object], *, caller: str, action: str, obj: str) -> object:
        async with self._lock:
            pause_gc_until_idle()
            hold = getattr(self.engine.nft, "hold_release", None)
            resume = hold() if hold is not None else None
            try:
                return self._change(edit, caller=caller, action=action, obj=obj)
            finally:
                self._release_later(resume)

    def _release_later(self, resume: Callable[[], None] | None) -> None:
        """Once the reply is out: free the state a change replaced (the old policies, plan and
        compiled forms: for a policy of 100,000 destinations, freeing them took 50-100 ms), and
        let libnftables give back the memory of a big command (``resume``, Nft.hold_release)."""
        retired = self.engine.take_retired()
        retired.append(self._retired)
        self._retired = []
        loop = asyncio.get_running_loop()
        loop.call_soon(retired.clear)
        if resume is not None:
            loop.call_soon(resume)

    def _change(self, edit: Callable[[Pushed], object], *, caller: str, action: str, obj: str) -> object:
        new = self.pushed.copy()
        result = edit(new)
        eff = self._merge(new)
        self._check_limits(self.effective, eff)
        old_gen = self.engine.generation
        failed = {"caller": caller, "action": action, "object": obj, "generation": old_gen}
        try:
            prepared = self.store.begin(new)
        except StateWriteError as e:
            log.error("api_change_failed", step="write_state", error=str(e), **failed)
            raise
        try:
            # The state file is durable before the kernel is touched (before_kernel), and is
            # written meanwhile: a failed write changes nothing.
            self.engine.apply(eff.state(), reason=f"{action} {obj}", before_kernel=prepared.wait, keep_retired=True)
            tmp = prepared.wait()
        except BaseException as e:
            prepared.abort()
            if isinstance(e, StateWriteError):
                log.error("api_change_failed", step="write_state", error=str(e), **failed)
            elif isinstance(e, ApplyError):
                log.error("api_change_failed", step="apply", error=str(e), **failed)
            raise
        try:
            self.store.commit(tmp)
        except BaseException as e:
            self.store.abort(tmp)
            log.error("api_change_failed", step="commit_state", error=str(e), **failed)
            self.engine.apply(self.effective.state(), reason="rollback")
            raise
        self._retired.append((self.pushed, self.effective))
        self.pushed, self.effective, self.last_change = new, eff, time.time()
        log.info("api_change", caller=caller, action=action, object=obj,
                 old_generation=old_gen, generation=self.engine.generation)
        return result

    async def reload_baked(self, baked: Baked) -> None:
        """SIGHUP: new baked objects under the same pushed ones, applied whole or not at all."""
        async with self._lock:
            for pid, pol in baked.policies.items():
                # An unchanged policy keeps its object: the engine then reuses its compiled form
                # and the workspace's cached IPs as they are, instead of checking each one again.
                same = self.baked.policies.get(pid)
                if same is not None and same == pol:
                    baked.policies[pid] = same
            eff = self._merge(self.pushed, baked)
            self.engine.apply(eff.state(), reason="sighup")
            self.baked, self.effective = baked, eff
            self.max_destinations = baked.config.limits.max_destinations

    def start(self) -> int:
        return self.engine.apply(self.effective.state(), reason="start")

    # --- policies ----------------------------------------------------------------------------
    def get_policy(self, pid: str) -> tuple[Policy, str]:
        try:
            return self.effective.policies[pid]
        except KeyError:
            raise NotFound(f"network policy {pid!r} does not exist") from None

    async def put_policy(self, doc: object, *, caller: str, create: bool = False, path_id: str | None = None) -> Policy:
        doc = _strip(doc, "source")
        if path_id is not None and isinstance(doc, dict):
            body_id = doc.setdefault("network_policy_id", path_id)
            if body_id != path_id:
                raise ValidationError(FieldError("network_policy_id", f"{body_id!r} does not match the id in the path ({path_id!r})"))
        prev = self.effective.policies.get(path_id if path_id is not None else _doc_id(doc))
        pause_gc_until_idle()
        pol = parse_policy(doc, previous=prev[0] if prev else None)
        pid = pol.network_policy_id
        if create and pid in self.effective.policies:
            raise AlreadyExists(f"network policy {pid!r} already exists")

        def edit(p: Pushed) -> Policy:
            p.policies[pid] = doc = pol.to_dict()
            self._remember("policies", pid, doc, pol)
            return pol

        await self.change(edit, caller=caller, action="create_policy" if create else "put_policy", obj=pid)
        return pol

    async def delete_policy(self, pid: str, *, caller: str) -> None:
        if pid == DEFAULT_POLICY_ID:
            raise Conflict("default-policy cannot be deleted (it can be edited)")
        if pid not in self.effective.policies:
            raise NotFound(f"network policy {pid!r} does not exist")
        if pid not in self.pushed.policies:
            raise Conflict(f"network policy {pid!r} comes from the node image ({self.baked.config.policies.dir}); remove it there")
        if pid not in self.baked.policies:
            bound = sorted(ws for ws, (b, _) in self.effective.bindings.items() if b == pid)
            if bound:
                raise Conflict(f"network policy {pid!r} is bound to workspaces {', '.join(bound)}; assign them another policy first")

        def edit(p: Pushed) -> None:
            del p.policies[pid]

        await self.change(edit, caller=caller, action="delete_policy", obj=pid)

    # --- workspaces --------------------------------------------------------------------------
    def get_binding(self, ws: str) -> dict:
        check_workspace_id(ws)
        return {"workspace_id": ws, "network_policy_id": self.effective.policy_of(ws)}

    async def put_binding(self, ws: str, doc: object, *, caller: str) -> dict:
        check_workspace_id(ws)
        if not isinstance(doc, dict):
            raise ValidationError(FieldError("", "the body must be an object"))
        extra = set(doc) - {"workspace_id", "network_policy_id"}
        if extra:
            raise ValidationError([FieldError(k, "unknown key") for k in sorted(extra)])
        if doc.get("workspace_id", ws) != ws:
            raise ValidationError(FieldError("workspace_id", f"{doc['workspace_id']!r} does not match the path ({ws!r})"))
        pid = doc.get("network_policy_id")
        if not isinstance(pid, str) or pid not in self.effective.policies:
            raise ValidationError(FieldError("network_policy_id", f"policy {pid!r} does not exist"))

        def edit(p: Pushed) -> None:
            p.bindings[ws] = pid

        await self.change(edit, caller=caller, action="assign_policy", obj=f"workspace {ws} -> {pid}")
        return self.get_binding(ws)

    def list_workspaces(self) -> list[dict]:
        eff = self.effective
        plan = self.engine.plan
        out = []
        for ws in sorted(eff.workspaces()):
            pid = eff.policy_of(ws)
            src = eff.bindings.get(ws, (pid, "default"))[1]
            out.append({
                "workspace_id": ws,
                "network_policy_id": pid,
                "binding_source": src,
                "restriction_mode": eff.policies[pid][0].restriction_mode.value,
                "workloads": sorted(w.workload_id for w, _ in eff.workloads.values() if w.workspace_id == ws),
                "destination_count": eff.destination_count(ws),
                "allowed_ips": self.engine.cache.size(ws) if plan else 0,
            })
        return out

    # --- workloads ---------------------------------------------------------------------------
    def get_workload(self, wid: str) -> tuple[Workload, str]:
        try:
            return self.effective.workloads[wid]
        except KeyError:
            raise NotFound(f"workload {wid!r} does not exist") from None

    async def put_workload(self, wid: str, doc: object, *, caller: str) -> Workload:
        doc = _strip(doc, "source")
        if isinstance(doc, dict):
            body_id = doc.setdefault("workload_id", wid)
            if body_id != wid:
                raise ValidationError(FieldError("workload_id", f"{body_id!r} does not match the id in the path ({wid!r})"))
        w = parse_workload(doc)

        def edit(p: Pushed) -> Workload:
            p.workloads[wid] = doc = w.to_dict()
            self._remember("workloads", wid, doc, w)
            return w

        await self.change(edit, caller=caller, action="put_workload", obj=wid)
        return w

    async def delete_workload(self, wid: str, *, caller: str) -> None:
        if wid not in self.effective.workloads:
            raise NotFound(f"workload {wid!r} does not exist")
        if wid not in self.pushed.workloads:
            raise Conflict(f"workload {wid!r} comes from the config file; remove it there")

        def edit(p: Pushed) -> None:
            del p.workloads[wid]

        await self.change(edit, caller=caller, action="delete_workload", obj=wid)

    # --- connections -------------------------------------------------------------------------
    def get_connections(self, ws: str) -> dict:
        check_workspace_id(ws)
        c = self.effective.connections.get(ws, Connections())
        return {"workspace_id": ws, **c.to_dict()}

    async def put_connections(self, ws: str, doc: object, *, caller: str) -> dict:
        check_workspace_id(ws)
        if isinstance(doc, dict) and doc.get("workspace_id", ws) != ws:
            raise ValidationError(FieldError("workspace_id", f"{doc['workspace_id']!r} does not match the path ({ws!r})"))
        conns = parse_connections(doc)

        def edit(p: Pushed) -> None:
            if conns.destination_count():
                p.connections[ws] = doc = conns.to_dict()
                self._remember("connections", ws, doc, conns)
            else:
                p.connections.pop(ws, None)

        await self.change(edit, caller=caller, action="put_connections", obj=ws)
        return self.get_connections(ws)

    # --- verify ------------------------------------------------------------------------------
    def verify(self, doc: object) -> dict:
        if not isinstance(doc, dict):
            raise ValidationError(FieldError("", "the body must be an object"))
        ws, product, dest = doc.get("workspace_id"), doc.get("product", "GENERAL_COMPUTE"), doc.get("destination")
        errors = []
        if not isinstance(ws, str) or not WORKSPACE_ID_RE.fullmatch(ws):
            errors.append(FieldError("workspace_id", "is required: 1-64 characters of [A-Za-z0-9_.-]"))
        if product not in PRODUCTS:
            errors.append(FieldError("product", f"{product!r} must be one of {', '.join(PRODUCTS)}"))
        if not isinstance(dest, str) or not dest.strip():
            errors.append(FieldError("destination", "is required: a DNS name, an IP address or a URL"))
        if errors:
            raise ValidationError(errors)
        plan = self.engine.plan
        wp = plan.workspaces.get(ws) if plan else None
        if wp is None:  # a workspace with no workloads yet: decide with what it would get
            pid = self.effective.policy_of(ws)
            conns = self.effective.connections.get(ws)
            compiled = CompiledPolicy(self.effective.policies[pid][0], *(conns.extras() if conns else ((), ())))
        else:
            compiled = wp.compiled
        host = _destination_host(dest.strip())
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is None:
            d = compiled.decide_name(host, product)
        else:
            d = compiled.decide_ip(ip, product)
            if d.verdict != "ALLOW" and wp is not None and wp.restricted:
                hit = next((e for e in self.engine.cache.entries(ws, self.engine.clock()) if e.ip == str(ip)), None)
                if hit is not None:
                    left = int(hit.expires - self.engine.clock())
                    return _verdict_doc(ws, product, dest, "ALLOW", d.network_policy_id,
                                        f"resolved from {hit.name} through the egressd DNS shim; open for {left} s more",
                                        hit.name, "IP")
        return _verdict_doc(ws, product, dest, d.verdict.value, d.network_policy_id, d.reason, d.matched, d.destination_type)


def _verdict_doc(ws, product, dest, verdict, pid, reason, matched, dtype) -> dict:
    return {"verdict": verdict, "network_policy_id": pid, "reason": reason, "matched": matched,
            "destination_type": dtype, "workspace_id": ws, "product": product, "destination": dest}


def _destination_host(dest: str) -> str:
    if "://" in dest:
        host = urlsplit(dest).hostname
        if not host:
            raise ValidationError(FieldError("destination", f"{dest[:80]!r} has no host"))
        return host
    if dest.startswith("[") and "]" in dest:
        return dest[1:dest.index("]")]
    return dest


def _strip(doc: object, *keys: str) -> object:
    if isinstance(doc, dict):
        return {k: v for k, v in doc.items() if k not in keys}
    return doc

