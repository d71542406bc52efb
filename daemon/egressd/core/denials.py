"""Denials become log-table events here: from the DNS shim (DNS, or STORAGE for names shaped like
storage endpoints) and from the kernel's packet log (IP). Identical bursts are folded into one
event. Pure: the clock and the event ids are passed in."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from .events import DnsEvent, Event, IpEvent, StorageEvent
from .storage import storage_host
from .verdict import Decision, Verdict
from .workloads import Workload

STORAGE_REJECTION = "storage-account-not-allowed"


@dataclass(frozen=True)
class Origin:
    """Where events come from: copied into every event."""

    account_id: str
    node: str


def dns_event(origin: Origin, wl: Workload, d: Decision, qname: str, rcode: int, when: datetime, event_id: str) -> Event:
    host = storage_host(qname) if d.destination_type == "STORAGE" else None
    return Event(
        account_id=origin.account_id,
        workspace_id=wl.workspace_id,
        event_id=event_id,
        destination_type="STORAGE" if host else "DNS",
        destination=host or qname,
        dns_event=DnsEvent(qname, rcode),
        storage_event=StorageEvent(host, None, STORAGE_REJECTION) if host else None,
        event_time=when,
        access_type=d.verdict.value,
        network_source_type=wl.product,
        workload_id=wl.workload_id,
        network_policy_id=d.network_policy_id,
        node=origin.node,
    )


def ip_event(
    origin: Origin, wl: Workload, policy_id: str, verdict: Verdict, src: str, dst: str,
    dport: int | None, protocol: str, when: datetime, event_id: str,
) -> Event:
    return Event(
        account_id=origin.account_id,
        workspace_id=wl.workspace_id,
        event_id=event_id,
        destination_type="IP",
        destination=dst,
        dns_event=None,
        storage_event=None,
        event_time=when,
        access_type=verdict.value,
        network_source_type=wl.product,
        ip_event=IpEvent(src, dst, dport, protocol),
        workload_id=wl.workload_id,
        network_policy_id=policy_id,
        node=origin.node,
    )


class Folder:
    """Lets the first event of a burst through and folds identical ones that follow within
    ``window`` seconds (a client asking A and AAAA, a SYN retried). Bounded memory."""

    def __init__(self, window: float = 1.0, max_keys: int = 65536) -> None:
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple, float] = OrderedDict()
        self.folded = 0

    def admit(self, key: tuple, now: float) -> bool:
        last = self._seen.get(key)
        if last is not None and now - last < self.window:
            self.folded += 1
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        # drop what has aged out from the front (oldest first)
        while self._seen:
            k, t = next(iter(self._seen.items()))
            if now - t < self.window:
                break
            self._seen.popitem(last=False)
        return True


def parse_prefix(prefix: str) -> tuple[Verdict, str] | None:
    """The kernel log prefix `egd:D:<workspace>` / `egd:L:<workspace>` → (verdict, workspace)."""
    parts = prefix.split(":", 2)
    if len(parts) != 3 or parts[0] != "egd" or parts[1] not in ("D", "L") or not parts[2]:
        return None
    return (Verdict.DROP if parts[1] == "D" else Verdict.LOG_ONLY_DENIAL), parts[2]
