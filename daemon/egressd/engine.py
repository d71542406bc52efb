"""The engine: the one place that owns the live state, the plan, the kernel table and the IP cache.

    policies, bindings, workloads ──build_plan──▶ Plan ──render_table──▶ nft transaction
                                                   │
    DNS shim ── classify(src, query) ──────────────┤  verdict per (workload, name)
             ── program(target, answer IPs) ──▶ IpCache ──▶ add element … (before the answer leaves)

A change is validated and rendered first, applied as one transaction, and only then swapped in, so a
change that fails leaves the kernel and the in-memory state as they were."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import structlog

from .core.addrfilter import FilterCounters, SpecialAddressRefused
from .core.addrfilter import split as split_special
from .core.config import Config
from .core.connections import Connections
from .core.dnsmsg import EDE_OTHER, REFUSED, Query
from .core.ipcache import EXPIRE_STEP, GRACE, IpCache
from .core.plan import Plan, build_plan
from .core.policy import Policy
from .core.ratelimit import TokenBuckets, WarnLimiter
from .core.ruleset import (
    GENERATION_PREFIX,
    RenderOptions,
    delete_table,
    program_elements,
    render_table,
    replace_table,
    same_skeleton,
    set_grace,
    table_delta,
    withdraw_elements,
)
from .core.verdict import CompiledPolicy, Decision, Verdict
from .core.workloads import Workload
from .core.nfmsg import Element
from .errors import ApplyError
from .libnft import Nft, malloc_trim
from .nftset import NftSetError, NftSetWriter
from .shim import ShimAction

log = structlog.get_logger("egressd.engine")


def kernel_dns_budget(qps: int | float, burst: int | float) -> tuple[int, int]:
    """The kernel's per-source UDP budget in front of the shim: 4x the shim's per-workload query
    limit (burst 2x), so the shim's REFUSED answers are what a workload a little over its limit
    sees, and only a flood the shim could not absorb is dropped unanswered. (0, 0): no limit."""
    if qps <= 0 or burst < 1:
        return 0, 0
    return int(4 * qps), int(2 * burst)

_PROBE_PRODUCT = "GENERAL_COMPUTE"


@dataclass(frozen=True)
class State:
    policies: Mapping[str, Policy]
    bindings: Mapping[str, str]
    workloads: tuple[Workload, ...]
    connections: Mapping[str, Connections] = field(default_factory=dict)


#: libnftables' time per element a delta adds or deletes, relative to its time per element of a
#: new table: it reads an interval set's existing elements back first (a refill of 50,000 ranges
#: took 650-820 ms, a new table with them 430-590 ms). A delta that would change more elements
#: than a new table holds, divided by this, replaces the table instead.
REFILL_COST = 1.4


def _table_elements(plan: Plan, cache: IpCache) -> int:
    """About how many elements a whole table of the plan holds: ranges, cached IPs, workloads."""
    n = 2 * len(plan.workloads)
    for ws, wp in plan.workspaces.items():
        if wp.restricted:
            cp = wp.compiled
            n += cache.size(ws) + len(cp.allowed_ranges_v4) + len(cp.allowed_ranges_v6)
            n += len(cp.blocked_ranges_v4) + len(cp.blocked_ranges_v6)
    return n


#: The most IPs one delete transaction of an expiry round takes: its messages (about 50 bytes an
#: IP) must fit the netlink socket's buffer (nftset: 4 MiB). Rounds in steps (EXPIRE_STEP) stay
#: far below it; a whole round at once (expire()) is split.
DELETE_BATCH = 20_000


class StaleGeneration(ApplyError):
    """A policy apply replaced the sets between an answer's check and its programming."""


@dataclass
class _Pending:
    """One answer waiting for the next batch of set elements."""

    generation: int
    workspace_id: str
    sets: dict[str, list[Element]]
    future: asyncio.Future


@dataclass(frozen=True)
class Target:
    """What the shim hands back with an allowed answer: whose sets get its IPs."""

    workspace_id: str
    name: str


