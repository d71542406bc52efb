"""Which IPs each workspace's DNS answers allowed, and until when.

Pure: time is passed in (``now``, monotonic seconds). The engine mirrors this cache into the
kernel's timeout sets; keeping the names behind every IP lets a policy change withdraw exactly the
IPs whose names are no longer allowed, and lets a restart re-render the sets without a gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

#: An answer's TTL is clamped to this many seconds at most (a giant TTL must not pin an IP for ever).
MAX_TTL = 86_400
#: Kernel timeouts are rounded up to whole seconds plus this margin, so that an entry never
#: expires before the answer's TTL even though refreshes are skipped while it is still covered.
MARGIN = 1


@dataclass(frozen=True)
class Entry:
    """One IP of one workspace: when it expires and the last name that allowed it."""

    ip: str
    expires: float
    name: str


class IpCache:
    def __init__(self) -> None:
        # workspace -> ip -> name -> expiry
        self._ws: dict[str, dict[str, dict[str, float]]] = {}

    def record(
        self, workspace: str, name: str, addrs: Iterable[tuple[str, int]], min_ttl: int, now: float
    ) -> list[tuple[str, int]]:
        """Record an answer. Returns (ip, timeout seconds) for each IP whose kernel entry must be
        (re)programmed because this answer outlives what the kernel holds."""
        ips = self._ws.setdefault(workspace, {})
        out: list[tuple[str, int]] = []
        for ip, ttl in addrs:
            life = min(max(int(ttl), int(min_ttl), 1), MAX_TTL)
            expiry = now + life
            names = ips.get(ip)
            if names is None:
                names = ips[ip] = {}
                covered = 0.0
            else:
                covered = max(names.values(), default=0.0)
            names[name] = max(expiry, names.get(name, 0.0))
            if expiry > covered:
                timeout = math.ceil(life) + MARGIN
                names[name] = max(names[name], now + timeout)
                out.append((ip, timeout))
        return out

    def entries(self, workspace: str, now: float) -> Iterator[Entry]:
        """Live entries of a workspace (for rendering its sets)."""
        for ip, names in self._ws.get(workspace, {}).items():
            name, expiry = max(names.items(), key=lambda kv: kv[1])
            if expiry > now:
                yield Entry(ip, expiry, name)

    def adopt(self, workspace: str, ip: str, name: str, expires: float) -> None:
        """Take over an entry found in the kernel at start-up."""
        names = self._ws.setdefault(workspace, {}).setdefault(ip, {})
        names[name] = max(expires, names.get(name, 0.0))

    def retain(self, workspace: str, keep: Callable[[str], bool]) -> int:
        """Forget the names for which keep(name) is false; returns how many IPs were withdrawn."""
        ips = self._ws.get(workspace, {})
        gone = 0
        for ip in list(ips):
            names = ips[ip]
            for name in [n for n in names if not keep(n)]:
                del names[name]
            if not names:
                del ips[ip]
                gone += 1
        return gone

    def expire(self, now: float) -> int:
        """Drop what the kernel has already expired. Returns the number of IPs dropped."""
        dropped = 0
        for ips in self._ws.values():
            for ip in list(ips):
                names = ips[ip]
                for name in [n for n, e in names.items() if e <= now]:
                    del names[name]
                if not names:
                    del ips[ip]
                    dropped += 1
        return dropped

    def forget(self, workspace: str, ips: Iterable[str]) -> None:
        """Forget IPs whose programming failed, so the next answer programs them again."""
        table = self._ws.get(workspace, {})
        for ip in ips:
            table.pop(ip, None)

    def drop_workspace(self, workspace: str) -> None:
        self._ws.pop(workspace, None)

    def workspaces(self) -> list[str]:
        return list(self._ws)

    def size(self, workspace: str | None = None) -> int:
        if workspace is not None:
            return len(self._ws.get(workspace, {}))
        return sum(len(v) for v in self._ws.values())
