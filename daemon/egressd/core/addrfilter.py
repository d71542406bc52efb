"""Answer addresses that must never open a hole in an allow set: the special-purpose ones.

An allowed name is only as trustworthy as whoever answers for it. A hostile zone (or upstream)
can point ``pypi.example`` at 127.0.0.1, at the cloud metadata service or at the node itself;
programming that address would let a restricted workload reach the node's own services or
the instance credentials behind 169.254.169.254. So every address of an allowed answer is
classified before it is programmed:

    answer (ip, ttl)… ──split(addrs, node)──▶ kept (programmed, answer order kept)
                                           └─▶ filtered (ip, reason): counted, never programmed

Reasons, first match wins: ``unspecified`` (0.0.0.0/8, ::), ``loopback`` (127/8, ::1),
``metadata-service`` (169.254.169.254, AWS's fd00:ec2::254, Alibaba's 100.100.100.200),
``link-local`` (169.254/16, fe80::/10), ``multicast`` (224/4, ff00::/8), ``broadcast``
(255.255.255.255), ``node-address`` (one of the node's own addresses). IPv6 addresses that
embed an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64
64:ff9b::a.b.c.d) are judged by the address they embed. Other private ranges (10/8, 172.16/12,
192.168/16, 100.64/10, fc00::/7) stay allowed: private endpoints are real destinations.

Pure: no I/O; time is passed in (``FilterCounters.warn_due``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Container, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from ..errors import EgressdError
from .ratelimit import WarnLimiter

IP = IPv4Address | IPv6Address

#: Every reason classify() can return, in the order they are checked.
REASONS = (
    "unspecified", "loopback", "metadata-service", "link-local", "multicast", "broadcast", "node-address",
)
#: What ``[dns] special_addresses`` may say: release the answer with the special addresses left
#: closed, or turn the whole answer into SERVFAIL.
MODES = ("answer-closed", "refuse")

_METADATA = frozenset({
    IPv4Address("169.254.169.254"),  # AWS, GCP, Azure, OCI, OpenStack...
    IPv4Address("100.100.100.200"),  # Alibaba Cloud
    IPv6Address("fd00:ec2::254"),  # AWS IMDS over IPv6
})
_ZERO_NET = IPv4Network("0.0.0.0/8")  # "this network": never a valid destination
_BROADCAST = IPv4Address("255.255.255.255")
_COMPAT = IPv6Network("::/96")  # IPv4-compatible (deprecated, RFC 4291 2.5.5.1)
_NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


class SpecialAddressRefused(EgressdError):
    """An allowed answer held special addresses and ``special_addresses = "refuse"``."""


def embedded_v4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible or NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _COMPAT or ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _reason(ip: IP) -> str | None:
    if ip.is_unspecified or (ip.version == 4 and ip in _ZERO_NET):
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip in _METADATA:
        return "metadata-service"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip == _BROADCAST:
        return "broadcast"
    return None


_V4_METADATA = frozenset(int(a) for a in _METADATA if a.version == 4)


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_QUAD = re.compile(r"\.".join([_OCTET] * 4)).fullmatch


def _dotted_quad(text: str) -> int | None:
    """The integer of a strict dotted quad (four decimal octets, no leading zeros, as
    ip_address() takes them), or None. One regular-expression match (a loop over the octets
    in Python cost a few microseconds per answer on the unique-name path)."""
    m = _QUAD(text)
    if m is None:
        return None
    a, b, c, d = map(int, m.groups())
    return a << 24 | b << 16 | c << 8 | d


def _v4_reason(n: int) -> str | None:
    """_reason() of an IPv4 address given as an integer, by integer tests alone."""
    top = n >> 24
    if top == 0:
        return "unspecified"
    if top == 127:
        return "loopback"
    if n in _V4_METADATA:
        return "metadata-service"
    if n >> 16 == 0xA9FE:  # 169.254/16
        return "link-local"
    if n >> 28 == 0xE:  # 224/4
        return "multicast"
    if n == 0xFFFFFFFF:
        return "broadcast"
    return None


def classify(ip: str | IP, node_addresses: Container[IP] = ()) -> str | None:
    """Why ``ip`` must not be programmed (one of REASONS), or None when it may be.

    ``node_addresses`` holds ipaddress objects (the node's own addresses)."""
    if isinstance(ip, str) and ":" not in ip:
        # The common case, a dotted quad from an answer: integer tests, no ipaddress object
        # unless there are node addresses to compare with (ip_address() and its properties cost
        # some 10 us per address on the unique-name path). Anything else takes the general path
        # below, which raises ValueError as ip_address() does.
        n = _dotted_quad(ip)
        if n is not None:
            reason = _v4_reason(n)
            if reason is None and node_addresses and IPv4Address(n) in node_addresses:
                return "node-address"
            return reason
    addr = ip_address(ip) if isinstance(ip, str) else ip
    candidates: list[IP] = [addr]
    if addr.version == 6:
        if addr.scope_id:
            addr = IPv6Address(str(addr).split("%", 1)[0])
            candidates[0] = addr
        v4 = embedded_v4(addr)
        if v4 is not None:
            # "::" and "::1" are IPv4-compatible in form only: judge them as IPv6 first.
            candidates.append(v4)
    for a in candidates:
        reason = _reason(a)
        if reason is not None:
            return reason
    for a in candidates:
        if a in node_addresses:
            return "node-address"
    return None


def split(
    addrs: Iterable[tuple[str, int]], node_addresses: Container[IP] = ()
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(kept, filtered): the (ip, ttl) that may be programmed, in their order, and the
    (ip, reason) of those that may not."""
    kept: list[tuple[str, int]] = []
    filtered: list[tuple[str, str]] = []
    for ip, ttl in addrs:
        reason = classify(ip, node_addresses)
        if reason is None:
            kept.append((ip, ttl))
        else:
            filtered.append((ip, reason))
    return kept, filtered


class FilterCounters:
    """What the filter and the per-name cap kept out of the allow sets, and when to say so.

    ``filtered`` counts addresses by reason, ``capped`` the addresses beyond
    ``[dns] max_ips_per_name``. ``warn_due`` rate-limits the warning per key (a workspace)."""

    def __init__(self, warn_every: float = 10.0, max_keys: int = 4096) -> None:
        self.filtered: Counter[str] = Counter({r: 0 for r in REASONS})
        self.capped = 0
        self.refused_answers = 0
        self._warns = WarnLimiter(warn_every, max_keys)

    def warn_due(self, key: str, now: float) -> int | None:
        """None while ``key`` warned less than ``warn_every`` seconds ago (the call is counted as
        suppressed); otherwise the number of warnings suppressed since the last one."""
        return self._warns.due(key, now)
