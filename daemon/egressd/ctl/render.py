"""Human output of egressctl: aligned tables and ``key: value`` lines. Pure: strings in, strings out.

Every value shown comes from a server, and some of it (domain names, paths) from the workloads
being policed, so each cell is escaped: control characters never reach the terminal raw.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

NONE = "-"


def pretty_json(data: Any) -> str:
    """The server's JSON as is (key order kept), indented."""
    return json.dumps(data, indent=2, ensure_ascii=False)


def compact_json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def clean(value: Any, none: str = NONE) -> str:
    """One value as single-line, terminal-safe text. Structures are shown as compact JSON."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        value = compact_json(value)
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], none: str = NONE) -> str:
    """Columns aligned on the widest cell, two spaces apart; the last column is not padded."""
    cells = [[clean(h) for h in headers]] + [[clean(v, none) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(_line(r, widths) for r in cells)


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


class GrowingTable:
    """A table printed piece by piece (``logs --follow``): columns only ever widen."""

    def __init__(self, headers: Sequence[str]) -> None:
        self.headers = [clean(h) for h in headers]
        self.widths = [len(h) for h in self.headers]
        self.started = False

    def lines(self, rows: Iterable[Sequence[Any]]) -> list[str]:
        cells = [[clean(v) for v in row] for row in rows]
        for r in cells:
            self.widths = [max(w, len(c)) for w, c in zip(self.widths, r)]
        out = [] if self.started or not cells else [_line(self.headers, self.widths)]
        self.started = self.started or bool(cells)
        return out + [_line(r, self.widths) for r in cells]


def key_values(doc: Any) -> str:
    """``key: value`` lines, values aligned. Nested objects are flattened to dotted keys."""
    pairs = list(_flatten(doc, "")) if isinstance(doc, dict) else [("value", doc)]
    if not pairs:
        return ""
    width = max(len(clean(k)) for k, _ in pairs) + 1
    return "\n".join(f"{(clean(k) + ':').ljust(width)} {clean(v)}" for k, v in pairs)


def _flatten(doc: dict[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def items_of(doc: Any, *keys: str) -> list[Any]:
    """The list in a list answer: ``{"items": [...]}`` (or another key), or a bare list."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for key in ("items", *keys):
            if isinstance(doc.get(key), list):
                return doc[key]
    return []


# -- policies --------------------------------------------------------------------------------

def _access(policy: dict[str, Any]) -> dict[str, Any]:
    egress = policy.get("egress") if isinstance(policy.get("egress"), dict) else {}
    access = egress.get("network_access")
    return access if isinstance(access, dict) else {}


def enforcement(policy: dict[str, Any]) -> str:
    """``ENFORCED``, ``DRY_RUN`` or ``DRY_RUN(DBSQL,ML_SERVING)``."""
    pe = _access(policy).get("policy_enforcement") or {}
    mode = pe.get("enforcement_mode") or "ENFORCED"
    products = pe.get("dry_run_mode_product_filter") or []
    return f"{mode}({','.join(map(str, products))})" if mode == "DRY_RUN" and products else str(mode)


def _count(access: dict[str, Any], key: str) -> int:
    value = access.get(key)
    return len(value) if isinstance(value, list) else 0


def policies_table(doc: Any) -> str:
    policies = [p for p in items_of(doc, "network_policies") if isinstance(p, dict)]
    with_source = any("source" in p for p in policies)
    headers = ["ID", "MODE", "ENFORCEMENT", "#ALLOWED", "#BLOCKED", "#STORAGE"] + (["SOURCE"] if with_source else [])
    rows = []
    for p in policies:
        a = _access(p)
        row = [p.get("network_policy_id"), a.get("restriction_mode"), enforcement(p),
               _count(a, "allowed_internet_destinations"), _count(a, "blocked_internet_destinations"),
               _count(a, "allowed_storage_destinations")]
        rows.append(row + ([p.get("source")] if with_source else []))
    return table(headers, rows)


def _storage(entry: Any) -> str:
    if not isinstance(entry, dict):
        return clean(entry)
    rest = " ".join(f"{k}={clean(v)}" for k, v in entry.items() if k != "storage_destination_type")
    return f"{clean(entry.get('storage_destination_type'))}  {rest}".rstrip()


def _internet(entry: Any) -> str:
    if not isinstance(entry, dict):
        return clean(entry)
    return f"{clean(entry.get('destination'))}  ({clean(entry.get('internet_destination_type'))})"


def policy_detail(policy: Any) -> str:
    """One policy: its header fields, then each destination list, one entry a line."""
    if not isinstance(policy, dict):
        return clean(policy)
    a = _access(policy)
    head = {"network_policy_id": policy.get("network_policy_id")}
    if "source" in policy:
        head["source"] = policy["source"]
    head |= {"restriction_mode": a.get("restriction_mode"), "enforcement": enforcement(policy)}
    lines = [key_values(head)]
    for key, fmt in (("allowed_internet_destinations", _internet), ("blocked_internet_destinations", _internet),
                     ("allowed_storage_destinations", _storage)):
        entries = a.get(key) if isinstance(a.get(key), list) else []
        lines.append(f"{key}:" + ("" if entries else " none"))
        lines.extend(f"  {fmt(e)}" for e in entries)
    return "\n".join(lines)