class Engine:
    def __init__(
        self,
        cfg: Config,
        nft: Nft,
        *,
        clock: Callable[[], float] = time.monotonic,
        node_addresses: Iterable[str] = (),
        on_denial: Callable[[Workload, Decision, str], None] | None = None,
        nftset: NftSetWriter | None = None,
    ) -> None:
        self.cfg = cfg
        self.nft = nft
        # The raw netlink writer of set elements (None: each answer is one libnftables command).
        self.nftset = nftset
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self.clock = clock
        self.node_addresses = {ipaddress.ip_address(a) for a in node_addresses}
        self.on_denial = on_denial
        self.cache = IpCache()
        self.state: State | None = None
        self.plan: Plan | None = None
        self.generation = 0
        self._opts: RenderOptions | None = None  # those of the table in the kernel
        self.last_apply_scope = ""  # "table" (replaced whole) or "delta" (workload elements only)
        self.last_apply_ms = 0.0
        self.last_apply_wall: float | None = None  # time.time() of the last ruleset swap
        # set_transactions: answer batches and expiry deletes sent to the kernel, refused ones
        # included. Each one gives up a kernel collection walk that is running (README, Operations).
        # expired_deleted: IPs an expiry round deleted from the kernel (expire_delete_errors: the
        # transactions of them refused).
        self.counters = {"programmed_ips": 0, "program_errors": 0, "set_transactions": 0,
                         "expired_deleted": 0, "expire_delete_errors": 0}
        self._delete_warns = WarnLimiter(60.0)
        # The per-workload DNS query rate limit (buckets by workload id) and its rejections by workspace.
        self.dns_limit = TokenBuckets(cfg.dns.rate_limit_qps, cfg.dns.rate_limit_burst)
        self.dns_rate_limited: Counter[str] = Counter()
        # Answer addresses kept out of the allow sets: special ones by reason, and those over the cap.
        self.answer_filter = FilterCounters()
        # Compiled policies by the identity of the (immutable) Policy they were built from and
        # the extras (from connections) they were built with.
        self._compiled: dict[tuple, tuple[Policy, CompiledPolicy]] = {}
        self._retired: list[object] = []  # what applies replaced, not yet freed (see take_retired)
        self._gate: Callable[[], object] | None = None  # apply()'s before_kernel, until called

    def _compile(self, policy: Policy, extra_names: tuple = (), extra_networks: tuple = ()) -> CompiledPolicy:
        """The compiled form of a policy (with a workspace's connections as extras), built once
        while the policy object and the extras stay the same: the same object is what lets a
        workspace keep its cached IPs, and a change of workloads go in as a delta."""
        key = (id(policy), extra_names, extra_networks)
        hit = self._compiled.get(key)
        if hit is not None and hit[0] is policy:
            return hit[1]
        cp = CompiledPolicy(policy, extra_names=extra_names, extra_networks=extra_networks)
        self._compiled[key] = (policy, cp)
        return cp

    def _prune_compiled(self, state: "State", plan: Plan) -> None:
        """Keep the compiled form of every policy of the state, and those with extras in use."""
        live = {id(p) for p in state.policies.values()}
        used = {id(ws.compiled) for ws in plan.workspaces.values()}
        for key in [k for k, (_p, cp) in self._compiled.items()
                    if k[0] not in live or (k[1:] != ((), ()) and id(cp) not in used)]:
            self._retired.append(self._compiled.pop(key))

    def take_retired(self) -> list[object]:
        """What an apply(keep_retired=True) replaced (old plans, caches, compiled policies), for
        the caller to free when it suits it (the admin: once the API reply is out). Whatever is
        not taken is freed at the start of the next apply."""
        out, self._retired = self._retired, []
        return out

    # --- the ruleset -------------------------------------------------------------------------
    def adopt(self) -> int:
        """Take over the egressd table left by a previous run: its generation and its live
        timeout-set entries. Returns the number of entries adopted.

        The sets are listed without their elements (terse); each dynamic set's elements are then
        read by a netlink dump when the raw writer is there. With the whole table as JSON, a
        restart adopting ~138,000 IPs left the daemon at 203 MB RSS; by dump, ~120,000 left it at
        108-116 MB (bench/bench_memory.py)."""
        objs = self.nft.list_json("sets table inet egressd", terse=self.nftset is not None)
        now = self.clock()
        adopted = 0
        for o in objs:
            s = o.get("set")
            # libnftables' JSON omits table comments; the generation rides on a set's comment too.
            comment = (s or {}).get("comment", "")
            if comment.startswith(GENERATION_PREFIX):
                try:
                    self.generation = max(self.generation, int(comment.split("=", 1)[1]))
                except ValueError:
                    pass
            if not s or not s["name"].startswith("ws_") or s["name"][-5:] not in ("_dyn4", "_dyn6"):
                continue
            ws = s["name"][3:-5]
            # The cache holds an IP until the kernel's expiry less the grace the set was written
            # with (none in a table of an egressd before explicit deletes), so the delete at the
            # cache's expiry finds the element live. One past that is left to the kernel.
            grace = set_grace(comment)
            for ip, name, expires_s in self._live_elements(s):
                if expires_s > grace:
                    self.cache.adopt(ws, ip, name, now + expires_s - grace)
                    adopted += 1
        del objs
        malloc_trim()
        return adopted

    def _live_elements(self, s: dict) -> Iterator[tuple[str, str, float]]:
        """(ip, comment, seconds left) of each timeout element of a listed set: by netlink dump
        when the raw writer is there, else (or if the dump fails) from a libnftables listing."""
        if self.nftset is not None:
            try:
                dumped = self.nftset.dump(s["name"])
            except NftSetError as e:
                log.warning("adopt_dump_failed", set=s["name"], error=str(e), fallback="libnftables listing")
                listed = self.nft.list_json(f"set inet egressd {s['name']}")
                s = next((o["set"] for o in listed if "set" in o), s)
            else:
                yield from ((d.ip, d.comment, d.expires_ms / 1000) for d in dumped if d.expires_ms is not None)
                return
        for el in s.get("elem", []):
            e = el.get("elem") if isinstance(el, dict) else None
            if e and "expires" in e:
                yield str(e["val"]), str(e.get("comment", "")), float(e["expires"])

    def apply(self, state: State, *, reason: str, before_kernel: Callable[[], object] | None = None,
              keep_retired: bool = False) -> int:
        """Validate, render and apply a new state as one transaction. Raises ValidationError or
        ApplyError, changing nothing; on success returns the new generation. ``before_kernel``
        is called (once) right before the first kernel command: what it raises propagates, the
        kernel untouched (the admin waits there for its state file to be durable).
        ``keep_retired``: hold what the apply replaced for take_retired() instead of freeing it
        here (a start that adopted 115,000 cached IPs would otherwise keep their old cache)."""
        t0 = time.perf_counter()
        self._gate = before_kernel
        self._retired.clear()
        plan = build_plan(
            state.policies,
            state.bindings,
            state.workloads,
            {ws: c.extras() for ws, c in state.connections.items() if c.destination_count()},
            compile=self._compile,
        )
        cache = self._cache_for(plan)
        gen = self.generation + 1
        opts = RenderOptions(
            gen,
            self.cfg.dns.listen_port,
            self.cfg.enforcement.deny_action,
            self.cfg.enforcement.nflog_group,
            self.cfg.enforcement.log_rate,
            *kernel_dns_budget(self.cfg.dns.rate_limit_qps, self.cfg.dns.rate_limit_burst),
        )
        t1 = time.perf_counter()
        scope = "delta" if self._delta(plan, opts, cache) else "table"
        if scope == "table":
            now = self.clock()
            text = render_table(plan, {ws: list(cache.entries(ws, now)) for ws in cache.workspaces()}, now, opts)
            t1 = time.perf_counter()
            self._kernel(replace_table(text))
            del text
        nft_ms = (time.perf_counter() - t1) * 1000
        old = self.generation
        if scope == "delta":
            self._carry_pending(old, gen, plan, cache)
        self._retired.append((self.state, self.plan, self.cache))
        self.state, self.plan, self.cache, self.generation, self._opts = state, plan, cache, gen, opts
        self.last_apply_scope = scope
        self._prune_compiled(state, plan)
        if not keep_retired:
            self._retired.clear()
        self.last_apply_ms = (time.perf_counter() - t0) * 1000
        self.last_apply_wall = time.time()
        log.info(
            "ruleset_applied",
            reason=reason,
            old_generation=old,
            generation=gen,
            duration_ms=round(self.last_apply_ms, 2),
            nft_ms=round(nft_ms, 2),
            scope=scope,
            workspaces=len(plan.workspaces),
            workloads=len(plan.workloads),
        )
        return gen

    def _delta(self, plan: Plan, opts: RenderOptions, cache: IpCache) -> bool:
        """Apply the change as a delta when the table keeps its objects (the same restricted
        workspaces, the same options): the elements that differ, and the generation. True when
        that went in; False when the whole table must be replaced (the first apply, another
        skeleton, or a delta the kernel refused, say because the table was edited by hand).
        A workload PUT on a node with 100,000 cached IPs re-rendered and re-added every one of
        them, and held the event loop (DNS included) for 2.4-3.0 s; an edit of a policy of
        100,000 destinations re-added its 50,000 ranges (~0.5 s in libnftables)."""
        if self.plan is None or self._opts is None:
            return False
        if replace(opts, generation=0) != replace(self._opts, generation=0) or not same_skeleton(self.plan, plan):
            return False
        text = table_delta(self.plan, plan, opts.generation, self._withdrawn(plan, cache),
                           max_changes=max(int(_table_elements(plan, cache) / REFILL_COST), 10_000))
        if text is None:
            return False
        try:
            self._kernel(text)
        except ApplyError as e:
            log.warning("delta_apply_failed", error=str(e), fallback="whole table")
            return False
        return True

    def _kernel(self, text: str) -> None:
        """nft.run of an apply's transaction, after its before_kernel gate (once)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate()
        self.nft.run(text)

    def _carry_pending(self, old: int, gen: int, plan: Plan, cache: IpCache) -> None:
        """After a delta: answers whose elements wait for this turn's batch. A whole table renders
        them from the cache (it holds them); a delta leaves the sets in place, so each such batch
        still goes in, in the new generation, when the new cache still holds all of its IPs. One
        whose IPs were withdrawn fails (StaleGeneration, as after a whole table), and its IPs
        leave the new cache: the kernel may lack them, and the next answer programs them."""
        for p in self._pending:
            if p.generation != old:
                continue
            wp = plan.workspaces.get(p.workspace_id)
            keep = cache.ips(p.workspace_id)
            ips = [el.ip for els in p.sets.values() for el in els]
            if wp is not None and wp.restricted and all(ip in keep for ip in ips):
                p.generation = gen
            else:
                cache.forget(p.workspace_id, ips)

    def _withdrawn(self, plan: Plan, cache: IpCache) -> dict[str, list[str]]:
        """Workspace -> the cached IPs the new plan's cache no longer holds, for each workspace
        whose compiled policy changed (the names behind them are no longer allowed)."""
        out: dict[str, list[str]] = {}
        assert self.plan is not None
        for ws, wp in plan.workspaces.items():
            was = self.plan.workspaces.get(ws)
            if was is None or was.compiled is wp.compiled or not wp.restricted:
                continue
            keep = cache.ips(ws)
            gone = [ip for ip in self.cache.ips(ws) if ip not in keep]
            if gone:
                out[ws] = gone
        return out

    def _cache_for(self, plan: Plan) -> IpCache:
        """The IP cache as the new plan allows it: names no longer allowed are withdrawn."""
        cache = IpCache()
        now = self.clock()
        before = self.plan.workspaces if self.plan is not None else {}
        for ws in self.cache.workspaces():
            wp = plan.workspaces.get(ws)
            if wp is None or not wp.restricted:
                continue
            was = before.get(ws)
            if was is not None and was.compiled is wp.compiled:
                # The same compiled policy decides the same: every entry stays, and the new cache
                # takes the workspace's table as it is (no copy of 100,000 entries per apply).
                cache.share(self.cache, ws)
                continue
            for e in self.cache.entries(ws, now):
                if wp.compiled.decide_name(e.name, _PROBE_PRODUCT).verdict == Verdict.ALLOW:
                    cache.adopt(ws, e.ip, e.name, e.expires)
        return cache

    def kernel_counters(self) -> dict[str, int]:
        """Packets of every named counter of the table, from one listing (empty while no table is
        loaded): ws_<id>_suppressed (the log rate limit), dns_flood_drops, antispoof_drops."""
        out: dict[str, int] = {}
        for o in self.nft.list_json("counters table inet egressd"):
            c = o.get("counter")
            if c and "name" in c:
                out[c["name"]] = int(c.get("packets", 0))
        return out

    def uninstall(self) -> None:
        self.nft.run(delete_table())

    def expire(self) -> int:
        """One whole expiry round (see expire_steps). Returns the number of IPs dropped."""
        dropped = 0
        for dropped in self.expire_steps(chunk=0):
            pass
        return dropped

    def expire_steps(self, chunk: int = EXPIRE_STEP) -> Iterator[int]:
        """An expiry round a step at a time (see IpCache.expire_steps), for the event loop's
        housekeeping: the IPs each step drops leave the kernel's sets before it yields, while
        their elements are still live (the kernel holds them GRACE seconds longer), so the
        commit frees them."""
        gone: list[tuple[str, str]] = []
        steps = self.cache.expire_steps(self.clock(), chunk, gone)
        try:
            for dropped in steps:
                if gone:
                    self._delete_expired(gone)
                    gone.clear()
                yield dropped
        finally:
            steps.close()

    def _delete_expired(self, gone: list[tuple[str, str]]) -> None:
        """Delete from the kernel the IPs an expiry round dropped, each unless the live cache holds
        it (again): an answer recorded it since, or the round ran on a cache a policy apply has
        replaced, whose own round deletes it when it is due there. No await comes between the
        drop and the delete, so an answer's add is never overtaken. A failure is logged and
        counted; the kernel's timeout then removes the elements GRACE seconds later."""
        cache, plan = self.cache, self.plan
        sets: dict[str, list[str]] = {}
        n = 0
        at: str | None = None  # the workspace of the IPs before (a round hands them over in runs)
        held: Collection[str] = ()
        v4 = v6 = None
        for ws, ip in gone:
            if ws != at:
                at, held = ws, cache.ips(ws)
                wp = plan.workspaces.get(ws) if plan is not None else None
                if wp is None or not wp.restricted:
                    v4 = v6 = None  # no sets of its own any more: the table replaced them
                else:
                    v4 = sets.setdefault(f"{wp.key}_dyn4", [])
                    v6 = sets.setdefault(f"{wp.key}_dyn6", [])
            if v4 is None or ip in held:
                continue
            (v6 if ":" in ip else v4).append(ip)  # type: ignore[union-attr]
            n += 1
            if n == DELETE_BATCH:
                self._delete_now(sets, n)
                sets, n, at = {}, 0, None
        if n:
            self._delete_now(sets, n)

    def _delete_now(self, sets: dict[str, list[str]], n: int) -> None:
        self.counters["set_transactions"] += 1
        try:
            if self.nftset is not None:
                self.nftset.delete(sets)
            else:
                self.nft.run(withdraw_elements(sets))
        except Exception as e:  # noqa: BLE001 - the kernel's timeout is the fallback
            self.counters["expire_delete_errors"] += 1
            suppressed = self._delete_warns.due("expired_delete_failed", self.clock())
            if suppressed is not None:
                log.warning("expired_delete_failed", ips=n, error=str(e),
                            fallback=f"the kernel's timeout, {GRACE} s later",
                            failures=self.counters["expire_delete_errors"], suppressed_warnings=suppressed)
        else:
            self.counters["expired_deleted"] += n

    # --- the DNS path ------------------------------------------------------------------------
    def workload_of(self, src: str) -> Workload | None:
        return self.plan.index.lookup(src) if self.plan else None

    def _is_node(self, src: str) -> bool:
        try:
            ip = ipaddress.ip_address(src)
        except ValueError:
            return False
        return ip.is_loopback or ip in self.node_addresses

    def admit(self, src: str) -> ShimAction | None:
        """The per-workload DNS rate limit: None if a query of ``src`` may go on, else the
        REFUSED answer to give it. Every query passes here, answer-cache hits too."""
        limit = self.dns_limit
        if not limit.enabled:
            return None  # rate_limit_qps = 0: nothing to look up (every answer-cache hit asks)
        wl = self.workload_of(src)
        if wl is not None and not limit.allow(wl.workload_id, self.clock()):
            # Before any policy work: a flood costs a bucket lookup, no upstream query, no event.
            self.dns_rate_limited[wl.workspace_id] += 1
            text = f"egressd: rate limited (workload {wl.workload_id} over {self.cfg.dns.rate_limit_qps} queries/s)"
            return ShimAction("deny", rcode=REFUSED, ede_text=text, ede_code=EDE_OTHER)
        return None

    def classify(self, src: str, q: Query) -> ShimAction:
        limited = self.admit(src)
        if limited is not None:
            return limited
        wl = self.workload_of(src)
        if wl is None:
            # The node itself is unrestricted; anybody else gets no answer (never an open resolver).
            return ShimAction("forward") if self._is_node(src) else ShimAction("ignore")
        wp = self.plan.workspace_of(wl)
        if not wp.restricted:
            return ShimAction("forward")
        d = wp.compiled.decide_name(q.qname, wl.product)
        if d.verdict == Verdict.ALLOW:
            return ShimAction("forward", target=Target(wp.workspace_id, q.qname))
        self._denied(wl, d, q)
        if d.verdict == Verdict.LOG_ONLY_DENIAL:
            return ShimAction("forward")
        text = f"egressd: {q.qname} blocked by network policy {d.network_policy_id} ({d.reason})"
        return ShimAction("deny", rcode=self.cfg.dns.deny_rcode_value, ede_text=text)

    def _denied(self, wl: Workload, d: Decision, q: Query) -> None:
        if self.on_denial is not None:
            self.on_denial(wl, d, q.qname)

    def policy_of(self, workspace_id: str) -> str | None:
        wp = self.plan.workspaces.get(workspace_id) if self.plan else None
        return wp.policy.network_policy_id if wp else None

    async def program(self, target: object, addrs: tuple[tuple[str, int], ...]) -> None:
        """Put an allowed answer's IPs into its workspace's sets. Returns once the kernel has them."""
        fut = self.program_nowait(target, addrs)
        if fut is not None:
            await fut

    def program_nowait(self, target: object, addrs: tuple[tuple[str, int], ...]) -> asyncio.Future | None:
        """program() without a coroutine (the shim's callback; a task per answer cost the
        unique-name path a few percent): None when there is nothing to wait for, else a future
        that completes once the kernel has the IPs, or with the error that kept them out.
        Raises at once what is known at once (SpecialAddressRefused, libnftables errors)."""
        assert isinstance(target, Target)
        wp = self.plan.workspaces.get(target.workspace_id) if self.plan else None
        if wp is None or not wp.restricted:
            return None
        # Special addresses (loopback, link-local, the node's own...) never open anything.
        kept, filtered = split_special(addrs, self.node_addresses)
        af = self.answer_filter
        if filtered:
            af.filtered.update(reason for _, reason in filtered)
            refuse = self.cfg.dns.special_addresses == "refuse"
            suppressed = af.warn_due(target.workspace_id, self.clock())
            if suppressed is not None:
                log.warning("dns_special_addresses_filtered", workspace_id=target.workspace_id,
                            name=target.name, action=self.cfg.dns.special_addresses,
                            addresses=[f"{ip} ({why})" for ip, why in filtered[:8]],
                            filtered=len(filtered), suppressed_warnings=suppressed)
            if refuse:
                af.refused_answers += 1
                raise SpecialAddressRefused(f"{target.name}: the answer holds special addresses")
        # The cap keeps the first addresses in answer order.
        cap = self.cfg.dns.max_ips_per_name
        if len(kept) > cap:
            af.capped += len(kept) - cap
            kept = kept[:cap]
        todo = self.cache.record(target.workspace_id, target.name, kept, self.cfg.dns.min_ttl, self.clock())
        if not todo:
            return None
        gen = self.generation
        if self.nftset is None:
            try:
                self.counters["set_transactions"] += 1
                self.nft.run(program_elements(wp, todo, target.name))
            except Exception:
                self._program_failed(gen, target.workspace_id, todo)
                raise
            self.counters["programmed_ips"] += len(todo)
            return None
        fut = self._batched(gen, wp.workspace_id, wp.key, todo, target.name)
        # Registered before any waiter's callback, so the books are kept before it resumes.
        fut.add_done_callback(partial(self._programmed, gen, target.workspace_id, todo))
        return fut

    def _programmed(self, gen: int, workspace_id: str, todo: list[tuple[str, int]], fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        if fut.exception() is None:
            self.counters["programmed_ips"] += len(todo)
        else:
            self._program_failed(gen, workspace_id, todo)

    def _program_failed(self, gen: int, workspace_id: str, todo: list[tuple[str, int]]) -> None:
        if self.generation == gen:  # a new generation has its own cache, rendered into its sets
            self.cache.forget(workspace_id, (ip for ip, _ in todo))
        self.counters["program_errors"] += 1

    # --- batching of set elements --------------------------------------------------------------
    def _batched(self, gen: int, workspace_id: str, key: str, todo: list[tuple[str, int]],
                 name: str) -> asyncio.Future:
        """Queue an answer's elements for the batch sent at the end of this event-loop turn; the
        future completes once the kernel ACKed them (or with the error that refused them)."""
        sets: dict[str, list[Element]] = {}
        for ip, timeout in todo:
            sets.setdefault(f"{key}_dyn6" if ":" in ip else f"{key}_dyn4", []).append(Element(ip, timeout, name))
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Pending(gen, workspace_id, sets, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """Send every pending answer's elements as one batch; if the kernel refuses it, send each
        answer on its own, so one bad element fails only its own answer."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        live = []
        for p in pending:
            if p.generation != self.generation:
                # Its sets were replaced by a policy apply: never add to the new ones unchecked.
                _settle(p.future, StaleGeneration(
                    f"policy generation {p.generation} replaced by {self.generation} before the answer's IPs were added"))
            else:
                live.append(p)
        if not live:
            return
        try:
            self.counters["set_transactions"] += 1
            self.nftset.add(_merged(live))
        except Exception as e:
            if len(live) == 1:
                _settle(live[0].future, e)
                return
            for p in live:
                try:
                    self.counters["set_transactions"] += 1
                    self.nftset.add(p.sets)
                except Exception as e1:
                    _settle(p.future, e1)
                else:
                    _settle(p.future, None)
            return
        for p in live:
            _settle(p.future, None)


def _merged(pending: list[_Pending]) -> dict[str, list[Element]]:
    out: dict[str, list[Element]] = {}
    for p in pending:
        for name, elements in p.sets.items():
            out.setdefault(name, []).extend(elements)
    return out


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():  # its caller was cancelled
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
