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
        allowed: list[tuple[str, str]] = []
        blocked: list[tuple[str, str]] = []
        allowed_nets: list[tuple[Span, str]] = []
        blocked_nets: list[tuple[Span, str]] = []
        for entries, names, nets, list_name in (
            (policy.allowed_internet, allowed, allowed_nets, "allowed_internet_destinations"),
            (policy.blocked_internet, blocked, blocked_nets, "blocked_internet_destinations"),
        ):
            ip_range = DestinationType.IP_RANGE  # a local: the enum's class attribute is a slow lookup
            for i, dest in enumerate(entries):
                label = f"{list_name}[{i}] ({dest.destination})"
                if dest.type is ip_range:
                    nets.append((dest.span or _span(ipaddress.ip_network(dest.destination)), label))
                else:
                    names.append((dest.destination, label))
        for i, storage in enumerate(policy.allowed_storage):
            label = f"allowed_storage_destinations[{i}] ({storage.describe()})"
            allowed.extend((name, label) for name in storage.names())
        allowed.extend((normalize_pattern(name), label) for name, label in extra_names)
        allowed_nets.extend((_span(ipaddress.ip_network(cidr)), label) for cidr, label in extra_networks)
        if not policy.restricted:  # FULL_ACCESS: the lists are kept but ignored
            allowed, blocked, allowed_nets, blocked_nets = [], [], [], []
        self._allowed_names: NameMatcher[str] = NameMatcher(allowed)
        self._blocked_names: NameMatcher[str] = NameMatcher(blocked)
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
        blocked = self._blocked_names.match(normalized)
        if blocked is not None:
            return self._deny(product, f"blocked by {blocked}", blocked, kind)
        allowed = self._allowed_names.match(normalized)
        if allowed is not None:
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
        blocked = _best(address, self._blocked_nets)
        if blocked is not None:
            return self._deny(product, f"blocked by {blocked}", blocked, "IP")
        allowed = _best(address, self._allowed_nets)
        if allowed is not None:
            return self._allow(f"allowed by {allowed}", allowed, "IP")
        return self._deny(product, IP_NO_MATCH_REASON, None, "IP")


def _best(address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[tuple[Span, str]]) -> str | None:
    """The label of the most specific range containing the address (first one on ties), or None."""
    value, version = int(address), address.version
    best: tuple[int, str] | None = None
    for (v, first, last), label in nets:
        if v == version and first <= value <= last and (best is None or last - first < best[0]):
            best = (last - first, label)
    return None if best is None else best[1]