# -- workspaces, workloads, connections ------------------------------------------------------

def _size(value: Any) -> Any:
    return len(value) if isinstance(value, (list, dict)) else value


def _optional(objs: list[dict[str, Any]], *columns: tuple[str, str]) -> list[tuple[str, str]]:
    """The (header, key) columns that at least one object has."""
    return [(h, k) for h, k in columns if any(k in o for o in objs)]


def workspaces_table(doc: Any) -> str:
    spaces = [w for w in items_of(doc, "workspaces") if isinstance(w, dict)]
    extra = _optional(spaces, ("MODE", "restriction_mode"), ("BOUND_BY", "binding_source"))
    rows = []
    for w in spaces:
        workloads = w.get("workloads", w.get("workload_count"))
        destinations = w.get("destination_count", w.get("destinations"))
        rows.append([w.get("workspace_id"), w.get("network_policy_id")] + [w.get(k) for _, k in extra]
                    + [_size(workloads), _size(destinations)])
    return table(["WORKSPACE", "POLICY"] + [h for h, _ in extra] + ["WORKLOADS", "DESTINATIONS"], rows)


def workloads_table(doc: Any) -> str:
    loads = [w for w in items_of(doc, "workloads") if isinstance(w, dict)]
    extra = _optional(loads, ("SOURCE", "source"))
    rows = []
    for w in loads:
        sources = w.get("sources")
        shown = ",".join(map(str, sources)) if isinstance(sources, list) else sources
        rows.append([w.get("workload_id"), w.get("workspace_id"), w.get("product"), shown]
                    + [w.get(k) for _, k in extra])
    return table(["WORKLOAD", "WORKSPACE", "PRODUCT", "SOURCES"] + [h for h, _ in extra], rows)


def connections(doc: Any) -> str:
    doc = doc if isinstance(doc, dict) else {}
    conns = [c for c in doc.get("connections") or [] if isinstance(c, dict)]
    locs = [x for x in doc.get("external_locations") or [] if isinstance(x, dict)]
    parts = [f"connections: {len(conns)}"]
    if conns:
        parts.append(table(["NAME", "TYPE", "HOST", "PORT"],
                           [[c.get("name"), c.get("connection_type"), c.get("host"), c.get("port")] for c in conns]))
    parts.append(f"external_locations: {len(locs)}")
    if locs:
        parts.append(table(["NAME", "URL"], [[x.get("name"), x.get("url")] for x in locs]))
    return "\n".join(parts)


# -- verify ----------------------------------------------------------------------------------

def verdict(doc: Any, destination: str) -> str:
    """``DROP  evil.example  (network policy restricted-etl: no allowed destination matches)``."""
    if not isinstance(doc, dict):
        return clean(doc)
    policy = clean(doc.get("network_policy_id"))
    reason = clean(doc.get("reason"), none="")
    matched = doc.get("matched")
    why = f"network policy {policy}" + (f": {reason}" if reason else "")
    if matched not in (None, "", [], {}) and clean(matched) not in reason:
        why += f"; matched {clean(matched)}"
    return f"{clean(doc.get('verdict'))}  {clean(doc.get('destination', destination))}  ({why})"


# -- logs ------------------------------------------------------------------------------------

EVENT_HEADERS = ["EVENT_TIME", "ACCESS_TYPE", "WORKSPACE_ID", "NETWORK_SOURCE_TYPE", "DESTINATION_TYPE",
                 "DESTINATION", "WORKLOAD_ID", "NETWORK_POLICY_ID"]


def event_destination(event: dict[str, Any]) -> str:
    """The destination; for IP events ``ip:port/PROTO`` (``[v6]:port/PROTO``, ``ip/ICMP`` without port)."""
    ip = event.get("ip_event")
    if event.get("destination_type") != "IP" or not isinstance(ip, dict):
        return clean(event.get("destination"))
    addr = clean(ip.get("destination_ip") or event.get("destination"))
    port, proto = ip.get("destination_port"), ip.get("protocol")
    if port is not None:
        addr = f"[{addr}]:{clean(port)}" if ":" in addr else f"{addr}:{clean(port)}"
    return f"{addr}/{clean(proto)}" if proto else addr


def event_row(event: dict[str, Any]) -> list[Any]:
    return [event.get("event_time"), event.get("access_type"), event.get("workspace_id"),
            event.get("network_source_type"), event.get("destination_type"), event_destination(event),
            event.get("workload_id"), event.get("network_policy_id")]


def events_table(events: Sequence[dict[str, Any]]) -> str:
    return table(EVENT_HEADERS, [event_row(e) for e in events])


def sql_table(doc: Any) -> str:
    """A ``{"columns", "rows"}`` answer as a table; NULL for nulls, structs as compact JSON."""
    doc = doc if isinstance(doc, dict) else {}
    columns = [c if isinstance(c, str) else (c.get("name") if isinstance(c, dict) else c)
               for c in doc.get("columns") or []]
    rows = [r for r in doc.get("rows") or [] if isinstance(r, list)]
    if not columns:
        return ""
    return table(columns, [(r + [None] * len(columns))[:len(columns)] for r in rows], none="NULL")
