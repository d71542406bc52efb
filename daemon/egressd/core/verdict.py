"""Verdicts: what a policy says about one DNS name or one destination IP.

``CompiledPolicy`` precomputes a policy for fast questions. Order of evaluation:

    FULL_ACCESS ............................. ALLOW
    blocked_internet_destinations match ..... denial (blocked always wins)
    allowed internet / storage / extra match  ALLOW
    otherwise ............................... denial

A denial is ``LOG_ONLY_DENIAL`` when the policy is in dry run for the product, else ``DROP``.
Extra names and networks come from a workspace's connections and external locations.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .names import NameMatcher, normalize_name, normalize_pattern
from .policy import DestinationType, Policy
from .storage import storage_host

__all__ = ["Verdict", "Decision", "CompiledPolicy", "NO_MATCH_REASON", "IP_NO_MATCH_REASON"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NO_MATCH_REASON = "no allowed destination matches"
IP_NO_MATCH_REASON = (
    "not in an allowed IP_RANGE (IPs of allowed names are allowed once resolved through the egressd DNS shim)"
)


class Verdict(StrEnum):
    ALLOW = "ALLOW"
    DROP = "DROP"
    LOG_ONLY_DENIAL = "LOG_ONLY_DENIAL"


@dataclass(frozen=True)
class Decision:
    """The answer for one destination. ``destination_type`` is "DNS", "IP" or "STORAGE"."""

    verdict: Verdict
    network_policy_id: str
    reason: str
    matched: str | None
    destination_type: str

    @property
    def passes(self) -> bool:
        """True unless the destination is blocked (LOG_ONLY_DENIAL lets traffic through)."""
        return self.verdict is not Verdict.DROP


Span = tuple[int, int, int]  # (IP version, first address, last address)
Tag = int | str  # what a match points at: an index into the policy's list, or a label


def _span(net: IPNetwork) -> Span:
    return (net.version, int(net.network_address), int(net.broadcast_address))


def merge_ranges(spans: Iterable[Span], version: int) -> list[tuple[int, int]]:
    """The union of the spans of one IP version as sorted, disjoint, non-adjacent (first, last)
    integer ranges. Integers, not ipaddress objects: a policy may hold 100,000 ranges."""
    out: list[tuple[int, int]] = []
    for _v, first, last in sorted([sp for sp in spans if sp[0] == version]):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def _networks(ranges: list[tuple[int, int]], version: int) -> list[IPNetwork]:
    addr = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return [n for a, b in ranges for n in ipaddress.summarize_address_range(addr(a), addr(b))]


class CompiledPolicy:
    """A policy plus a workspace's extra destinations, ready for ``decide_name`` / ``decide_ip``."""

    def __init__(
        self,
        policy: Policy,
        extra_names: Iterable[tuple[str, str]] = (),
        extra_networks: Iterable[tuple[str, str]] = (),
    ):
        self._policy = policy
        # Tags: an entry of the policy's internet lists by its index (its label, which names it,
        # is written when a decision needs it: 100,000 labels cost more than the rest of the
        # compile); anything else by its label.
        allowed: list[tuple[str, Tag]] = []
        blocked: list[tuple[str, Tag]] = []
        allowed_nets: list[tuple[Span, Tag]] = []
        blocked_nets: list[tuple[Span, Tag]] = []
        ip_range = DestinationType.IP_RANGE  # a local: the enum's class attribute is a slow lookup
        for entries, names, nets in (
            (policy.allowed_internet, allowed, allowed_nets),
            (policy.blocked_internet, blocked, blocked_nets),
        ):
            names += [(d.destination, i) for i, d in enumerate(entries) if d.type is not ip_range]
            nets += [(d.span or _span(ipaddress.ip_network(d.destination)), i)
                     for i, d in enumerate(entries) if d.type is ip_range]
        for i, storage in enumerate(policy.allowed_storage):
            label = f"allowed_storage_destinations[{i}] ({storage.describe()})"
            allowed.extend((name, label) for name in storage.names())
        allowed.extend((normalize_pattern(name), label) for name, label in extra_names)
        allowed_nets.extend((_span(ipaddress.ip_network(cidr)), label) for cidr, label in extra_networks)
        if not policy.restricted:  # FULL_ACCESS: the lists are kept but ignored
            allowed, blocked, allowed_nets, blocked_nets = [], [], [], []
        self._allowed_names: NameMatcher[Tag] = NameMatcher(allowed)
        self._blocked_names: NameMatcher[Tag] = NameMatcher(blocked)
        self._allowed_nets = allowed_nets
        self._blocked_nets = blocked_nets
        allowed_spans = [sp for sp, _ in allowed_nets]
        blocked_spans = [sp for sp, _ in blocked_nets]
        self.allowed_ranges_v4 = merge_ranges(allowed_spans, 4)
        self.allowed_ranges_v6 = merge_ranges(allowed_spans, 6)
        self.blocked_ranges_v4 = merge_ranges(blocked_spans, 4)
        self.blocked_ranges_v6 = merge_ranges(blocked_spans, 6)

    # The same unions as ipaddress networks (for people and tests; the renderer uses the ranges).
    @property
    def allowed_networks_v4(self) -> list[IPNetwork]:
        return _networks(self.allowed_ranges_v4, 4)

    @property
    def allowed_networks_v6(self) -> list[IPNetwork]:
        return _networks(self.allowed_ranges_v6, 6)

    @property
    def blocked_networks_v4(self) -> list[IPNetwork]:
        return _networks(self.blocked_ranges_v4, 4)

    @property
    def blocked_networks_v6(self) -> list[IPNetwork]:
        return _networks(self.blocked_ranges_v6, 6)

    @property
    def policy(self) -> Policy:
        return self._policy

    def _deny(self, product: str, reason: str, matched: str | None, destination_type: str) -> Decision:
        verdict = Verdict.LOG_ONLY_DENIAL if self._policy.is_dry_run(product) else Verdict.DROP
        return Decision(verdict, self._policy.network_policy_id, reason, matched, destination_type)

    @staticmethod
    def _label(tag: Tag, list_name: str, entries: tuple) -> str:
        """What a decision names as its match: ``list[i] (destination)`` for an entry of the
        policy's internet lists, else the label it was given."""
        if type(tag) is int:
            return f"{list_name}[{tag}] ({entries[tag].destination})"
        return tag  # type: ignore[return-value]

    def _allow(self, reason: str, matched: str | None, destination_type: str) -> Decision:
        return Decision(Verdict.ALLOW, self._policy.network_policy_id, reason, matched, destination_type)

    def decide_name(self, name: str, product: str) -> Decision:
        """Decide a DNS name as queried (any case, trailing dot, Unicode or punycode)."""
        if not self._policy.restricted:
            return self._allow("FULL_ACCESS", None, "DNS")
        try:
            normalized = normalize_name(name)
        except ValueError:
            return self._deny(product, "invalid name", None, "DNS")
        kind = "STORAGE" if storage_host(normalized) is not None else "DNS"
        tag = self._blocked_names.match(normalized)
        if tag is not None:
            blocked = self._label(tag, "blocked_internet_destinations", self._policy.blocked_internet)
            return self._deny(product, f"blocked by {blocked}", blocked, kind)
        tag = self._allowed_names.match(normalized)
        if tag is not None:
            allowed = self._label(tag, "allowed_internet_destinations", self._policy.allowed_internet)
            return self._allow(f"allowed by {allowed}", allowed, kind)
        return self._deny(product, NO_MATCH_REASON, None, kind)

    def decide_ip(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, product: str) -> Decision:
        """Decide a destination IP by IP_RANGE entries only. Raise ValueError for an invalid IP.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is decided as its IPv4 address.
        """
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not self._policy.restricted:
            return self._allow("FULL_ACCESS", None, "IP")
        tag = _best(address, self._blocked_nets)
        if tag is not None:
            blocked = self._label(tag, "blocked_internet_destinations", self._policy.blocked_internet)
            return self._deny(product, f"blocked by {blocked}", blocked, "IP")
        tag = _best(address, self._allowed_nets)
        if tag is not None:
            allowed = self._label(tag, "allowed_internet_destinations", self._policy.allowed_internet)
            return self._allow(f"allowed by {allowed}", allowed, "IP")
        return self._deny(product, IP_NO_MATCH_REASON, None, "IP")


def _best(address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[tuple[Span, Tag]]) -> Tag | None:
    """The tag of the most specific range containing the address (first one on ties), or None."""
    value, version = int(address), address.version
    best: tuple[int, Tag] | None = None
    for (v, first, last), label in nets:
        if v == version and first <= value <= last and (best is None or last - first < best[0]):
            best = (last - first, label)
    return None if best is None else best[1]
