"""Rendering of the egressd nftables table from the plan. Pure: text in, text out.

The templates live in the top-level ``nft/`` directory (shipped as ``egressd.nft``); the text is
handed to libnftables as one transaction by the adapter, so the kernel switches from the old table
to the new one atomically (``table``; ``delete table``; ``table {…}`` in one batch: there is never
an empty or half-filled table)."""

from __future__ import annotations

import ipaddress
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from string import Template

from .ipcache import GRACE, Entry
from .nfmsg import comment_text
from .plan import ACCEPT, Plan, WorkspacePlan
from .verdict import CompiledPolicy
from .workloads import Workload

TABLE = "inet egressd"
#: The comment of the table's ``generation`` set: the generation the kernel holds (read back on restart).
GENERATION_PREFIX = "egressd generation="
#: The comment of each answer set: how many seconds its elements outlive the cache's entries
#: (ipcache.GRACE), read back on restart; a set without it is of a version that had none.
GRACE_PREFIX = "egressd grace="


def set_grace(comment: str) -> int:
    """The GRACE seconds an answer set's comment states (0 when it states none)."""
    if comment.startswith(GRACE_PREFIX):
        try:
            return max(int(comment[len(GRACE_PREFIX):].rstrip("s")), 0)
        except ValueError:
            return 0
    return 0


_TEMPLATES = resources.files("egressd.nft")
_TABLE_T = Template(_TEMPLATES.joinpath("table.nft").read_text())
_WS_T = Template(_TEMPLATES.joinpath("workspace.nft").read_text())
_INDENT = "\t\t"


@dataclass(frozen=True)
class RenderOptions:
    generation: int
    dns_port: int
    deny_action: str  # "reject" | "drop"
    nflog_group: int = 1053
    log_rate: int = 50
    # Kernel per-source budget of UDP queries to the shim (packets/s, burst); 0 = none.
    dns_flood_rate: int = 0
    dns_flood_burst: int = 0


def _elements(items: list[str]) -> str:
    if not items:
        return ""
    return f"{_INDENT}elements = {{ {', '.join(items)} }}"


def _quote(text: str) -> str:
    # Element comments hold DNS names ([a-z0-9._-]); anything else is dropped, never escaped.
    return f'"{comment_text(text)}"'


def dyn_element(ip: str, timeout_s: int, name: str, expires_s: float | None = None) -> str:
    """One timeout-set element, as added at run time or carried over a re-render."""
    text = f"{ip} timeout {int(timeout_s)}s"
    if expires_s is not None:
        text += f" expires {max(int(expires_s * 1000), 1)}ms"
    return f"{text} comment {_quote(name)}"


def _dyn(entries: Iterable[Entry], now: float, v6: bool) -> list[str]:
    out = []
    for e in entries:
        if (":" in e.ip) != v6:
            continue
        if e.expires - now <= 0.001:
            continue  # expired in the cache: the next round would delete it
        remaining = e.expires - now + GRACE  # the kernel holds it GRACE seconds longer (ipcache)
        out.append(dyn_element(e.ip, int(remaining) + 1, e.name, remaining))
    return out


def _ranges(ranges: list[tuple[int, int]], version: int) -> list[str]:
    """Interval-set elements for merged (first, last) ranges: a CIDR where the range is exactly one
    prefix, else `first-last` (nftables takes both)."""
    bits = 32 if version == 4 else 128
    text = _v4 if version == 4 else _v6
    out = []
    for first, last in ranges:
        size = last - first + 1
        if size & (size - 1) == 0 and first % size == 0:
            out.append(f"{text(first)}/{bits - size.bit_length() + 1}")
        else:
            out.append(f"{text(first)}-{text(last)}")
    return out


def _split(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Merged ranges as (true ranges, single addresses): the interval set and the hash set."""
    spans, singles = [], []
    for r in ranges:
        (singles if r[0] == r[1] else spans).append(r)
    return spans, singles


def _hosts(singles: list[tuple[int, int]], version: int) -> list[str]:
    """Hash-set elements: plain addresses (a prefix needs an interval set)."""
    text = _v4 if version == 4 else _v6
    return [text(first) for first, _ in singles]


def _v4(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def _v6(value: int) -> str:
    return ipaddress.IPv6Address(value).compressed


Ranges = list[tuple[int, int]]
Render = Callable[[Ranges, int], list[str]]


_SETS_CACHE: "weakref.WeakKeyDictionary[CompiledPolicy, dict[str, tuple[Render, int, Ranges]]]" = weakref.WeakKeyDictionary()


def _policy_sets(cp: CompiledPolicy) -> dict[str, tuple[Render, int, Ranges]]:
    """A workspace's policy sets, by name suffix (the template's placeholders): how their
    elements are written, their IP version, and their ranges. The allowed single addresses go
    to hash sets, the allowed and blocked ranges to interval sets. The one source for the
    rendered table and for a delta's diff of it; worked out once per compiled policy (a policy
    of 100,000 destinations: 5-8 ms a split, which a delta's diff and the table that follows
    it, and the next edit's diff, all needed)."""
    sets = _SETS_CACHE.get(cp)
    if sets is None:
        sets = _SETS_CACHE[cp] = _make_policy_sets(cp)
    return sets


