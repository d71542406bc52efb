"""Throw-away network-namespace lab for egressd's privileged tests and ``egressd demo``.

See :mod:`egressd.lab.topology` for the layout.  Needs root, iproute2, dnsmasq, dig, curl.
"""

from .topology import (
    DNS_V4,
    DNS_V6,
    DigResult,
    Lab,
    LabError,
    WorkloadHost,
    cleanup_stale,
    parse_dig,
)

__all__ = [
    "DNS_V4",
    "DNS_V6",
    "DigResult",
    "Lab",
    "LabError",
    "WorkloadHost",
    "cleanup_stale",
    "parse_dig",
]
