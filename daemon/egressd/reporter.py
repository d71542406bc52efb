"""Denials to events to the shipper: from the DNS shim's verdicts and from the kernel's packet log.

Never blocks: building an event is a few dict operations, and Shipper.submit only queues."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .core.denials import Folder, Origin, dns_event, ip_event, parse_prefix
from .core.events import event_to_json, new_event_id
from .core.verdict import Decision, Verdict
from .core.workloads import Workload


class Reporter:
    def __init__(
        self,
        origin: Origin,
        submit: Callable[[dict], None],
        *,
        deny_rcode: int,
        workload_of: Callable[[str], Workload | None],
        policy_of: Callable[[str], str | None],
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.origin = origin
        self.submit = submit
        self.deny_rcode = deny_rcode
        self.workload_of = workload_of
        self.policy_of = policy_of
        self.clock = clock
        self.wallclock = wallclock
        self.folder = Folder()
        self.counts: Counter[str] = Counter()

    def dns_denied(self, wl: Workload, d: Decision, qname: str) -> None:
        if not self.folder.admit(("dns", wl.workload_id, qname, d.verdict), self.clock()):
            self.counts["folded"] += 1
            return
        rcode = self.deny_rcode if d.verdict == Verdict.DROP else 0
        e = dns_event(self.origin, wl, d, qname, rcode, self.wallclock(), new_event_id())
        self.submit(event_to_json(e))
        self.counts[f"dns_{d.verdict.value}"] += 1

    def packets(self, pkts: list[Any]) -> None:
        """LoggedPacket objects from the NFLOG reader."""
        now = self.clock()
        when = self.wallclock()
        for p in pkts:
            parsed = parse_prefix(p.prefix)
            if parsed is None:
                self.counts["foreign_prefix"] += 1
                continue
            verdict, ws = parsed
            wl = self.workload_of(p.src)
            if wl is None or wl.workspace_id != ws:
                self.counts["unattributed"] += 1
                continue
            if not self.folder.admit(("ip", wl.workload_id, p.dst, p.dport, p.protocol, verdict), now):
                self.counts["folded"] += 1
                continue
            pid = self.policy_of(ws) or ""
            e = ip_event(self.origin, wl, pid, verdict, p.src, p.dst, p.dport, p.protocol, when, new_event_id())
            self.submit(event_to_json(e))
            self.counts[f"ip_{verdict.value}"] += 1
