"""The policy model: an ``AccountNetworkPolicy`` JSON object, validated into frozen dataclasses.

``parse_policy`` checks the whole object and reports every problem at once, each with its key path
(``egress.network_access.allowed_internet_destinations[3].destination``). Unknown keys are errors,
so a typo never silently weakens a policy; only a top-level ``account_id`` is accepted and ignored.
A null value counts as absent. ``Policy.to_dict`` gives the canonical object back, and
``parse_policy(p.to_dict()) == p`` for every policy.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from itertools import chain, compress, repeat
from operator import attrgetter, eq, itemgetter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..errors import FieldError, ValidationError
from .names import MAX_NAME_LENGTH, normalize_pattern
from .storage import StorageDestination, json_type, parse_storage_destination, quote, unknown_key_errors

__all__ = [
    "RestrictionMode",
    "EnforcementMode",
    "DestinationType",
    "PRODUCTS",
    "POLICY_ID_RE",
    "DEFAULT_POLICY_ID",
    "InternetDestination",
    "Policy",
    "parse_policy",
    "parse_internet_destination",
    "default_policy",
]


class RestrictionMode(StrEnum):
    FULL_ACCESS = "FULL_ACCESS"
    RESTRICTED_ACCESS = "RESTRICTED_ACCESS"


class EnforcementMode(StrEnum):
    ENFORCED = "ENFORCED"
    DRY_RUN = "DRY_RUN"


class DestinationType(StrEnum):
    DNS_NAME = "DNS_NAME"
    IP_RANGE = "IP_RANGE"


PRODUCTS = ("DBSQL", "ML_SERVING", "GENERAL_COMPUTE", "ML_BUILD", "APPS")
POLICY_ID_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,32}$")
DEFAULT_POLICY_ID = "default-policy"

_TOP_KEYS = ("network_policy_id", "egress", "account_id")
_EGRESS_KEYS = ("network_access",)
_ACCESS_KEYS = (
    "restriction_mode",
    "allowed_internet_destinations",
    "blocked_internet_destinations",
    "allowed_storage_destinations",
    "policy_enforcement",
)
_DEST_KEYS = ("destination", "internet_destination_type")
_DEST_KEY_SET = frozenset(_DEST_KEYS)
_ENFORCEMENT_KEYS = ("enforcement_mode", "dry_run_mode_product_filter")


@dataclass(frozen=True, slots=True)
class InternetDestination:
    """A normalized DNS_NAME pattern, or a canonical CIDR string for IP_RANGE."""

    destination: str
    type: DestinationType = DestinationType.DNS_NAME
    # An IP_RANGE as (IP version, first address, last address) integers, kept so that compiling a
    # policy does not parse it again.
    span: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, str]:
        # _value_, not .value: the enum's property costs a Python call, 100,000 times for a big policy
        return {"destination": self.destination, "internet_destination_type": self.type._value_}


@dataclass(frozen=True)
class Policy:
    """A validated AccountNetworkPolicy. Destination lists are kept under FULL_ACCESS but unused."""

    network_policy_id: str
    restriction_mode: RestrictionMode = RestrictionMode.FULL_ACCESS
    allowed_internet: tuple[InternetDestination, ...] = ()
    blocked_internet: tuple[InternetDestination, ...] = ()
    allowed_storage: tuple[StorageDestination, ...] = ()
    enforcement_mode: EnforcementMode = EnforcementMode.ENFORCED
    dry_run_products: frozenset[str] = field(default_factory=frozenset)

    @property
    def restricted(self) -> bool:
        return self.restriction_mode is RestrictionMode.RESTRICTED_ACCESS

    def is_dry_run(self, product: str) -> bool:
        """True when denials for this product are only logged. An empty filter means all products."""
        if self.enforcement_mode is not EnforcementMode.DRY_RUN:
            return False
        return not self.dry_run_products or product in self.dry_run_products

    def destination_count(self) -> int:
        """Entries that count toward max_destinations: allowed internet plus allowed storage."""
        return len(self.allowed_internet) + len(self.allowed_storage)

    def to_dict(self) -> dict[str, Any]:
        """The canonical SPEC-shaped JSON object, with every list present."""
        return {
            "network_policy_id": self.network_policy_id,
            "egress": {
                "network_access": {
                    "restriction_mode": self.restriction_mode.value,
                    "allowed_internet_destinations": _entries(self.allowed_internet),
                    "blocked_internet_destinations": _entries(self.blocked_internet),
                    "allowed_storage_destinations": [d.to_dict() for d in self.allowed_storage],
                    "policy_enforcement": {
                        "enforcement_mode": self.enforcement_mode.value,
                        "dry_run_mode_product_filter": [p for p in PRODUCTS if p in self.dry_run_products],
                    },
                }
            },
        }


def _entries(dests: tuple[InternetDestination, ...]) -> list[dict[str, str]]:
    """InternetDestination.to_dict of each, without a method call per entry (100,000 of them)."""
    return [{"destination": d.destination, "internet_destination_type": d.type._value_} for d in dests]


def default_policy() -> Policy:
    """The built-in ``default-policy``: FULL_ACCESS, enforced."""
    return Policy(DEFAULT_POLICY_ID)


class _Parser:
    """Walks one policy object, collecting FieldErrors instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.known: _Known | None = None

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def object(self, value: Any, path: str, keys: tuple[str, ...]) -> Mapping[str, Any] | None:
        """The value as a mapping with only known keys checked, or None (absent or wrong type)."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"must be an object, got {json_type(value)}")
            return None
        self.errors.extend(unknown_key_errors(value, keys, path))
        return value

    def list(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {json_type(value)}")
            return []
        return value

    def enum(self, value: Any, path: str, enum: type[StrEnum]) -> Any:
        if isinstance(value, str):
            member = enum._value2member_map_.get(value)
            if member is not None:
                return member
        self.error(path, f"{quote(value)} must be one of {', '.join(m.value for m in enum)}")
        return None

    def policy_id(self, value: Any) -> str | None:
        if value is None:
            self.error("network_policy_id", "is required")
        elif not isinstance(value, str):
            self.error("network_policy_id", f"must be a string, got {json_type(value)}")
        elif not POLICY_ID_RE.fullmatch(value):
            self.error("network_policy_id", f"{quote(value)} must match {POLICY_ID_RE.pattern}")
        else:
            return value
        return None

    def destinations(self, value: Any, path: str) -> tuple[InternetDestination, ...]:
        out: list[InternetDestination] = []
        # First index of each destination, keyed by (text, is IP_RANGE): plain tuples hash in C,
        # where the dataclass's hash calls the enum's (Python) __hash__, twice per entry.
        seen: dict[tuple[str, bool], int] = {}
        items = self.list(value, path)
        dests = _fast_entries(items, self.known)
        if set(map(type, dests)) == {InternetDestination} and len(set(map(_TEXT, dests))) == len(dests):  # type: ignore[arg-type]
            return tuple(dests)  # type: ignore[arg-type]  # every entry plain and valid, none twice
        for i, dest in enumerate(dests):
            item = items[i]
            if dest is None:  # not the plain case: the full parse, which words any error
                try:
                    dest = parse_internet_destination(item, f"{path}[{i}]")
                except ValidationError as exc:
                    self.errors.extend(exc.errors)
                    continue
            first = seen.setdefault((dest.destination, dest.type is DestinationType.IP_RANGE), i)
            if first != i:
                item_path = f"{path}[{i}]"
                list_name = path.rsplit(".", 1)[-1]
                message = f"{quote(dest.destination)} duplicates {list_name}[{first}]"
                self.error(f"{item_path}.destination", message)
                continue
            out.append(dest)
        return tuple(out)

    def storage(self, value: Any, path: str) -> tuple[StorageDestination, ...]:
        out: list[StorageDestination] = []
        seen: dict[StorageDestination, int] = {}
        for i, item in enumerate(self.list(value, path)):
            try:
                dest = parse_storage_destination(item, f"{path}[{i}]")
            except ValidationError as exc:
                self.errors.extend(exc.errors)
                continue
            if dest in seen:
                self.error(f"{path}[{i}]", f"{dest.describe()} duplicates allowed_storage_destinations[{seen[dest]}]")
                continue
            seen[dest] = i
            out.append(dest)
        return tuple(out)

    def products(self, value: Any, path: str) -> frozenset[str]:
        out: set[str] = set()
        for i, item in enumerate(self.list(value, path)):
            if not isinstance(item, str) or item not in PRODUCTS:
                self.error(f"{path}[{i}]", f"{quote(item)} must be one of {', '.join(PRODUCTS)}")
            elif item in out:
                self.error(f"{path}[{i}]", f"{quote(item)} is listed twice")
            else:
                out.add(item)
        return frozenset(out)


class _Known:
    """The destinations of a previous version of a policy, by their canonical text (a DNS_NAME
    pattern never contains the "/" of an IP_RANGE's, so one dict holds both kinds), built only
    for a list that looks like an edit of them."""

    SAMPLE = 200  # positions compared before deciding whether the lookups are worth it

    def __init__(self, dests: tuple[InternetDestination, ...]) -> None:
        self._dests = dests
        self._by_text: dict[str, InternetDestination] | None = None

    @property
    def lookup(self) -> Callable[[Any], InternetDestination | None]:
        """text -> the destination of either kind written so, or None."""
        if self._by_text is None:
            # 100,000 entries: 30-60 ms (reading each text's hash is a cache miss or two)
            self._by_text = dict(zip(map(_TEXT, self._dests), self._dests))
        return self._by_text.get

    def worth_it(self, raws: list[Any]) -> bool:
        """Whether a list of entries (their texts; None for another shape) looks like an edit
        that keeps enough of the previous version to look each entry up: at least one in 20 of
        up to SAMPLE positions, spread over the list, holds the text the previous version holds
        there (or next to it). Not for a policy rewritten whole, where every lookup would only
        cost time; a list that is the previous one shifted far is parsed afresh (the same
        result, more slowly)."""
        old, n = self._dests, len(raws)
        if not n or not old:
            return False
        picks = range(0, n, max(1, n // self.SAMPLE))
        hits = sum(1 for i in picks if raws[i] in [d.destination for d in old[max(0, i - 2):i + 3]])
        return hits * 20 >= len(picks)


_TEXT = attrgetter("destination")  # an InternetDestination's text


def _fast_entries(items: list[Any], known: _Known | None) -> list[InternetDestination | None]:
    """_fast_destination of each entry (None: the full parse decides), the common case of a big
    policy taken a list at a time, with C-level maps where a loop of Python calls cost 2-3 us
    an entry (a policy may hold 100,000): an entry the previous version holds is taken from it;
    the canonical DNS names, and the canonical IPv4 CIDRs, are each checked by one match over
    all of them. Where a list fails its match, each of its entries is decided alone, as
    _fast_destination does."""
    n = len(items)
    if not n:
        return []
    all_plain = False  # every entry an object of known keys with a string destination
    if set(map(type, items)) == {dict} and set(chain.from_iterable(items)) <= _DEST_KEY_SET:
        raws: list[Any] = list(map(dict.get, items, repeat("destination")))
        kinds: list[Any] = list(map(dict.get, items, repeat("internet_destination_type"), repeat("DNS_NAME")))
        all_plain = set(map(type, raws)) == {str}
        if not all_plain:
            raws = [r if type(r) is str else None for r in raws]
    else:
        plains = [_plain_entry(item) for item in items]
        raws = [p[0] if p is not None else None for p in plains]
        kinds = [p[1] if p is not None else None for p in plains]
    out: list[InternetDestination | None] = [None] * n
    known_used = known is not None and known.worth_it(raws)
    if known_used:
        out = [d if d is not None and d.type._value_ == k else None
               for d, k in zip(map(known.lookup, raws), kinds)]  # type: ignore[union-attr]
    if all_plain and not known_used:
        names = list(compress(range(n), map(eq, kinds, repeat("DNS_NAME"))))
        v4 = list(compress(range(n), map(eq, kinds, repeat("IP_RANGE"))))
    else:
        names = [i for i in range(n) if out[i] is None and kinds[i] == "DNS_NAME" and raws[i] is not None]
        v4 = [i for i in range(n) if out[i] is None and kinds[i] == "IP_RANGE" and raws[i] is not None]
    if names:
        sub = [raws[i] for i in names]
        if _all_canonical_names(sub):
            for i, dest in zip(names, map(InternetDestination, sub)):
                out[i] = dest
        else:
            for i, raw in zip(names, sub):
                out[i] = _fast_plain(raw, "DNS_NAME")
    if v4:
        sub = [raws[i] for i in v4]
        lines = _lines(sub)
        if lines is not None and _V4_CIDR_LINES.fullmatch(lines):
            for i, dest in zip(v4, _canonical_v4_dests(sub)):
                out[i] = dest
        else:
            for i, raw in zip(v4, sub):
                out[i] = _fast_plain(raw, "IP_RANGE")
    return out


def _canonical_v4_dests(texts: list[str]) -> list[InternetDestination | None]:
    """_fast_plain of IP_RANGE strings that each match _V4_CIDR (a canonical dotted quad, an
    optional prefix length), the addresses converted by C-level maps: None where host bits are
    set (ipaddress then words the error)."""
    parts = list(map(str.partition, texts, repeat("/")))
    octets = map(int, chain.from_iterable(map(str.split, map(itemgetter(0), parts), repeat("."))))
    values = struct.unpack(f">{len(texts)}I", bytes(octets))
    ip_range = DestinationType.IP_RANGE
    lengths = set(map(itemgetter(2), parts))
    if lengths <= {"", "32"}:  # single addresses only (the common case of a long list): no loop
        canonical = texts if "" not in lengths else [f"{p[0]}/32" for p in parts]
        return list(map(InternetDestination, canonical, repeat(ip_range), zip(repeat(4), values, values)))
    out: list[InternetDestination | None] = []
    for text, (_, slash, plen), value in zip(texts, parts, values):
        if not slash:
            out.append(InternetDestination(f"{text}/32", ip_range, (4, value, value)))
            continue
        hostmask = (1 << (32 - int(plen))) - 1
        out.append(None if value & hostmask else InternetDestination(text, ip_range, (4, value, value | hostmask)))
    return out


def _lines(raws: list[str]) -> str | None:
    """The strings one per line, or None when one of them holds a line break itself."""
    text = "\n".join(raws)
    return text if text.count("\n") == len(raws) - 1 else None


def _all_canonical_names(raws: list[str]) -> bool:
    """True when every string is what _fast_plain takes as it is: a canonical DNS_NAME pattern
    (_CANONICAL_PATTERN) of at most MAX_NAME_LENGTH characters that does not look like an IP."""
    lines = _lines(raws)
    return (lines is not None and max(map(len, raws)) <= MAX_NAME_LENGTH
            and _CANONICAL_LINES.fullmatch(lines) is not None and _IP_LINE.search(lines) is None)


def _plain_entry(obj: Any) -> tuple[str, Any] | None:
    """(destination, type as given) of an entry that is an object of known keys with a string
    destination; None otherwise."""
    if type(obj) is not dict or not obj.keys() <= _DEST_KEY_SET:
        return None
    raw = obj.get("destination")
    if type(raw) is not str:
        return None
    return raw, obj.get("internet_destination_type", "DNS_NAME")


def _fast_destination(obj: Any) -> InternetDestination | None:
    """The plain, valid case of an entry, decided without building error paths; None otherwise
    (the full parse then decides, and words any error). A policy may hold 100,000 entries."""
    plain = _plain_entry(obj)
    return None if plain is None else _fast_plain(*plain)


def _fast_plain(raw: str, kind: Any) -> InternetDestination | None:
    """_fast_destination of an entry already taken apart by _plain_entry."""
    if kind == "DNS_NAME":
        if "*" in raw[2:] or _IP_CHARS.fullmatch(raw):
            return None
        if len(raw) <= MAX_NAME_LENGTH and _CANONICAL_PATTERN.fullmatch(raw):
            return InternetDestination(raw)  # already what normalize_pattern would return
        try:
            return InternetDestination(normalize_pattern(raw))
        except ValueError:
            return None
    if kind == "IP_RANGE":
        return _fast_v4_dest(raw)
    return None


# A DNS_NAME pattern in canonical form: lower-case labels, no trailing dot, and a wildcard only
# as the whole first label of a name of at least three.
_CANONICAL_PATTERN = re.compile(r"(?:\*\.[a-z0-9_-]{1,63}\.)?(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_CANONICAL_LINES = re.compile(rf"(?:{_CANONICAL_PATTERN.pattern}\n)*{_CANONICAL_PATTERN.pattern}")


def parse_internet_destination(obj: Any, path: str) -> InternetDestination:
    """Validate one internet destination entry; raise ValidationError with every problem."""
    if not isinstance(obj, Mapping):
        raise ValidationError([FieldError(path, f"must be an object, got {json_type(obj)}")])
    p = _Parser()
    p.errors.extend(unknown_key_errors(obj, _DEST_KEYS, path))
    kind = DestinationType.DNS_NAME
    if obj.get("internet_destination_type") is not None:
        kind = p.enum(obj["internet_destination_type"], f"{path}.internet_destination_type", DestinationType)
    raw = obj.get("destination")
    dest_path = f"{path}.destination"
    value = None
    if raw is None:
        p.error(dest_path, "is required")
    elif not isinstance(raw, str):
        p.error(dest_path, f"must be a string, got {json_type(raw)}")
    elif kind is DestinationType.DNS_NAME:
        value = _parse_dns_pattern(raw, dest_path, p)
    elif kind is DestinationType.IP_RANGE:
        value = _parse_cidr(raw, dest_path, p)
    if p.errors or value is None or kind is None:
        raise ValidationError(p.errors)
    if isinstance(value, str):
        return InternetDestination(value, kind)
    return InternetDestination(value[0], kind, value[1])


_IP_CHARS = re.compile(r"[0-9A-Fa-f:./%]+")
_IP_LINE = re.compile(r"^[0-9A-Fa-f:./%]+$", re.MULTILINE)


def _parse_dns_pattern(raw: str, path: str, p: _Parser) -> str | None:
    try:
        if not _IP_CHARS.fullmatch(raw.strip()):
            raise ValueError  # letters beyond hex: not an address (the cheap test, taken first)
        ipaddress.ip_network(raw.strip())
    except ValueError:
        pass
    else:
        message = "is an IP address or range, not a DNS_NAME (use internet_destination_type IP_RANGE)"
        p.error(path, f"{quote(raw)} {message}")
        return None
    try:
        return normalize_pattern(raw)
    except ValueError as exc:
        p.error(path, f"{quote(raw)} is not a valid DNS_NAME pattern ({exc})")
        return None


# A canonical dotted quad (no leading zeros, octets <= 255) and prefix length (<= 32, no leading
# zero), decided by the expression itself: what it does not match, ipaddress decides (and words).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4_CIDR_TEXT = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(?:3[0-2]|[12]?[0-9]))?"
_V4_CIDR = re.compile(_V4_CIDR_TEXT)
_V4_CIDR_LINES = re.compile(rf"(?:{_V4_CIDR_TEXT}\n)*{_V4_CIDR_TEXT}")  # a list of them, one per line


Span = tuple[int, int, int]


def _fast_v4(text: str) -> tuple[str, Span] | None:
    """The common case, a canonical IPv4 CIDR, without ipaddress (a policy may hold 100,000 of
    them): (canonical text, span). None means: let ipaddress decide (and word the error)."""
    dest = _fast_v4_dest(text)
    return None if dest is None else (dest.destination, dest.span)  # type: ignore[return-value]


def _fast_v4_dest(text: str) -> InternetDestination | None:
    """_fast_v4 as a destination (IP_RANGE), or None."""
    return _canonical_v4_dests([text])[0] if _V4_CIDR.fullmatch(text) else None


def _parse_cidr(raw: str, path: str, p: _Parser) -> tuple[str, Span] | None:
    text = raw.strip()
    fast = _fast_v4(text)
    if fast is not None:
        return fast
    try:
        net = ipaddress.ip_network(text)
        return str(net), (net.version, int(net.network_address), int(net.broadcast_address))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        p.error(path, f"{quote(raw)} is not a valid IP_RANGE (expected an IPv4 or IPv6 CIDR like 198.51.100.0/24)")
        return None
    p.error(path, f"{quote(raw)} is not a valid IP_RANGE (host bits are set; did you mean {loose}?)")
    return None


def parse_policy(obj: Any, previous: Policy | None = None) -> Policy:
    """Validate an AccountNetworkPolicy JSON object. Raise ValidationError listing every problem.

    Without ``egress`` the policy is FULL_ACCESS; with it, ``restriction_mode`` is required.
    ``previous`` (the policy this one replaces, if any): an entry written exactly as one of its
    destinations, in canonical form, is that destination, taken without parsing it again (an
    edit of a policy of 100,000 destinations re-parsed every one); the result is the same.
    """
    p = _Parser()
    if previous is not None:
        p.known = _Known(previous.allowed_internet + previous.blocked_internet)
    if not isinstance(obj, Mapping):
        raise ValidationError([FieldError("", f"a policy must be a JSON object, got {json_type(obj)}")])
    top = p.object(obj, "", _TOP_KEYS) or {}
    policy_id = p.policy_id(top.get("network_policy_id"))
    egress = p.object(top.get("egress"), "egress", _EGRESS_KEYS)
    if egress is None:
        if p.errors:
            raise ValidationError(p.errors)
        return Policy(policy_id or DEFAULT_POLICY_ID)
    path = "egress.network_access"
    access = p.object(egress.get("network_access"), path, _ACCESS_KEYS)
    if access is None:
        if egress.get("network_access") is None:
            p.error(path, "is required when egress is given")
        raise ValidationError(p.errors)
    mode = None
    if access.get("restriction_mode") is None:
        p.error(f"{path}.restriction_mode", "is required (FULL_ACCESS or RESTRICTED_ACCESS)")
    else:
        mode = p.enum(access["restriction_mode"], f"{path}.restriction_mode", RestrictionMode)
    allowed = p.destinations(access.get("allowed_internet_destinations"), f"{path}.allowed_internet_destinations")
    blocked = p.destinations(access.get("blocked_internet_destinations"), f"{path}.blocked_internet_destinations")
    storage = p.storage(access.get("allowed_storage_destinations"), f"{path}.allowed_storage_destinations")
    enforcement_path = f"{path}.policy_enforcement"
    enforcement = p.object(access.get("policy_enforcement"), enforcement_path, _ENFORCEMENT_KEYS) or {}
    enforcement_mode = EnforcementMode.ENFORCED
    if enforcement.get("enforcement_mode") is not None:
        enforcement_mode = p.enum(
            enforcement["enforcement_mode"], f"{enforcement_path}.enforcement_mode", EnforcementMode
        )
    products = p.products(
        enforcement.get("dry_run_mode_product_filter"), f"{enforcement_path}.dry_run_mode_product_filter"
    )
    if p.errors:
        raise ValidationError(p.errors)
    assert policy_id is not None and mode is not None and enforcement_mode is not None
    return Policy(policy_id, mode, allowed, blocked, storage, enforcement_mode, products)
