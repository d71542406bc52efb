"""Denial events: the rows of ``system.access.outbound_network`` (SPEC section 7).

Pure: dataclasses, the column schema and the JSON wire form. The daemon builds ``Event`` objects and
sends ``event_to_json`` documents to the collector, which checks them with ``event_from_json``
and stores them in the column order of ``COLUMNS``.

    daemon --Event--> event_to_json --HTTP--> event_from_json --Event--> store (DuckDB row)
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from egressd.errors import FieldError, ValidationError

DESTINATION_TYPES = ("DNS", "IP", "STORAGE")
ACCESS_TYPES = ("DROP", "LOG_ONLY_DENIAL")
PRODUCTS = ("DBSQL", "ML_SERVING", "GENERAL_COMPUTE", "ML_BUILD", "APPS")

#: Longest string accepted in any text field (a DNS name is at most 253 characters in text
#: form, but escaped labels and storage paths can be longer).
MAX_TEXT = 4096

DNS_EVENT_TYPE = "STRUCT(domain_name VARCHAR, rcode INTEGER)"
STORAGE_EVENT_TYPE = "STRUCT(hostname VARCHAR, path VARCHAR, rejection_reason VARCHAR)"
IP_EVENT_TYPE = (
    "STRUCT(source_ip VARCHAR, destination_ip VARCHAR, destination_port INTEGER, protocol VARCHAR)"
)

#: The table's columns, in order, with their DuckDB types. The Databricks columns come first,
#: egressd's extensions (ip_event, workload_id, network_policy_id, node) at the end.
SCHEMA: tuple[tuple[str, str], ...] = (
    ("account_id", "VARCHAR"),
    ("workspace_id", "VARCHAR"),
    ("event_id", "VARCHAR"),
    ("destination_type", "VARCHAR"),
    ("destination", "VARCHAR"),
    ("dns_event", DNS_EVENT_TYPE),
    ("storage_event", STORAGE_EVENT_TYPE),
    ("event_time", "TIMESTAMP"),
    ("access_type", "VARCHAR"),
    ("network_source_type", "VARCHAR"),
    ("ip_event", IP_EVENT_TYPE),
    ("workload_id", "VARCHAR"),
    ("network_policy_id", "VARCHAR"),
    ("node", "VARCHAR"),
)
COLUMNS: tuple[str, ...] = tuple(name for name, _ in SCHEMA)
COLUMN_TYPES: dict[str, str] = dict(SCHEMA)

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WORKSPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True)
class DnsEvent:
    domain_name: str
    rcode: int


@dataclass(frozen=True)
class StorageEvent:
    hostname: str
    path: str | None = None
    rejection_reason: str | None = None


@dataclass(frozen=True)
class IpEvent:
    source_ip: str
    destination_ip: str
    destination_port: int | None
    protocol: str


@dataclass(frozen=True)
class Event:
    """One row of the log table. ``event_time`` is timezone-aware UTC with millisecond precision."""

    account_id: str
    workspace_id: str
    event_id: str
    destination_type: str
    destination: str
    dns_event: DnsEvent | None
    storage_event: StorageEvent | None
    event_time: datetime
    access_type: str
    network_source_type: str | None
    ip_event: IpEvent | None = None
    workload_id: str | None = None
    network_policy_id: str | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.event_time, datetime):
            object.__setattr__(self, "event_time", utc_ms(self.event_time))


def new_event_id() -> str:
    """A fresh random event id (UUID 4, lower-case canonical form)."""
    return str(uuid.uuid4())


def utc_ms(t: datetime) -> datetime:
    """``t`` in UTC, truncated to milliseconds. A naive ``t`` is taken as UTC."""
    t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    return t.replace(microsecond=t.microsecond - t.microsecond % 1000)


def format_time(t: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2024-05-01T12:00:00.123Z``."""
    return utc_ms(t).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 timestamp that names its zone (``Z`` or ``+hh:mm``) to aware UTC (ms).

    Raises ``ValueError`` for anything else, naive timestamps included.
    """
    if not isinstance(text, str) or not 10 <= len(text) <= 40 or not text[:4].isdigit():
        raise ValueError("expected an ISO-8601 timestamp such as 2024-05-01T12:00:00.000Z")
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 timestamp") from None
    if t.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (end it with Z or +00:00)")
    try:
        return utc_ms(t)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range") from None


def event_to_json(e: Event) -> dict[str, Any]:
    """The wire (and query answer) form of an event: every column, in table order."""
    return {
        "account_id": e.account_id,
        "workspace_id": e.workspace_id,
        "event_id": e.event_id,
        "destination_type": e.destination_type,
        "destination": e.destination,
        "dns_event": None if e.dns_event is None else {
            "domain_name": e.dns_event.domain_name,
            "rcode": e.dns_event.rcode,
        },
        "storage_event": None if e.storage_event is None else {
            "hostname": e.storage_event.hostname,
            "path": e.storage_event.path,
            "rejection_reason": e.storage_event.rejection_reason,
        },
        "event_time": format_time(e.event_time),
        "access_type": e.access_type,
        "network_source_type": e.network_source_type,
        "ip_event": None if e.ip_event is None else {
            "source_ip": e.ip_event.source_ip,
            "destination_ip": e.ip_event.destination_ip,
            "destination_port": e.ip_event.destination_port,
            "protocol": e.ip_event.protocol,
        },
        "workload_id": e.workload_id,
        "network_policy_id": e.network_policy_id,
        "node": e.node,
    }


class _Checker:
    """Collects every ``FieldError`` of one document instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def fail(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def obj(self, value: Any, path: str, fields: tuple[str, ...]) -> Mapping[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {_kind(value)}")
            return None
        for key in value:
            if key not in fields:
                self.fail(f"{path}.{key}" if path else str(key), "unknown field")
        return value

    def text(self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str | None:
        value = obj.get(key)
        where = f"{path}.{key}" if path else key
        if value is None:
            if required:
                self.fail(where, "is required")
            return None
        if not isinstance(value, str):
            self.fail(where, f"expected a string, got {_kind(value)}")
            return None
        if required and not value:
            self.fail(where, "must not be empty")
            return None
        if len(value) > MAX_TEXT:
            self.fail(where, f"is longer than {MAX_TEXT} characters")
            return None
        if "\x00" in value or not _utf8(value):
            self.fail(where, "contains a NUL or an unpaired surrogate")
            return None
        return value

    def choice(self, obj: Mapping[str, Any], key: str, path: str, allowed: tuple[str, ...],
               *, required: bool = True) -> str | None:
        value = self.text(obj, key, path, required=required)
        if value is not None and value not in allowed:
            self.fail(f"{path}.{key}" if path else key,
                      f"{value!r} is not one of {', '.join(allowed)}")
            return None
        return value

    def integer(self, obj: Mapping[str, Any], key: str, path: str, lo: int, hi: int,
                *, required: bool = True) -> int | None:
        value = obj.get(key)
        where = f"{path}.{key}"
        if value is None:
            if required:
                self.fail(where, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, got {_kind(value)}")
            return None
        if not lo <= value <= hi:
            self.fail(where, f"{value} is not in {lo}..{hi}")
            return None
        return value

    def ip(self, obj: Mapping[str, Any], key: str, path: str) -> str | None:
        value = self.text(obj, key, path)
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            self.fail(f"{path}.{key}", f"{value!r} is not an IP address")
            return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TOP_FIELDS = COLUMNS
_DNS_FIELDS = ("domain_name", "rcode")
_STORAGE_FIELDS = ("hostname", "path", "rejection_reason")
_IP_FIELDS = ("source_ip", "destination_ip", "destination_port", "protocol")
# Which struct each destination type must carry (True), may carry (None) or must not (False).
_STRUCTS = {
    "DNS": {"dns_event": True, "storage_event": False, "ip_event": False},
    "IP": {"dns_event": False, "storage_event": False, "ip_event": True},
    "STORAGE": {"dns_event": None, "storage_event": True, "ip_event": False},
}


def event_from_json(obj: Any, path: str = "") -> Event:
    """Validate one wire document and build the ``Event``.

    Raises ``ValidationError`` with every problem found, each located under ``path``
    (for example ``[3].dns_event.rcode``). Never raises anything else.
    """
    c = _Checker()
    p = path
    sub = (lambda key: f"{p}.{key}") if p else (lambda key: key)
    doc = c.obj(obj, p, _TOP_FIELDS)
    if doc is None:
        raise ValidationError(c.errors)

    account_id = c.text(doc, "account_id", p)
    workspace_id = c.text(doc, "workspace_id", p)
    if workspace_id is not None and not _WORKSPACE_RE.fullmatch(workspace_id):
        c.fail(sub("workspace_id"), f"{workspace_id!r} is not a valid workspace id")
    event_id = c.text(doc, "event_id", p)
    if event_id is not None:
        if _UUID_RE.fullmatch(event_id):
            event_id = event_id.lower()
        else:
            c.fail(sub("event_id"), f"{event_id!r} is not a UUID")
    destination_type = c.choice(doc, "destination_type", p, DESTINATION_TYPES)
    destination = c.text(doc, "destination", p)
    access_type = c.choice(doc, "access_type", p, ACCESS_TYPES)
    network_source_type = c.choice(doc, "network_source_type", p, PRODUCTS, required=False)
    workload_id = c.text(doc, "workload_id", p, required=False)
    network_policy_id = c.text(doc, "network_policy_id", p, required=False)
    node = c.text(doc, "node", p, required=False)

    event_time = None
    raw_time = doc.get("event_time")
    if raw_time is None:
        c.fail(sub("event_time"), "is required")
    elif not isinstance(raw_time, str):
        c.fail(sub("event_time"), f"expected an ISO-8601 string, got {_kind(raw_time)}")
    else:
        try:
            event_time = parse_time(raw_time)
        except ValueError as exc:
            c.fail(sub("event_time"), str(exc))

    dns_event = _dns(c, doc.get("dns_event"), sub("dns_event"))
    storage_event = _storage(c, doc.get("storage_event"), sub("storage_event"))
    ip_event = _ip(c, doc.get("ip_event"), sub("ip_event"))

    if destination_type is not None:
        present = {"dns_event": doc.get("dns_event"), "storage_event": doc.get("storage_event"),
                   "ip_event": doc.get("ip_event")}
        for key, rule in _STRUCTS[destination_type].items():
            if rule is True and present[key] is None:
                c.fail(sub(key), f"is required for destination_type {destination_type}")
            elif rule is False and present[key] is not None:
                c.fail(sub(key), f"must be null for destination_type {destination_type}")

    if c.errors:
        raise ValidationError(c.errors)
    return Event(
        account_id=account_id, workspace_id=workspace_id, event_id=event_id,  # type: ignore[arg-type]
        destination_type=destination_type, destination=destination,  # type: ignore[arg-type]
        dns_event=dns_event, storage_event=storage_event,
        event_time=event_time,  # type: ignore[arg-type]
        access_type=access_type, network_source_type=network_source_type,  # type: ignore[arg-type]
        ip_event=ip_event, workload_id=workload_id, network_policy_id=network_policy_id, node=node,
    )


def _dns(c: _Checker, value: Any, path: str) -> DnsEvent | None:
    if value is None:
        return None
    doc = c.obj(value, path, _DNS_FIELDS)
    if doc is None:
        return None
    name = c.text(doc, "domain_name", path)
    rcode = c.integer(doc, "rcode", path, 0, 4095)
    return None if name is None or rcode is None else DnsEvent(name, rcode)


def _storage(c: _Checker, value: Any, path: str) -> StorageEvent | None:
    if value is None:
        return None
    doc = c.obj(value, path, _STORAGE_FIELDS)
    if doc is None:
        return None
    host = c.text(doc, "hostname", path)
    spath = c.text(doc, "path", path, required=False)
    reason = c.text(doc, "rejection_reason", path, required=False)
    return None if host is None else StorageEvent(host, spath, reason)


def _ip(c: _Checker, value: Any, path: str) -> IpEvent | None:
    if value is None:
        return None
    doc = c.obj(value, path, _IP_FIELDS)
    if doc is None:
        return None
    n = len(c.errors)
    src = c.ip(doc, "source_ip", path)
    dst = c.ip(doc, "destination_ip", path)
    port = c.integer(doc, "destination_port", path, 0, 65535, required=False)
    proto = c.text(doc, "protocol", path)
    if len(c.errors) > n:
        return None
    return IpEvent(src, dst, port, proto)  # type: ignore[arg-type]


#: At most this many field errors are reported for one batch (the rest are counted).
MAX_REPORTED_ERRORS = 20


def events_from_json(docs: Any) -> list[Event]:
    """Validate a JSON array of event documents. All or nothing: any problem raises
    ``ValidationError`` naming each bad field as ``[index].field``."""
    if not isinstance(docs, list):
        raise ValidationError(f"expected a JSON array of events, got {_kind(docs)}")
    events: list[Event] = []
    errors: list[FieldError] = []
    for i, doc in enumerate(docs):
        try:
            events.append(event_from_json(doc, f"[{i}]"))
        except ValidationError as exc:
            errors.extend(exc.errors)
    if errors:
        if len(errors) > MAX_REPORTED_ERRORS:
            more = len(errors) - MAX_REPORTED_ERRORS
            errors = errors[:MAX_REPORTED_ERRORS] + [FieldError("", f"and {more} more errors")]
        raise ValidationError(errors)
    return events
