"""Workloads (traffic sources on the node) and workspace bindings: parsing, overlap checks, lookup.

A workload owns a set of source networks. Every source address maps to exactly one workload, so
``check_overlaps`` refuses any two sources that share an address (identical or nested networks), and
``WorkloadIndex`` answers "which workload sent this packet / DNS query?" in O(1) for host sources.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from ..errors import FieldError, ValidationError

PRODUCTS = ("DBSQL", "ML_SERVING", "GENERAL_COMPUTE", "ML_BUILD", "APPS")
WORKSPACE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
WORKLOAD_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
POLICY_ID_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,32}$")

IPNetwork = IPv4Network | IPv6Network
_MAPPED_V4 = IPv6Network("::ffff:0:0/96")


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class Workload:
    """A traffic source on the node: its addresses, its workspace and its product."""

    workload_id: str
    workspace_id: str
    product: str
    sources: tuple[IPNetwork, ...]

    def to_dict(self) -> dict[str, Any]:
        """The API shape: ``{"workload_id", "workspace_id", "product", "sources": [cidr...]}``."""
        return {
            "workload_id": self.workload_id,
            "workspace_id": self.workspace_id,
            "product": self.product,
            "sources": [str(n) for n in self.sources],
        }


@dataclass(frozen=True)
class WorkspaceBinding:
    """A workspace bound to the policy it uses."""

    workspace_id: str
    network_policy_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"workspace_id": self.workspace_id, "network_policy_id": self.network_policy_id}


def _check_keys(obj: dict, path: str, allowed: Sequence[str], errors: list[FieldError]) -> None:
    for k in obj:
        if k not in allowed:
            errors.append(FieldError(_key(path, str(k)), "unknown key"))
    for k in allowed:
        if k not in obj:
            errors.append(FieldError(_key(path, k), "is required"))


def _id(value: Any, path: str, regex: re.Pattern[str], what: str, errors: list[FieldError],
        allow_int: bool = False) -> str:
    """A string id matching ``regex``. A workspace id may also be a non-negative integer
    (Databricks workspace ids are numbers); it is kept as its decimal string."""
    if allow_int and type(value) is int and value >= 0:
        value = str(value)
    if not isinstance(value, str):
        errors.append(FieldError(path, f"must be a string ({what})"))
    elif not regex.fullmatch(value):
        errors.append(FieldError(path, f"{value!r} is not a valid {what} ({regex.pattern})"))
    else:
        return value
    return ""


def parse_source(value: Any, path: str, errors: list[FieldError]) -> IPNetwork | None:
    """One source: a CIDR, or a bare address meaning /32 or /128. Host bits must be clear."""
    if not isinstance(value, str):
        errors.append(FieldError(path, "must be a string (an IP address or CIDR)"))
        return None
    try:
        net = ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ip_network(value, strict=False)
        except ValueError:
            errors.append(FieldError(path, f"{value!r} is not an IP address or CIDR"))
        else:
            errors.append(FieldError(path, f"{value!r} has host bits set (did you mean {loose}?)"))
        return None
    if isinstance(net, IPv6Network) and net.subnet_of(_MAPPED_V4):
        errors.append(FieldError(path, f"{value!r} is IPv4-mapped IPv6; write it as IPv4"))
        return None
    return net


def parse_workload(obj: Any, path: str = "", id_key: str = "workload_id") -> Workload:
    """Parse a workload (API shape; the config uses ``id_key="id"``). Raises ValidationError
    with every problem. Sources of one workload must not overlap each other either."""
    if not isinstance(obj, dict):
        raise ValidationError(FieldError(path, "must be an object"))
    errors: list[FieldError] = []
    _check_keys(obj, path, (id_key, "workspace_id", "product", "sources"), errors)
    wid = wsid = ""
    if id_key in obj:
        wid = _id(obj[id_key], _key(path, id_key), WORKLOAD_ID_RE, "workload id", errors)
    if "workspace_id" in obj:
        wsid = _id(obj["workspace_id"], _key(path, "workspace_id"), WORKSPACE_ID_RE,
                   "workspace id", errors, allow_int=True)
    product = obj.get("product")
    if "product" in obj and product not in PRODUCTS:
        errors.append(FieldError(_key(path, "product"),
                                 f"{product!r} is not a product; one of {', '.join(PRODUCTS)}"))
    sources: list[IPNetwork] = []
    if "sources" in obj:
        spath = _key(path, "sources")
        raw = obj["sources"]
        if not isinstance(raw, list):
            errors.append(FieldError(spath, "must be a list of CIDRs"))
        elif not raw:
            errors.append(FieldError(spath, "must list at least one source"))
        else:
            parsed = [parse_source(v, f"{spath}[{i}]", errors) for i, v in enumerate(raw)]
            if all(n is not None for n in parsed):
                sources = [n for n in parsed if n is not None]
                for (_, a), (_, b) in overlap_pairs([Workload("", "", "", tuple(sources))]):
                    later, earlier = max(a, b), min(a, b)
                    errors.append(FieldError(
                        f"{spath}[{later}]",
                        f"{sources[later]} overlaps sources[{earlier}] ({sources[earlier]})"))
    if errors:
        raise ValidationError(errors)
    return Workload(wid, wsid, str(product), tuple(sources))


def parse_binding(obj: Any, path: str = "", id_key: str = "workspace_id") -> WorkspaceBinding:
    """Parse ``{"workspace_id", "network_policy_id"}`` (the config uses ``id_key="id"``)."""
    if not isinstance(obj, dict):
        raise ValidationError(FieldError(path, "must be an object"))
    errors: list[FieldError] = []
    _check_keys(obj, path, (id_key, "network_policy_id"), errors)
    wsid = pid = ""
    if id_key in obj:
        wsid = _id(obj[id_key], _key(path, id_key), WORKSPACE_ID_RE, "workspace id", errors,
                   allow_int=True)
    if "network_policy_id" in obj:
        pid = _id(obj["network_policy_id"], _key(path, "network_policy_id"), POLICY_ID_RE,
                  "network policy id", errors)
    if errors:
        raise ValidationError(errors)
    return WorkspaceBinding(wsid, pid)


SourceRef = tuple[int, int]  # (workload index, source index)


def overlap_pairs(workloads: Sequence[Workload]) -> Iterator[tuple[SourceRef, SourceRef]]:
    """Yield ``((w, s), (w2, s2))`` index pairs of overlapping sources, inner network first.

    CIDR networks are either nested or disjoint, so a sort by (start, widest first) and a stack of
    open networks find every overlap in O(n log n): each network is paired with the innermost one
    containing it, and every source involved in some overlap appears in at least one pair.
    """
    for version in (4, 6):
        items = sorted(
            (int(n.network_address), -int(n.broadcast_address), wi, si)
            for wi, w in enumerate(workloads)
            for si, n in enumerate(w.sources)
            if n.version == version
        )
        stack: list[tuple[int, int, int]] = []  # (end, wi, si)
        for start, neg_end, wi, si in items:
            while stack and stack[-1][0] < start:
                stack.pop()
            if stack:
                yield (wi, si), (stack[-1][1], stack[-1][2])
            stack.append((-neg_end, wi, si))


def check_overlaps(
    workloads: Iterable[Workload], paths: Sequence[str] | None = None
) -> list[FieldError]:
    """Errors for sources shared by two workloads (or twice by one). Each error is placed on the
    workload that comes later in ``workloads``; ``paths[i]`` is the key path of workload i
    (default ``workloads[i]``). Both workload ids are named in the message."""
    ws = list(workloads)
    paths = list(paths) if paths is not None else [f"workloads[{i}]" for i in range(len(ws))]
    errors: list[FieldError] = []
    for a, b in overlap_pairs(ws):
        (wi, si), (oi, osi) = max(a, b), min(a, b)
        w, o = ws[wi], ws[oi]
        errors.append(FieldError(
            f"{paths[wi]}.sources[{si}]",
            f"source {w.sources[si]} of workload {w.workload_id!r} overlaps source "
            f"{o.sources[osi]} of workload {o.workload_id!r} ({paths[oi]}.sources[{osi}]); "
            "a source address must belong to exactly one workload",
        ))
    return errors


def overlaps_with(new: Workload, existing: Iterable[Workload], path: str = "") -> list[FieldError]:
    """Errors for sources of ``new`` that overlap a source of another workload in ``existing``
    (which is assumed overlap-free). A workload with ``new``'s id is ignored: ``new`` replaces it.
    Paths are ``{path}.sources[i]``."""
    others = [w for w in existing if w.workload_id != new.workload_id]
    ws = [*others, new]
    n = len(others)
    errors: list[FieldError] = []
    for a, b in overlap_pairs(ws):
        if a[0] != n and b[0] != n:
            continue
        (_, si), (oi, osi) = (a, b) if a[0] == n else (b, a)
        o = ws[oi]
        what = "another source of this workload" if oi == n else f"workload {o.workload_id!r}"
        errors.append(FieldError(
            _key(path, f"sources[{si}]"),
            f"{new.sources[si]} overlaps {o.sources[osi]} of {what}; "
            "a source address must belong to exactly one workload",
        ))
    return errors


_MEMO_MAX = 65_536


class WorkloadIndex:
    """Maps a source address to its workload. Built from overlap-free workloads.

    Per family: one dict per prefix length present, keyed by the masked address. A lookup tries
    the prefix lengths longest first, so a host source (/32, /128) is found by the first dict probe.
    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, as a dual-stack socket reports them) are
    looked up as IPv4.
    """

    def __init__(self, workloads: Iterable[Workload]):
        tables: dict[int, dict[int, dict[int, Workload]]] = {4: {}, 6: {}}
        count = 0
        for w in workloads:
            count += 1
            for n in w.sources:
                tables[n.version].setdefault(n.prefixlen, {})[int(n.network_address)] = w
        self._len = count
        self._tables = {
            v: tuple(
                (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1), t[plen])
                for plen in sorted(t, reverse=True)
            )
            for v, t, bits in ((4, tables[4], 32), (6, tables[6], 128))
        }
        # Answers for source strings already looked up (every DNS query looks up its source;
        # parsing the address is most of the cost). The index never changes: a new plan builds
        # a new index, so the memo cannot go stale. Bounded: cleared when full.
        self._memo: dict[str, Workload | None] = {}

    def __len__(self) -> int:
        return self._len

    def lookup(self, ip: str | IPv4Address | IPv6Address) -> Workload | None:
        """The workload owning ``ip``, or None (also for a string that is not an address).
        A zone suffix (``fe80::1%eth0``) is ignored."""
        if isinstance(ip, str):
            memo = self._memo
            try:
                return memo[ip]
            except KeyError:
                pass
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            w = memo[ip] = self._lookup(ip)
            return w
        return self._lookup(ip)

    def _lookup(self, ip: str | IPv4Address | IPv6Address) -> Workload | None:
        if isinstance(ip, str):
            try:
                ip = ip_address(ip.split("%", 1)[0])
            except ValueError:
                return None
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for mask, table in self._tables[ip.version]:
            w = table.get(value & mask)
            if w is not None:
                return w
        return None
