"""The daemon's config file (TOML, SPEC section 3): parsing and validation into frozen dataclasses.

``parse_config(text)`` -> ``config_from_dict(doc)`` -> ``Config``. Every problem (wrong type,
unknown key, bad value, duplicate id, overlapping workload sources) is collected and raised as one
``ValidationError`` whose ``FieldError`` paths name the key (``dns.upstreams[1]``,
``workloads[0].sources[2]``). Defaults live on the dataclass fields. Pure: the caller reads the
file and resolves ``node = ""`` to the host name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from ..errors import FieldError, ValidationError
from .addrfilter import MODES as SPECIAL_ADDRESS_MODES
from .workloads import Workload, WorkspaceBinding, check_overlaps, parse_binding, parse_workload

DEFAULT_CONFIG_PATH = "/etc/egressd/egressd.toml"
DENY_RCODES = {"NXDOMAIN": 3, "REFUSED": 5}
DENY_ACTIONS = ("reject", "drop")
LOG_LEVELS = ("debug", "info", "warning", "error")

_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{0,253}")
_GROUP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_PORT_RE = re.compile(r"[0-9]{1,5}")

HostPort = tuple[str, int]


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    upstreams: tuple[HostPort, ...]  # (ip, port); IPv6 without brackets
    deny_rcode: str = "NXDOMAIN"
    min_ttl: int = 30
    listen_port: int = 10053
    upstream_timeout_ms: int = 1800
    max_ips_per_name: int = 64
    rate_limit_qps: int = 500  # per workload; 0 disables
    rate_limit_burst: int = 1000  # per workload; 0 disables
    max_inflight: int = 2048  # forwarded queries awaiting upstream; SERVFAIL beyond
    special_addresses: str = "answer-closed"  # or "refuse": see core/addrfilter

    @property
    def deny_rcode_value(self) -> int:
        """The numeric rcode: 3 (NXDOMAIN) or 5 (REFUSED)."""
        return DENY_RCODES[self.deny_rcode]


@dataclass(frozen=True, kw_only=True)
class EnforcementConfig:
    deny_action: str = "reject"
    nflog_group: int = 1053
    log_rate: int = 50


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    socket: str = "/run/egressd/api.sock"
    socket_group: str = "egressd"
    tcp_listen: HostPort | None = None  # (host, port); IPv6 without brackets
    token_file: str | None = None
    metrics_listen: HostPort | None = None  # an unauthenticated /metrics-only listener


@dataclass(frozen=True, kw_only=True)
class CollectorConfig:
    url: str = "http://127.0.0.1:9180"  # without a trailing slash


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    dir: str = "/var/lib/egressd"


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_destinations: int = 2000


@dataclass(frozen=True, kw_only=True)
class PoliciesConfig:
    dir: str = "/etc/egressd/policies.d"
    default_policy: str = "default-policy.json"  # "" means none

    @property
    def default_policy_path(self) -> str | None:
        """``default_policy`` resolved against ``dir`` (an absolute name stays as is)."""
        if not self.default_policy:
            return None
        return str(PurePosixPath(self.dir) / self.default_policy)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True, kw_only=True)
class Config:
    dns: DnsConfig
    account_id: str = "node-1"
    node: str = ""  # "" means the host name; the caller resolves it
    enforcement: EnforcementConfig = field(default_factory=EnforcementConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    state: StateConfig = field(default_factory=StateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    log: LogConfig = field(default_factory=LogConfig)
    workspaces: tuple[WorkspaceBinding, ...] = ()
    workloads: tuple[Workload, ...] = ()


# --- value checkers: (value, path) -> normalized value, or raise ValidationError ---------------

Check = Callable[[Any, str], Any]


def _fail(path: str, message: str) -> ValidationError:
    return ValidationError(FieldError(path, message))


def _int(lo: int, hi: int | None = None) -> Check:
    def check(v: Any, path: str) -> int:
        if type(v) is not int:  # bool is a subclass of int: excluded on purpose
            raise _fail(path, "must be an integer")
        if v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise _fail(path, f"must be {bound}")
        return v
    return check


def _choice(options: tuple[str, ...] | dict[str, int]) -> Check:
    def check(v: Any, path: str) -> str:
        if not isinstance(v, str) or v not in options:
            raise _fail(path, f"must be one of {', '.join(repr(o) for o in options)}")
        return v
    return check


def _pattern(regex: re.Pattern[str], what: str) -> Check:
    def check(v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise _fail(path, "must be a string")
        if not regex.fullmatch(v):
            raise _fail(path, f"{v!r} is not a valid {what}")
        return v
    return check


def _abs_path(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _fail(path, "must be a string")
    if not v.startswith("/") or "\0" in v:
        raise _fail(path, f"{v!r} must be an absolute path")
    return v


def _file_name(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _fail(path, "must be a string")
    if "\0" in v:
        raise _fail(path, "must not contain NUL")
    return v


def _url(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _fail(path, "must be a string")
    bad = _fail(path, f"{v!r} is not an http:// or https:// URL")
    if any(c.isspace() or ord(c) < 32 for c in v):
        raise bad
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise bad
    return v.rstrip("/")


def _split_hostport(v: str, default_port: int | None) -> tuple[str, int, bool]:
    """Split "host", "host:port", "[v6]" or "[v6]:port" into (host, port, bracketed).
    Raises ValueError with the reason."""
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError("missing ']'")
        host, rest, bracketed = v[1:end], v[end + 1:], True
        if rest and not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_s = rest[1:] if rest else None
    else:
        host, sep, port_s = v.partition(":")
        bracketed = False
        if not sep:
            port_s = None
        elif ":" in port_s:
            raise ValueError("write an IPv6 address in brackets, like [2001:db8::53]:53")
    if port_s is None:
        if default_port is None:
            raise ValueError("a port is required")
        return host, default_port, bracketed
    if not _PORT_RE.fullmatch(port_s) or not 1 <= int(port_s) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_s), bracketed


def _ip_for(host: str, bracketed: bool) -> IPv4Address | IPv6Address | None:
    """The address ``host`` names, if it is an IP literal in the right form (IPv6 bracketed)."""
    try:
        ip = ip_address(host)
    except ValueError:
        return None
    return ip if (ip.version == 6) == bracketed else None


def _upstream(v: Any, path: str) -> HostPort:
    if not isinstance(v, str):
        raise _fail(path, "must be a string")
    try:
        host, port, bracketed = _split_hostport(v, 53)
    except ValueError as e:
        raise _fail(path, f"{v!r}: {e}") from None
    ip = _ip_for(host, bracketed)
    if ip is None:
        raise _fail(path, f"{v!r} must be an IPv4 address or a [bracketed] IPv6 address, with "
                          "an optional :port; host names are not allowed (a resolver cannot "
                          "depend on DNS)")
    if ip.is_unspecified or ip.is_multicast:
        raise _fail(path, f"{v!r} is not a unicast address")
    return str(ip), port


def _upstreams(v: Any, path: str) -> tuple[HostPort, ...]:
    if not isinstance(v, list):
        raise _fail(path, "must be a list of resolver addresses")
    if not v:
        raise _fail(path, "must list at least one resolver")
    errors: list[FieldError] = []
    out: list[HostPort] = []
    for i, item in enumerate(v):
        try:
            hp = _upstream(item, f"{path}[{i}]")
        except ValidationError as e:
            errors.extend(e.errors)
            continue
        if hp in out:
            errors.append(FieldError(f"{path}[{i}]", f"duplicate resolver {item!r}"))
        out.append(hp)
    if errors:
        raise ValidationError(errors)
    return tuple(out)


def _listen(v: Any, path: str) -> HostPort:
    if not isinstance(v, str):
        raise _fail(path, "must be a string")
    try:
        host, port, bracketed = _split_hostport(v, None)
    except ValueError as e:
        raise _fail(path, f"{v!r}: {e}") from None
    ip = _ip_for(host, bracketed)
    if ip is not None:
        return str(ip), port
    if not bracketed and len(host) <= 253 and _HOSTNAME_RE.fullmatch(host):
        return host, port
    raise _fail(path, f"{v!r} must be \"host:port\" (IPv6 as \"[addr]:port\")")


# --- sections ---------------------------------------------------------------------------------

_SECTIONS: dict[str, tuple[type, dict[str, Check]]] = {
    "dns": (DnsConfig, {
        "upstreams": _upstreams,
        "deny_rcode": _choice(DENY_RCODES),
        "min_ttl": _int(0, 86400),
        "listen_port": _int(1, 65535),
        "upstream_timeout_ms": _int(100, 2000),
        "max_ips_per_name": _int(1, 4096),
        "rate_limit_qps": _int(0, 1_000_000),
        "rate_limit_burst": _int(0, 1_000_000),
        "max_inflight": _int(1, 1_000_000),
        "special_addresses": _choice(SPECIAL_ADDRESS_MODES),
    }),
    "enforcement": (EnforcementConfig, {
        "deny_action": _choice(DENY_ACTIONS),
        "nflog_group": _int(1, 65535),
        "log_rate": _int(1, 100_000),
    }),
    "api": (ApiConfig, {
        "socket": _abs_path,
        "socket_group": _pattern(_GROUP_RE, "group name"),
        "tcp_listen": _listen,
        "metrics_listen": _listen,
        "token_file": _abs_path,
    }),
    "collector": (CollectorConfig, {"url": _url}),
    "state": (StateConfig, {"dir": _abs_path}),
    "limits": (LimitsConfig, {"max_destinations": _int(1, 1_000_000)}),
    "policies": (PoliciesConfig, {"dir": _abs_path, "default_policy": _file_name}),
    "log": (LogConfig, {"level": _choice(LOG_LEVELS)}),
}
_TOP_SCALARS: dict[str, Check] = {
    "account_id": _pattern(_ACCOUNT_RE, "account id"),
    "node": _pattern(_NODE_RE, "node name"),
}
_TOP_KEYS = (*_TOP_SCALARS, *_SECTIONS, "workspaces", "workloads")


def _unknown(path: str, key: Any, known: tuple[str, ...] | list[str]) -> FieldError:
    hint = difflib.get_close_matches(str(key), list(known), n=1)
    return FieldError(path, "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _values(
    doc: dict, path: str, checks: dict[str, Check], errors: list[FieldError]
) -> dict[str, Any]:
    """Check the keys of ``doc`` present in ``checks``; report the others as unknown."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        check = checks.get(key)
        if check is None:
            errors.append(_unknown(_join(path, key), key, list(checks)))
            continue
        try:
            out[key] = check(value, _join(path, key))
        except ValidationError as e:
            errors.extend(e.errors)
    return out