def _make_policy_sets(cp: CompiledPolicy) -> dict[str, tuple[Render, int, Ranges]]:
    (net4, host4), (net6, host6) = _split(cp.allowed_ranges_v4), _split(cp.allowed_ranges_v6)
    return {
        "net4": (_ranges, 4, net4),
        "net6": (_ranges, 6, net6),
        "host4": (_hosts, 4, host4),
        "host6": (_hosts, 6, host6),
        "blk4": (_ranges, 4, cp.blocked_ranges_v4),
        "blk6": (_ranges, 6, cp.blocked_ranges_v6),
    }


def _same_ranges(a: CompiledPolicy, b: CompiledPolicy) -> bool:
    """True when two compiled policies put the same elements in the policy sets (integer lists
    compared: no splitting or rendering of 50,000 ranges for an edit that keeps them)."""
    return (a.allowed_ranges_v4 == b.allowed_ranges_v4 and a.allowed_ranges_v6 == b.allowed_ranges_v6
            and a.blocked_ranges_v4 == b.blocked_ranges_v4 and a.blocked_ranges_v6 == b.blocked_ranges_v6)


def _render_workspace(ws: WorkspacePlan, dyn: list[Entry], now: float, opts: RenderOptions) -> str:
    return _WS_T.substitute(
        nflog_group=opts.nflog_group,
        log_rate=opts.log_rate,
        log_burst=opts.log_rate * 2,
        workspace_id=ws.workspace_id,
        policy_id=ws.policy.network_policy_id,
        restriction=ws.policy.restriction_mode.value,
        key=ws.key,
        grace=f"{GRACE_PREFIX}{GRACE}s",
        dyn4=_elements(_dyn(dyn, now, v6=False)),
        dyn6=_elements(_dyn(dyn, now, v6=True)),
        **{suffix: _elements(render(ranges, version))
           for suffix, (render, version, ranges) in _policy_sets(ws.compiled).items()},
    )


