"""Token buckets by key: the per-workload DNS query rate limit; and WarnLimiter, which rate-limits
repeated warnings.

    query from workload W ──allow(W, now)──▶ bucket W: refill rate × elapsed (at most burst)
                                              ≥ 1 token? take one: True : False

Each key (a workload id) has a bucket of ``burst`` tokens that refills at ``rate`` tokens per
second; a query takes one token, and a query that finds none is over the limit. A new key starts
with a full bucket.

Memory stays bounded without any hook on workload removal: a bucket that has refilled to full is
the same as no bucket, so every max(``burst / rate``, 1) seconds the full ones are swept out. Only
keys that asked within the last sweep interval or two keep a bucket, and the caller only asks for
registered workloads, so a workload that disappears loses its bucket within two sweep intervals
(once anything is asked again). ``max_keys`` is a hard cap on top (the oldest buckets go first: forgetting a bucket
only ever gives its key a fresh, full one).

Pure: time is passed in (any monotonic clock, in seconds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

_EPS = 1e-9  # float slack: 0.1 s at 10/s is one token, though 100.1 - 100.0 < 0.1
_MIN_SWEEP = 1.0  # seconds: a sweep walks every bucket, so not more often than this


class TokenBuckets:
    """One token bucket per key. ``rate`` or ``burst`` of 0 disables the limit (always allow)."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65536) -> None:
        if rate < 0 or burst < 0 or max_keys < 1:
            raise ValueError("rate and burst must be >= 0, max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.enabled = self.rate > 0 and self.burst >= 1
        # key -> [tokens, time of last refill]; ordered by first use since the last sweep.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._sweep_every = max(self.burst / self.rate, _MIN_SWEEP) if self.enabled else 0.0
        self._next_sweep: float | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket at time ``now``. False when it has none."""
        if not self.enabled:
            return True
        if self._next_sweep is None:
            self._next_sweep = now + self._sweep_every
        elif now >= self._next_sweep:
            self.sweep(now)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = b[0]
        if now > b[1]:
            tokens = min(self.burst, tokens + (now - b[1]) * self.rate)
            b[1] = now
        if tokens >= 1.0 - _EPS:
            b[0] = tokens - 1.0
            return True
        b[0] = tokens
        return False

    def sweep(self, now: float) -> int:
        """Drop every bucket that has refilled to full by ``now``. Returns how many went."""
        full = [k for k, (tokens, last) in self._buckets.items()
                if tokens + max(now - last, 0.0) * self.rate >= self.burst - _EPS]
        for k in full:
            del self._buckets[k]
        self._next_sweep = now + self._sweep_every
        return len(full)

    def retain(self, keys: Iterable[str]) -> None:
        """Drop the buckets of every key not in ``keys`` (the live workloads)."""
        live = set(keys)
        for k in [k for k in self._buckets if k not in live]:
            del self._buckets[k]


class WarnLimiter:
    """At most one warning per key every ``every`` seconds, counting the ones held back.
    ``max_keys`` bounds the memory under a storm of distinct keys (expired keys are dropped
    first; if all are recent, new keys stay quiet)."""

    def __init__(self, every: float, max_keys: int = 4096) -> None:
        self.every = every
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last warning, suppressed since)

    def __len__(self) -> int:
        return len(self._last)

    def due(self, key: str, now: float) -> int | None:
        """None while ``key`` warned less than ``every`` seconds ago (the call is counted as
        suppressed); otherwise the number of warnings suppressed since the last one."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._last) >= self._max_keys:
            cutoff = now - self.every
            self._last = {k: v for k, v in self._last.items() if v[0] > cutoff}
            if len(self._last) >= self._max_keys:
                return None  # a storm of distinct keys: stay quiet, the counters still count
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0
