"""Which IPs each workspace's DNS answers allowed, and until when.

Pure: time is passed in (``now``, monotonic seconds). The engine mirrors this cache into the
kernel's timeout sets; keeping the names behind every IP lets a policy change withdraw exactly the
IPs whose names are no longer allowed, and lets a restart re-render the sets without a gap.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, KeysView
from typing import NamedTuple

#: An answer's TTL is clamped to this many seconds at most (a giant TTL must not pin an IP for ever).
MAX_TTL = 86_400
#: IPs an expiry round reads between two yields to the event loop (0.2-0.8 ms on the bench VM).
EXPIRE_STEP = 512
#: Kernel timeouts are rounded up to whole seconds plus this margin, so that an entry never
#: expires before the answer's TTL even though refreshes are skipped while it is still covered.
MARGIN = 1
#: The kernel holds an answer's element this many seconds longer than the cache holds its IP. The
#: engine deletes an IP from the kernel when an expiry round drops it, while the element is still
#: live, so that the delete's commit frees it: the kernel's own collector gives a walk up on every
#: commit in the namespace (Linux 6.5 and later), and under a steady stream of answers it never
#: freed expired elements (bench/bench_setgc.py, bench/bench_expiry.py). The kernel's timeout is
#: the fallback, for a round more than GRACE - 1 s late (rounds run every second) or a delete
#: that fails.
GRACE = 5


class Entry(NamedTuple):
    """One IP of one workspace: when it expires and the last name that allowed it."""

    ip: str
    expires: float
    name: str


# What one IP of one workspace holds: (name, expiry) when one name allowed it (nearly always), or
# {name: expiry} when several did. A tuple costs a third of a one-item dict: with 100,000 IPs
# cached this is about 13 MB of the daemon's memory.
_Names = tuple[str, float] | dict[str, float]


class _Due:
    """When a workspace's IPs are next worth looking at: whole seconds of expiry -> the IPs with
    a name expiring in that second, and a heap of those seconds. An IP is listed at (or before)
    the first expiry among its names; an entry refreshed since it was listed is listed again at
    its new expiry when its old second comes. So an expiry round reads only what is due: with
    100,000 IPs cached and none due, a full scan took 50-100 ms every round on the bench VM,
    it reads none. IPs forgotten meanwhile are skipped when their second comes, and an IP
    listed twice is read once."""

    __slots__ = ("seconds", "heap")

    def __init__(self) -> None:
        self.seconds: dict[int, list[str]] = {}
        self.heap: list[int] = []

    def at(self, second: int) -> list[str]:
        """The list of IPs due in ``second``, made (and its second pushed) if there is none."""
        ips = self.seconds.get(second)
        if ips is None:
            ips = self.seconds[second] = []
            heapq.heappush(self.heap, second)
        return ips

    def add(self, ip: str, expiry: float) -> None:
        self.at(int(expiry)).append(ip)


def _first(v: _Names) -> float:
    """The earliest expiry among an IP's names."""
    if type(v) is tuple:
        return v[1]  # type: ignore[return-value]
    return min(v.values())  # type: ignore[union-attr]


def _has(v: _Names, name: str) -> bool:
    return v[0] == name if type(v) is tuple else name in v  # type: ignore[operator]


def _latest(v: _Names) -> tuple[str, float]:
    if type(v) is tuple:
        return v
    return max(v.items(), key=lambda kv: kv[1])  # type: ignore[union-attr]


def _with(v: _Names | None, name: str, expiry: float) -> _Names:
    """``v`` with ``name`` allowed until at least ``expiry``."""
    if v is None:
        return (name, expiry)
    if type(v) is tuple:
        if v[0] == name:
            return v if v[1] >= expiry else (name, expiry)
        return {v[0]: v[1], name: expiry}
    d: dict[str, float] = v  # type: ignore[assignment]
    if d.get(name, 0.0) < expiry:
        d[name] = expiry
    return d