def _section(name: str, doc: Any, errors: list[FieldError]) -> Any:
    cls, checks = _SECTIONS[name]
    if not isinstance(doc, dict):
        errors.append(FieldError(name, "must be a table"))
        return None
    n = len(errors)
    values = _values(doc, name, checks, errors)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in doc:
            errors.append(FieldError(_join(name, f.name), "is required"))
    return cls(**values) if len(errors) == n else None


def _array(
    doc: dict, key: str, parse: Callable[[Any, str], Any], errors: list[FieldError]
) -> list[tuple[int, Any]]:
    """Parse the ``[[key]]`` items. Returns (index, object) of the valid ones, minus duplicates."""
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        errors.append(FieldError(key, f"must be an array of tables ([[{key}]])"))
        return []
    out: list[tuple[int, Any]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        try:
            obj = parse(item, f"{key}[{i}]")
        except ValidationError as e:
            errors.extend(e.errors)
            continue
        oid = obj.workload_id if isinstance(obj, Workload) else obj.workspace_id
        if oid in seen:
            what = "workload" if isinstance(obj, Workload) else "workspace"
            errors.append(FieldError(f"{key}[{i}].id",
                                     f"duplicate {what} id {oid!r} (also {key}[{seen[oid]}])"))
            continue
        seen[oid] = i
        out.append((i, obj))
    return out


def config_from_dict(doc: Any) -> Config:
    """Validate a decoded config document. Raises ValidationError with every problem found."""
    if not isinstance(doc, dict):
        raise ValidationError(FieldError("", "the config must be a table"))
    errors: list[FieldError] = []
    for key in doc:
        if key not in _TOP_KEYS:
            errors.append(_unknown(str(key), key, _TOP_KEYS))
    top = _values({k: v for k, v in doc.items() if k in _TOP_SCALARS}, "", _TOP_SCALARS, errors)
    sections = {name: _section(name, doc.get(name, {}), errors) for name in _SECTIONS}
    api = sections["api"]
    if api is not None and api.tcp_listen is not None and api.token_file is None:
        errors.append(FieldError("api.token_file", "is required when api.tcp_listen is set"))
    bindings = _array(doc, "workspaces", lambda o, p: parse_binding(o, p, id_key="id"), errors)
    workloads = _array(doc, "workloads", lambda o, p: parse_workload(o, p, id_key="id"), errors)
    errors.extend(check_overlaps([w for _, w in workloads],
                                 [f"workloads[{i}]" for i, _ in workloads]))
    if errors:
        raise ValidationError(errors)
    return Config(
        **top,
        **sections,
        workspaces=tuple(b for _, b in bindings),
        workloads=tuple(w for _, w in workloads),
    )


def parse_config(text: str, path_hint: str = "") -> Config:
    """Parse and validate TOML config text. ``path_hint`` (the file name) prefixes syntax errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = f"{path_hint}: " if path_hint else ""
        raise ValidationError(FieldError("", f"{where}invalid TOML: {e}")) from None
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        where = f"{path_hint}: " if path_hint else ""
        raise ValidationError(FieldError("", f"{where}invalid TOML: nested too deeply")) from None
    try:
        return config_from_dict(doc)
    except RecursionError:
        raise ValidationError(FieldError("", "a value is nested too deeply")) from None


EXAMPLE_CONFIG = """\
# egressd configuration: /etc/egressd/egressd.toml
#
# Every key is shown with its default value, except dns.upstreams, which has no default and
# must be set. Check a change with:  egressd check-config /etc/egressd/egressd.toml

# Copied into every denial event (column account_id of system.access.outbound_network).
account_id = "node-1"
# This node's name in events (column node). Empty means the host name.
node = ""

[dns]
# REQUIRED. Resolvers the DNS shim forwards allowed names to, tried in order: "IPv4",
# "IPv4:port", "[IPv6]" or "[IPv6]:port" (the port defaults to 53). IP addresses only:
# a resolver cannot depend on DNS. 203.0.113.2 is a documentation address: replace it.
upstreams = ["203.0.113.2:53"]
# Answer to a denied name, with Extended DNS Error 15 "Blocked": "NXDOMAIN" or "REFUSED".
deny_rcode = "NXDOMAIN"
# An allowed IP stays in the allow set at least this long (seconds, 0..86400).
min_ttl = 30
# Port of the DNS shim on this node. Workload queries to port 53 of any address (UDP and
# TCP) are redirected to it.
listen_port = 10053
# Time budget (ms, 100..2000) to get an answer from the upstreams before answering SERVFAIL.
upstream_timeout_ms = 1800
# At most this many addresses (A and AAAA) of one name go into the allow set (1..4096).
max_ips_per_name = 64
# DNS queries per second each workload may send (a token bucket of rate_limit_burst
# queries that refills at rate_limit_qps). A query over the limit gets REFUSED at once, with
# Extended DNS Error 0 "rate limited", no upstream query and no event; rejected queries are
# counted per workspace (egressd_dns_rate_limited_total). Beyond 4x rate_limit_qps (burst
# 2x rate_limit_burst) the kernel drops a source's UDP queries before they reach the shim
# (egressd_dns_flood_drops_total). 0 in either key disables both. The node itself is never
# limited.
rate_limit_qps = 500
rate_limit_burst = 1000
# At most this many forwarded queries wait on the upstreams at once (1..1000000); a query
# beyond that gets SERVFAIL at once (egressd_dns_events_total{kind="overload"}).
max_inflight = 2048
# An allowed name whose answer holds a special address (loopback, link-local such as the
# metadata service 169.254.169.254, multicast, unspecified, broadcast, or one of this node's
# own addresses, IPv4-mapped forms included) never gets that address into the allow set
# (egressd_dns_filtered_addresses_total). "answer-closed": the answer is still released,
# the special addresses stay closed. "refuse": the whole answer becomes SERVFAIL.
# special_addresses = "answer-closed"

[enforcement]
# A denied new flow is "reject"ed (ICMP admin-prohibited or TCP reset: the client fails at
# once) or "drop"ped (the client times out).
deny_action = "reject"
# Denied new flows are logged through this NFLOG group (1..65535) to the daemon.
nflog_group = 1053
# Packet denials logged per second per workload source address (the burst is twice this);
# the kernel counts what the limit suppresses (egressd_log_suppressed_packets_total).
log_rate = 50

[api]
# The admin API listens on this unix socket, mode 0660.
socket = "/run/egressd/api.sock"
# Members of this group may use the socket, and so push policies.
socket_group = "egressd"
# Optional TCP listener, "host:port" or "[IPv6]:port". Every request on it then needs
# "Authorization: Bearer <token>"; the token is read from token_file, required then.
# tcp_listen = "127.0.0.1:9181"
# token_file = "/etc/egressd/api.token"
# Optional listener that serves only GET /metrics (Prometheus), without a token.
# metrics_listen = "127.0.0.1:9182"

[collector]
# egress-collector, which stores the denial events (an http:// or https:// URL).
url = "http://127.0.0.1:9180"

[state]
# Policies, bindings and workloads pushed over the API, and the event spool, survive
# restarts here.
dir = "/var/lib/egressd"

[limits]
# Per workspace: the entries of its policy plus its connections (1..1000000). A change
# that would put a workspace over it is refused whole.
max_destinations = 2000

[policies]
# *.json policies baked into the node image, loaded at start. The API can override them.
dir = "/etc/egressd/policies.d"
# File (in dir, or an absolute path) with the starting default-policy. Optional: without
# the file, default-policy is FULL_ACCESS. "" means never read one.
default_policy = "default-policy.json"

[log]
# Log level: "debug", "info", "warning" or "error".
level = "info"

# Baked workspace bindings. A workspace without one uses default-policy. The API can
# change them later. One [[workspaces]] table per workspace:
# [[workspaces]]
# id = "1001"
# network_policy_id = "restricted-etl"

# Static workloads: the source addresses of a workspace's traffic on this node, and its
# product: DBSQL, ML_SERVING, GENERAL_COMPUTE, ML_BUILD or APPS. More come and go over
# the API. A source is a CIDR or a single address; no address may belong to two workloads.
# [[workloads]]
# id = "ws1-notebook"
# workspace_id = "1001"
# product = "GENERAL_COMPUTE"
# sources = ["10.77.1.2/32", "2001:db8:77:1::2/128"]
"""