def workload_elements(plan: Plan, workloads: Iterable[Workload] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Source -> verdict of every workload of the plan (or of those given), IPv4 and IPv6: the
    elements of the workload_verdict maps (their keys are the elements of the workload_src sets).
    Sources never overlap (the plan checks), so each key is one element."""
    v4: dict[str, str] = {}
    v6: dict[str, str] = {}
    for w in plan.workloads if workloads is None else workloads:
        chain = plan.workspace_of(w).chain_for(w.product)
        verdict = f"goto {chain}" if chain else ACCEPT
        for net in w.sources:
            (v4 if net.version == 4 else v6)[str(net)] = verdict
    return v4, v6


def render_table(plan: Plan, dyn: Mapping[str, list[Entry]], now: float, opts: RenderOptions) -> str:
    """The whole table. dyn: workspace id -> live entries of its timeout sets."""
    v4, v6 = workload_elements(plan)
    blocks = [
        _render_workspace(ws, dyn.get(ws.workspace_id, []), now, opts)
        for ws in plan.workspaces.values()
        if ws.restricted
    ]
    if opts.deny_action == "drop":
        deny = f"{_INDENT}counter drop"
    else:
        deny = f"{_INDENT}meta l4proto tcp counter reject with tcp reset\n{_INDENT}counter reject with icmpx admin-prohibited"
    return _TABLE_T.substitute(
        generation=opts.generation,
        workload_verdict_v4=_elements([f"{k} : {v}" for k, v in v4.items()]),
        workload_verdict_v6=_elements([f"{k} : {v}" for k, v in v6.items()]),
        workload_src_v4=_elements(list(v4)),
        workload_src_v6=_elements(list(v6)),
        workspaces="\n".join(blocks),
        deny_action=opts.deny_action,
        deny_rules=deny,
        dns_port=opts.dns_port,
        dns_flood_rate=opts.dns_flood_rate,
        dns_flood_rules=_dns_flood_rules(opts),
    )


def _dns_flood_rules(opts: RenderOptions) -> str:
    if opts.dns_flood_rate <= 0:
        return ""
    limit = f"limit rate over {opts.dns_flood_rate}/second burst {max(opts.dns_flood_burst, 1)} packets"
    return "\n".join(
        f"{_INDENT}udp dport {opts.dns_port} ct status dnat update @dns_rate_{v} {{ {ip} saddr {limit} }} "
        f"counter name dns_flood_drops drop"
        for v, ip in (("v4", "ip"), ("v6", "ip6"))
    )


def same_skeleton(old: Plan, new: Plan) -> bool:
    """True when the two plans' tables hold the same objects (sets, maps, chains), given the same
    RenderOptions, and differ at most in set and map elements: the same restricted workspaces
    (each has its sets and chains; an unrestricted one has none). Their policies may differ:
    a policy's destinations are set elements, and its enforcement mode picks the chain in a
    workload's verdict, a map element."""
    return [k for k, ws in old.workspaces.items() if ws.restricted] == [
        k for k, ws in new.workspaces.items() if ws.restricted
    ]


def _set_delta(name: str, render: Render, version: int, was: Ranges, now: Ranges,
               budget: int | None = None) -> tuple[list[str], int] | None:
    """Commands that turn a set holding the ranges ``was`` into one holding ``now``, and how many
    elements they add or delete: deletions, then additions; or, when that would take more
    elements than ``now`` has, a flush and a refill. Diffed as integers, and only the elements
    that change rendered (a policy of 100,000 destinations has 50,000 ranges). None, with
    nothing rendered, when that count is over ``budget``."""
    if budget is not None and _surely_over(was, now, budget):
        return None
    before, after = set(was), set(now)
    gone = [r for r in was if r not in after]
    added = [r for r in now if r not in before]
    if not gone and not added:
        return [], 0
    refill = len(gone) + len(added) > len(now)
    n = len(now) if refill else len(gone) + len(added)
    if budget is not None and n > budget:
        return None
    if refill:
        lines = [f"flush set {TABLE} {name}"]
        if now:
            lines.append(f"add element {TABLE} {name} {{ {', '.join(render(now, version))} }}")
        return lines, n
    lines = []
    if gone:
        lines.append(f"delete element {TABLE} {name} {{ {', '.join(render(gone, version))} }}")
    if added:
        lines.append(f"add element {TABLE} {name} {{ {', '.join(render(added, version))} }}")
    return lines, n


def _surely_over(was: Ranges, now: Ranges, budget: int, samples: int = 64) -> bool:
    """True when a sample says that more than 1.25 x ``budget`` of ``now`` is not in ``was``:
    the diff would add more elements than the budget, and is not worth working out (100,000
    destinations all changed: 20-40 ms of sets and lists for nothing). Both lists are sorted
    (merge_ranges), so a sampled range is looked up by bisection. Only ever a shortcut: a
    sample that misjudges costs time, never correctness (the whole table is always right)."""
    if len(now) <= budget or len(now) < 4 * samples:
        return False
    picks = now[:: len(now) // samples]
    missing = 0
    for r in picks:
        i = bisect_left(was, r)
        missing += i == len(was) or was[i] != r
    return missing * len(now) > 1.25 * budget * len(picks)


def table_delta(
    old: Plan, new: Plan, generation: int, withdrawn: Mapping[str, Iterable[str]] | None = None,
    max_changes: int | None = None,
) -> str | None:
    """A transaction that turns the loaded table of ``old`` into the table of ``new``, for plans
    of the same skeleton (see same_skeleton), in O(changes) where a whole table re-adds every
    element, cached IPs included: the generation marker is replaced; the elements that differ
    are deleted, then added, so a source that changes its verdict, or a range that takes over an
    old one, is never in a set twice. For a workspace whose compiled policy is another object:
    its policy sets' elements are diffed, its workloads' verdicts rendered on both sides, and the
    IPs in ``withdrawn`` (workspace id -> IPs whose names the new policy no longer allows) are
    taken out of its timeout sets. None when that would add or delete more than ``max_changes``
    elements (a withdrawn IP counts twice), and a new table takes less time: libnftables reads
    an interval set's existing elements back before changing it (a refill of 50,000 ranges:
    650-820 ms; a new table with them: 430-590 ms), and withdrawing 100,000 cached IPs took
    1.7 s as a delta, 0.6 s as a new table."""
    lines = [f"delete set {TABLE} generation",
             f"add set {TABLE} generation {{ type inet_service; comment \"{GENERATION_PREFIX}{int(generation)}\"; }}"]
    changed = set()
    touched = 0
    for ws_id, ws in new.workspaces.items():
        was = old.workspaces.get(ws_id)
        if was is None or was.compiled is ws.compiled:
            continue
        changed.add(ws_id)
        if not ws.restricted:
            continue
        if not _same_ranges(was.compiled, ws.compiled):
            before_sets = _policy_sets(was.compiled)
            for suffix, (render, version, after_ranges) in _policy_sets(ws.compiled).items():
                done = _set_delta(f"{ws.key}_{suffix}", render, version, before_sets[suffix][2], after_ranges,
                                  None if max_changes is None else max_changes - touched)
                if done is None:
                    return None
                lines += done[0]
                touched += done[1]
        for fam, ips in _by_family(withdrawn.get(ws_id, ()) if withdrawn else ()):
            touched += 2 * len(ips)
            if max_changes is not None and touched > max_changes:
                return None
            lines.append(withdraw_elements({f"{ws.key}_dyn{fam}": ips}))
    # A workload that is the same object in both plans, in a workspace whose policy is the same,
    # has the same sources and the same verdict: only the others are rendered, so that a PUT
    # among 10,000 workloads formats a few elements, not 20,000 (the admin keeps the parsed
    # objects of unchanged documents). An equal workload that is another object is rendered on
    # both sides and its keys, with equal verdicts, cancel out.
    before, after = {id(w) for w in old.workloads}, {id(w) for w in new.workloads}
    was_all = workload_elements(old, (w for w in old.workloads if id(w) not in after or w.workspace_id in changed))
    now_all = workload_elements(new, (w for w in new.workloads if id(w) not in before or w.workspace_id in changed))
    for fam, was, now in zip(("v4", "v6"), was_all, now_all, strict=True):
        gone = [k for k in was if k not in now]
        changed_keys = [k for k, v in now.items() if k in was and was[k] != v]
        added = [k for k in now if k not in was]
        if gone or changed_keys:
            lines.append(f"delete element {TABLE} workload_verdict_{fam} {{ {', '.join(gone + changed_keys)} }}")
        if gone:
            lines.append(f"delete element {TABLE} workload_src_{fam} {{ {', '.join(gone)} }}")
        if added or changed_keys:
            items = ", ".join(f"{k} : {now[k]}" for k in changed_keys + added)
            lines.append(f"add element {TABLE} workload_verdict_{fam} {{ {items} }}")
        if added:
            lines.append(f"add element {TABLE} workload_src_{fam} {{ {', '.join(added)} }}")
    return "\n".join(lines) + "\n"


def _by_family(ips: Iterable[str]) -> list[tuple[str, list[str]]]:
    """IPv4 and IPv6 addresses apart (sorted), as ("4", […]) and ("6", […]) where there are any."""
    v4: list[str] = []
    v6: list[str] = []
    for ip in ips:
        (v6 if ":" in ip else v4).append(ip)
    return [(fam, sorted(found)) for fam, found in (("4", v4), ("6", v6)) if found]


def withdraw_elements(sets: Mapping[str, Iterable[str]]) -> str:
    """Commands that take IPs out of timeout sets (set name -> IPs), whether the kernel still holds
    them or not: add, then delete, so the delete cannot fail on an entry the kernel has just timed
    out (an existing element makes the add a no-op)."""
    lines = []
    for name, ips in sets.items():
        items = ", ".join(dict.fromkeys(ips))
        if items:
            lines.append(f"add element {TABLE} {name} {{ {items} }}")
            lines.append(f"delete element {TABLE} {name} {{ {items} }}")
    return "\n".join(lines)


def replace_table(table_text: str) -> str:
    """A transaction that swaps in table_text for whatever egressd table exists (or none)."""
    return f"table {TABLE}\ndelete table {TABLE}\n{table_text}"


def delete_table() -> str:
    return f"table {TABLE}\ndelete table {TABLE}\n"


def program_elements(ws: WorkspacePlan, entries: Iterable[tuple[str, int]], name: str) -> str:
    """Commands that put IPs into a workspace's timeout sets, resetting each entry's timeout
    (add, delete, add in one transaction works on kernels that do not update timeouts on add)."""
    lines = []
    for ip, timeout in entries:
        s = f"{ws.key}_dyn6" if ":" in ip else f"{ws.key}_dyn4"
        elem = dyn_element(ip, timeout, name)
        lines.append(f"add element {TABLE} {s} {{ {elem} }}")
        lines.append(f"delete element {TABLE} {s} {{ {ip} }}")
        lines.append(f"add element {TABLE} {s} {{ {elem} }}")
    return "\n".join(lines)