def _without(v: _Names, drop: Callable[[str, float], bool]) -> _Names | None:
    """``v`` minus the names for which drop(name, expiry) is true; None when none is left."""
    if type(v) is tuple:
        return None if drop(*v) else v  # type: ignore[misc]
    d: dict[str, float] = v  # type: ignore[assignment]
    for name in [n for n, e in d.items() if drop(n, e)]:
        del d[name]
    if len(d) > 1:
        return d
    return next(iter(d.items()), None)


class IpCache:
    def __init__(self) -> None:
        # workspace -> ip -> (name, expiry) or {name: expiry}
        self._ws: dict[str, dict[str, _Names]] = {}
        # workspace -> when its IPs are due (shared along with the workspace's table)
        self._due: dict[str, _Due] = {}

    def _table(self, workspace: str) -> tuple[dict[str, _Names], _Due]:
        ips = self._ws.get(workspace)
        if ips is None:
            ips = self._ws[workspace] = {}
            due = self._due[workspace] = _Due()
        else:
            due = self._due[workspace]
        return ips, due

    def record(
        self, workspace: str, name: str, addrs: Iterable[tuple[str, int]], min_ttl: int, now: float
    ) -> list[tuple[str, int]]:
        """Record an answer. Returns (ip, kernel timeout seconds) for each IP whose kernel entry
        must be (re)programmed because this answer outlives what the cache holds. The cache holds
        the IP for the whole seconds of the TTL plus MARGIN, the kernel GRACE seconds more."""
        ips, due = self._table(workspace)
        out: list[tuple[str, int]] = []
        for ip, ttl in addrs:
            life = min(max(int(ttl), int(min_ttl), 1), MAX_TTL)
            expiry = now + life
            cur = ips.get(ip)
            if cur is None:
                covered = 0.0
            elif type(cur) is tuple:
                covered = cur[1]
            else:
                covered = max(cur.values(), default=0.0)  # type: ignore[union-attr]
            if expiry > covered:
                timeout = math.ceil(life) + MARGIN
                expiry = max(expiry, now + timeout)
                out.append((ip, timeout + GRACE))
            if cur is None or not _has(cur, name):
                due.add(ip, expiry)  # a name new to this IP; a known one only expires later
            ips[ip] = _with(cur, name, expiry)
        return out

    def entries(self, workspace: str, now: float) -> Iterator[Entry]:
        """Live entries of a workspace (for rendering its sets)."""
        for ip, v in self._ws.get(workspace, {}).items():
            name, expiry = _latest(v)
            if expiry > now:
                yield Entry(ip, expiry, name)

    def adopt(self, workspace: str, ip: str, name: str, expires: float) -> None:
        """Take over an entry found in the kernel at start-up."""
        ips, due = self._table(workspace)
        cur = ips.get(ip)
        if cur is None or not _has(cur, name):
            due.add(ip, expires)
        ips[ip] = _with(cur, name, expires)

    def share(self, other: "IpCache", workspace: str) -> None:
        """Take ``other``'s entries of a workspace as they are: the same table, not a copy, so
        ``other`` must not be changed afterwards (the engine drops it once the new one is live)."""
        if workspace in other._ws:
            self._ws[workspace] = other._ws[workspace]
            self._due[workspace] = other._due[workspace]

    def retain(self, workspace: str, keep: Callable[[str], bool]) -> int:
        """Forget the names for which keep(name) is false; returns how many IPs were withdrawn."""
        ips = self._ws.get(workspace, {})
        gone = 0
        for ip in list(ips):
            v = _without(ips[ip], lambda n, _e: not keep(n))
            if v is None:
                del ips[ip]
                gone += 1
            else:
                ips[ip] = v
        return gone

    def expire(self, now: float) -> int:
        """Drop what the kernel has already expired. Returns the number of IPs dropped."""
        dropped = 0
        for dropped in self.expire_steps(now, chunk=0):
            pass
        return dropped

    def expire_steps(self, now: float, chunk: int = EXPIRE_STEP,
                     gone_to: list[tuple[str, str]] | None = None) -> Iterator[int]:
        """expire() in steps of at most ``chunk`` IPs (0: all at once), yielding how many IPs
        were dropped so far after each step, so that an event loop can serve between them.
        ``gone_to``: each IP dropped is appended to it as (workspace, ip) before the step that
        dropped it yields, for the caller to delete from the kernel (and clear in place). Only
        the IPs listed as due by ``now`` are read (see _Due); 100,000 IPs expiring at once took
        50-80 ms in all on the bench VM. What changes between steps is
        judged as it is then: an IP refreshed or forgotten meanwhile is kept or skipped; a
        workspace table replaced meanwhile is finished as it was, and the next round catches up.
        A round left unfinished (the generator closed, as at shutdown) loses nothing: the IPs it
        had taken from the listing and not read are listed again, for the next round."""
        dropped = read = 0
        gone = lambda _n, e: e <= now  # noqa: E731
        last = int(now)  # the second ``now`` is in: read, but its IPs not yet expired stay listed
        # Each table with anything due, with its listing, as they are now: a workspace dropped or
        # replaced between steps is finished as it was. (Rounds run every second: with 10,000
        # workspaces cached and none due, the filter took a round from 3.5 ms to 0.75 ms.)
        dues = self._due
        for ws, ips, due in [(ws, ips, due) for ws, ips in self._ws.items()
                             if (heap := (due := dues[ws]).heap) and heap[0] <= last]:
            seconds, heap = due.seconds, due.heap
            later: list[tuple[int, list[str]]] = []  # (second, its IPs due later in it)
            second, done = 0, 0  # the second being read, and how many of its IPs were read
            todo: list[str] = []  # its IPs
            try:
                while heap and heap[0] <= last:
                    second = heapq.heappop(heap)
                    todo, done = list(dict.fromkeys(seconds.pop(second, ()))), 0  # each IP once
                    stay: list[str] = []
                    later.append((second, stay))
                    for ip in todo:
                        done += 1
                        v = ips.get(ip)
                        if v is None:
                            continue  # forgotten (or dropped) since it was listed
                        if type(v) is tuple:
                            w = None if v[1] <= now else v  # type: ignore[operator]
                        else:
                            w = _without(v, gone)
                        if w is None:
                            del ips[ip]
                            dropped += 1
                            if gone_to is not None:
                                gone_to.append((ws, ip))
                        else:
                            if w is not v:
                                ips[ip] = w
                            first = _first(w)
                            if int(first) == second:
                                stay.append(ip)  # later in this same second: the next round
                            else:
                                due.add(ip, first)
                        read += 1
                        if chunk and read % chunk == 0:
                            yield dropped
            finally:
                # After the heap loop, so that this round does not read them again. A round
                # abandoned between steps (its generator closed) also lists again what it had
                # taken and not read: nothing it popped is lost to later rounds.
                for s, stay in later:
                    if stay:
                        due.at(s).extend(stay)
                if done < len(todo):
                    due.at(second).extend(todo[done:])
        yield dropped

    def forget(self, workspace: str, ips: Iterable[str]) -> None:
        """Forget IPs whose programming failed, so the next answer programs them again."""
        table = self._ws.get(workspace, {})
        for ip in ips:
            table.pop(ip, None)

    def ips(self, workspace: str) -> KeysView[str]:
        """The IPs held for a workspace, live or not yet expired by expire()."""
        return self._ws.get(workspace, {}).keys()

    def drop_workspace(self, workspace: str) -> None:
        self._ws.pop(workspace, None)
        self._due.pop(workspace, None)

    def workspaces(self) -> list[str]:
        return list(self._ws)

    def size(self, workspace: str | None = None) -> int:
        if workspace is not None:
            return len(self._ws.get(workspace, {}))
        return sum(len(v) for v in self._ws.values())
