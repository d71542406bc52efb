"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges and counters do not need
a client library. Names follow the conventions: egressd_ prefix, _total for counters, base units."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram, O(log buckets) per observation."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self._lines.append(f"# HELP {name} {help_}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{lab}}} {float(value)!r}" if lab else f"{name} {float(value)!r}")

    def histogram(self, name: str, help_: str, h: Histogram) -> None:
        self._lines.append(f"# HELP {name} {help_}")
        self._lines.append(f"# TYPE {name} histogram")
        running = 0
        for le, n in zip(self.__le(h.buckets), h.counts):
            running += n
            self._lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        self._lines.append(f"{name}_sum {h.sum!r}")
        self._lines.append(f"{name}_count {h.count}")

    @staticmethod
    def __le(buckets: tuple[float, ...]) -> list[str]:
        return [repr(float(b)) for b in buckets] + ["+Inf"]

    def one(self, name: str, kind: str, help_: str, value: float) -> None:
        self.metric(name, kind, help_, [({}, value)])

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
