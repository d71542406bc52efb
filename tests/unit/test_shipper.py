"""egressd.shipper and egressd.spool against a fake egress-collector on 127.0.0.1 (aiohttp test server)."""

from __future__ import annotations

import asyncio
import errno
import inspect
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd import spool as spool_mod
from egressd.shipper import Shipper
from egressd.spool import Spool, SpoolLockedError, encode_record


class FakeCollector:
    """Plays egress-collector: stores each event_id once, can be down, slow, or reject bad events."""

    def __init__(self) -> None:
        self.order: list[str] = []  # ids in order of first arrival
        self.seen: set[str] = set()
        self.received = 0  # events received, duplicates included
        self.posts = 0
        self.status: int | None = None  # when set, every post gets this status and stores nothing
        self.delay = 0.0  # seconds to sit on each post before answering
        self.arrival: dict[str, float] = {}
        self.url = ""
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        body = await request.json()
        if not isinstance(body, list) or any(
            not isinstance(e, dict) or not isinstance(e.get("event_id"), str) or e.get("bad") for e in body
        ):
            return web.json_response({"error": "invalid event"}, status=400)
        now = time.monotonic()
        for event in body:
            self.received += 1
            eid = event["event_id"]
            if eid not in self.seen:
                self.seen.add(eid)
                self.order.append(eid)
                self.arrival[eid] = now
        return web.json_response({"stored": len(body)})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/events", self.handle)
        return app


@pytest.fixture
async def collector(aiohttp_server: Any) -> FakeCollector:
    fake = FakeCollector()
    server = await aiohttp_server(fake.app())
    fake.server = server  # type: ignore[attr-defined]
    fake.port = server.port
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


MakeShipper = Callable[..., Awaitable[Shipper]]


@pytest.fixture
async def make_shipper(tmp_path: Path) -> AsyncIterator[MakeShipper]:
    made: list[Shipper] = []

    async def make(url: str, **kwargs: Any) -> Shipper:
        kwargs.setdefault("spool_dir", tmp_path / "spool")
        shipper = Shipper(url=url, **kwargs)
        await shipper.start()
        made.append(shipper)
        return shipper

    yield make
    for shipper in made:
        await shipper.abort()  # a no-op once closed


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"{i:08d}-{uuid.uuid4()}",
        "account_id": "node-1",
        "workspace_id": "1001",
        "destination_type": "DNS",
        "destination": f"host{i}.example.com",
        "dns_event": {"domain_name": f"host{i}.example.com", "rcode": 3},
        "access_type": "DROP",
        **extra,
    }


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Polls pred until true; fails after timeout. Returns the seconds it took."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def submit_spread(shipper: Shipper, events: list[dict[str, Any]], chunk: int = 100) -> None:
    """Submits in chunks with a loop turn between, as the DNS and packet paths would."""
    for i in range(0, len(events), chunk):
        for ev in events[i : i + chunk]:
            shipper.submit(ev)
        await asyncio.sleep(0.005)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.jsonl"))


# -- delivery ---------------------------------------------------------------------------------


async def test_delivers_10000_in_order(collector: FakeCollector, make_shipper: MakeShipper) -> None:
    shipper = await make_shipper(collector.url)
    events = [event(i) for i in range(10_000)]
    ids = [e["event_id"] for e in events]
    for ev in events:  # one burst: the queue reaches max_queue and spills, order must survive
        shipper.submit(ev)
    took = await wait_until(lambda: len(collector.order) == 10_000, "10,000 events")
    assert collector.order == ids
    await wait_until(lambda: shipper.stats()["backlog"] == 0, "empty backlog")
    stats = shipper.stats()
    assert stats["delivered"] >= 10_000
    assert stats["dropped_oldest"] == stats["dropped_newest"] == stats["batches_rejected"] == 0
    print(f"10,000 events delivered in {took:.3f}s ({collector.posts} posts)")


async def test_a_denial_reaches_the_collector_within_100ms(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    shipper = await make_shipper(collector.url)
    shipper.submit(event(0))  # warm the connection up
    await wait_until(lambda: len(collector.order) == 1, "warm-up event")
    latencies = []
    for i in range(1, 31):
        ev = event(i)
        sent = time.monotonic()
        shipper.submit(ev)
        await wait_until(lambda: ev["event_id"] in collector.seen, "one event", timeout=2)
        latencies.append(collector.arrival[ev["event_id"]] - sent)
        await asyncio.sleep(0.01)
    latencies.sort()
    median, worst = latencies[15] * 1000, latencies[-1] * 1000
    print(f"submit→collector latency: median {median:.1f} ms, max {worst:.1f} ms")
    assert latencies[15] < 0.1
    assert latencies[-1] < 0.5


async def test_collector_503_then_back_delivers_all_once_in_order(
    collector: FakeCollector, make_shipper: MakeShipper, tmp_path: Path
) -> None:
    shipper = await make_shipper(collector.url)
    collector.status = 503
    events = [event(i) for i in range(5000)]
    ids = [e["event_id"] for e in events]
    await submit_spread(shipper, events)
    await wait_until(lambda: shipper.stats()["spool_events"] == 5000, "everything spooled")
    assert shipper.stats()["collector_up"] is False
    assert "503" in (shipper.stats()["last_error"] or "")
    assert collector.order == []
    collector.status = None
    took = await wait_until(lambda: len(collector.order) == 5000, "5,000 events after recovery")
    assert collector.order == ids
    assert collector.received <= 5000 + 500  # at most the batch in flight is sent twice
    await wait_until(lambda: shipper.stats()["backlog"] == 0, "empty backlog")
    # Acknowledged segments are deleted (by the spool's worker thread, just after the counters move).
    await wait_until(lambda: segments(tmp_path / "spool") == [], "acknowledged segments deleted", timeout=2)
    print(f"503 recovery: 5,000 spooled events delivered {took:.3f}s after the collector came back")


async def test_collector_stopped_then_restarted(
    collector: FakeCollector, make_shipper: MakeShipper, aiohttp_server: Any
) -> None:
    shipper = await make_shipper(collector.url)
    await collector.server.close()  # type: ignore[attr-defined]
    events = [event(i) for i in range(5000)]
    ids = [e["event_id"] for e in events]
    await submit_spread(shipper, events)
    await wait_until(lambda: shipper.stats()["spool_events"] == 5000, "everything spooled")
    await asyncio.sleep(2.5)  # let the backoff reach its cap
    await aiohttp_server(collector.app(), port=collector.port)
    took = await wait_until(lambda: len(collector.order) == 5000, "5,000 events after restart")
    assert collector.order == ids
    assert shipper.stats()["collector_up"] is True
    print(f"restart recovery: 5,000 events delivered {took:.3f}s after the collector restarted")
    assert took < 5


async def test_slow_collector_spools_behind_and_keeps_order(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    shipper = await make_shipper(collector.url)
    collector.delay = 1.5
    events = [event(i) for i in range(600)]
    ids = [e["event_id"] for e in events]
    await submit_spread(shipper, events[:100])
    await asyncio.sleep(1.2)  # the first post is still hanging: the collector is slow
    await submit_spread(shipper, events[100:], chunk=50)
    await wait_until(lambda: shipper.stats()["spool_events"] > 0, "events spooled while slow")
    collector.delay = 0
    await wait_until(lambda: len(collector.order) == 600, "600 events")
    assert collector.order == ids


async def test_rejected_batch_is_split_and_good_events_land(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    shipper = await make_shipper(collector.url)
    bad_at = {10, 11, 57}
    events = [event(i, bad=True) if i in bad_at else event(i) for i in range(100)]
    good = [e["event_id"] for e in events if not e.get("bad")]
    with structlog.testing.capture_logs() as logs:
        for ev in events:  # one loop turn: they travel as one batch
            shipper.submit(ev)
        await wait_until(lambda: len(collector.order) == 97, "the 97 good events")
        await wait_until(lambda: shipper.stats()["backlog"] == 0, "empty backlog")
    assert collector.order == good
    stats = shipper.stats()
    assert stats["events_rejected"] == 3
    assert stats["batches_rejected"] >= 3
    dropped = [r["event_id"] for r in logs if r["event"] == "batch_rejected" and r.get("action") == "dropped"]
    assert dropped == [e["event_id"] for e in events if e.get("bad")]


# -- the spool ---------------------------------------------------------------------------------


async def test_spool_bound_drops_oldest_and_counts_exactly(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    max_bytes = 64 * 1024
    shipper = await make_shipper(collector.url, spool_max_bytes=max_bytes)
    collector.status = 503
    events = [event(i) for i in range(3000)]
    ids = [e["event_id"] for e in events]
    peak = 0
    with structlog.testing.capture_logs() as logs:
        for i in range(0, 3000, 100):
            for ev in events[i : i + 100]:
                shipper.submit(ev)
            await asyncio.sleep(0.01)
            peak = max(peak, shipper.stats()["spooled_bytes"])

        def settled() -> bool:
            s = shipper.stats()
            return s["queued"] == 0 and s["backlog"] + s["dropped_oldest"] == 3000

        await wait_until(settled, "all events spooled or dropped")
        peak = max(peak, shipper.stats()["spooled_bytes"])
        dropped = shipper.stats()["dropped_oldest"]
        assert dropped > 0
        collector.status = None
        await wait_until(lambda: shipper.stats()["backlog"] == 0, "spool drained")
    assert peak <= max_bytes
    assert len(collector.order) + dropped == 3000
    assert collector.order[-1] == ids[-1]
    # Delivered in order: the newest events, preceded at most by the one batch that was already
    # out for retry when its segment was dropped (it is held in memory and still delivered).
    positions = [ids.index(eid) for eid in collector.order]
    assert positions == sorted(positions)
    runs = [[positions[0]]]
    for p in positions[1:]:
        if p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    assert runs[-1][-1] == 2999
    assert len(runs) <= 2
    assert len(runs) == 1 or len(runs[0]) <= 500
    logged = sum(r["count"] for r in logs if r["event"] == "spool_dropped_oldest")
    assert logged == dropped
    assert all(r["log_level"] == "warning" for r in logs if r["event"] == "spool_dropped_oldest")


async def test_crash_then_restart_replays_spool(
    collector: FakeCollector, make_shipper: MakeShipper, tmp_path: Path
) -> None:
    first = await make_shipper(collector.url)
    collector.status = 503
    events = [event(i) for i in range(2000)]
    ids = [e["event_id"] for e in events]
    await submit_spread(first, events)
    await wait_until(lambda: first.stats()["spool_events"] == 2000, "everything spooled")
    await first.abort()  # as if the process died: no flush, no final bookkeeping
    assert segments(tmp_path / "spool")
    collector.status = None
    second = await make_shipper(collector.url)
    assert second.stats()["spool_events"] == 2000
    second.submit(newer := event(2000))  # submitted after the restart: goes behind the replay
    await wait_until(lambda: len(collector.order) == 2001, "replayed events")
    assert collector.order == ids + [newer["event_id"]]


async def test_crash_mid_drain_resumes_after_last_acknowledged_batch(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    first = await make_shipper(collector.url, batch_max=100)
    collector.status = 503
    events = [event(i) for i in range(1000)]
    ids = [e["event_id"] for e in events]
    await submit_spread(first, events)
    await wait_until(lambda: first.stats()["spool_events"] == 1000, "everything spooled")
    collector.status = None
    collector.delay = 0.05
    await wait_until(lambda: len(collector.order) >= 300, "part of the spool delivered")
    await first.abort()
    await asyncio.sleep(0.2)  # a post cut off by the crash may still be answered
    unique_before, received_before = len(collector.order), collector.received
    collector.delay = 0
    second = await make_shipper(collector.url, batch_max=100)
    assert 0 < second.stats()["spool_events"] <= 1000 - 200
    await wait_until(lambda: len(collector.order) == 1000, "the rest")
    assert collector.order == ids
    replayed = (collector.received - received_before) - (1000 - unique_before)
    assert 0 <= replayed <= 100  # at most the batch that was in flight at the crash


async def test_torn_last_line_and_damaged_record_are_skipped(
    collector: FakeCollector, make_shipper: MakeShipper, tmp_path: Path
) -> None:
    first = await make_shipper(collector.url)
    collector.status = 503
    events = [event(i) for i in range(300)]
    await submit_spread(first, events)
    await wait_until(lambda: first.stats()["spool_events"] == 300, "everything spooled")
    await first.abort()
    spool_dir = tmp_path / "spool"
    last = segments(spool_dir)[-1]
    data = last.read_bytes()
    damaged_id = events[150]["event_id"]
    at = data.index(damaged_id.encode())
    data = data[:at] + b"X" + data[at + 1 :]  # same length, checksum no longer matches
    torn = encode_record(b'{"event_id":"torn-by-crash"}')[:-7]
    last.write_bytes(data + torn)
    collector.status = None
    second = await make_shipper(collector.url)
    assert second.stats()["spool_corrupt_skipped"] == 2
    assert second.stats()["spool_events"] == 299
    await wait_until(lambda: len(collector.order) == 299, "the intact events")
    assert collector.order == [e["event_id"] for e in events if e["event_id"] != damaged_id]
    second.submit(later := event(1000))  # and it keeps working, appending to fresh segments
    await wait_until(lambda: later["event_id"] in collector.seen, "a new event")
    await wait_until(lambda: second.stats()["backlog"] == 0, "empty backlog")


async def test_disk_full_drops_newest_and_keeps_running(
    collector: FakeCollector, make_shipper: MakeShipper, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipper = await make_shipper(collector.url)
    collector.status = 503

    def full(fd: int, data: bytes, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_pwrite_all", full)
    with structlog.testing.capture_logs() as logs:
        await submit_spread(shipper, [event(i) for i in range(1000)])
        await wait_until(lambda: shipper.stats()["dropped_newest"] == 1000, "1,000 events dropped")
    assert shipper.stats()["backlog"] == 0
    failures = [r for r in logs if r["event"] == "spool_write_failed"]
    assert failures and all(r["errno"] == "ENOSPC" and r["log_level"] == "error" for r in failures)
    assert sum(r["dropped"] for r in failures) == 1000
    monkeypatch.undo()
    collector.status = None
    later = [event(i) for i in range(1000, 1100)]
    await submit_spread(shipper, later)
    await wait_until(lambda: len(collector.order) == 100, "events after the disk has room again")
    assert collector.order == [e["event_id"] for e in later]


async def test_close_flushes_everything(collector: FakeCollector, make_shipper: MakeShipper) -> None:
    shipper = await make_shipper(collector.url)
    events = [event(i) for i in range(1000)]
    for ev in events:
        shipper.submit(ev)
    await shipper.close()
    assert collector.order == [e["event_id"] for e in events]
    assert shipper.stats()["backlog"] == 0


async def test_close_while_down_keeps_events_for_next_start(
    collector: FakeCollector, make_shipper: MakeShipper
) -> None:
    first = await make_shipper(collector.url)
    collector.status = 503
    events = [event(i) for i in range(1000)]
    for ev in events:
        first.submit(ev)
    started = time.monotonic()
    await first.close(timeout=2)
    assert time.monotonic() - started < 2.5
    assert first.stats()["spool_events"] == 1000
    collector.status = None
    await make_shipper(collector.url)
    await wait_until(lambda: len(collector.order) == 1000, "events kept over the restart")
    assert collector.order == [e["event_id"] for e in events]


async def test_submit_is_sync_and_fast(tmp_path: Path, collector: FakeCollector) -> None:
    assert not inspect.iscoroutinefunction(Shipper.submit)
    shipper = Shipper(url=collector.url, spool_dir=tmp_path / "spool", max_queue=100_000)
    events = [event(i) for i in range(100_000)]
    started = time.perf_counter()
    for ev in events:
        assert shipper.submit(ev) is None
    took = time.perf_counter() - started
    print(f"100,000 submits: {took * 1000:.1f} ms ({took * 10:.2f} µs each)")
    assert took < 0.5
    assert shipper.stats()["queued"] == 100_000
    await shipper.close()


async def test_memory_is_bounded_when_nothing_drains(tmp_path: Path, collector: FakeCollector) -> None:
    shipper = Shipper(url=collector.url, spool_dir=tmp_path / "spool", max_queue=1000)
    for i in range(5000):  # not started, no loop turn: nothing can spill
        shipper.submit(event(i))
    assert shipper.stats()["queued"] == 2000
    assert shipper.stats()["dropped_newest"] == 3000
    await shipper.close()


async def test_throughput_100k(collector: FakeCollector, make_shipper: MakeShipper) -> None:
    """100,000 events end to end, in order, none lost, submitted in bursts of 1,000. The producer stays under the in-memory hard cap (2 x max_queue) by waiting
    while the queue is over half of it: how fast the pump spills is the machine's, and a test
    that outran it on a slow machine saw the designed (and counted) drop of the newest events."""
    shipper = await make_shipper(collector.url, max_queue=10_000)
    events = [event(i) for i in range(100_000)]
    started = time.monotonic()
    for i in range(0, len(events), 1000):
        for ev in events[i : i + 1000]:
            shipper.submit(ev)
        await asyncio.sleep(0.005)
        if shipper.stats()["queued"] >= 5_000:
            await wait_until(lambda: shipper.stats()["queued"] < 5_000, "the queue to drain", timeout=60)
    took = await wait_until(lambda: len(collector.order) == 100_000, "100,000 events", timeout=120)
    total = time.monotonic() - started
    assert shipper.stats()["dropped_newest"] == 0 and shipper.stats()["dropped_oldest"] == 0
    assert collector.order == [e["event_id"] for e in events]
    print(f"100,000 events end to end in {total:.2f}s ({100_000 / total:.0f}/s), "
          f"drained {took:.2f}s after the last submit")


# -- Spool on its own --------------------------------------------------------------------------


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [b'{"event_id":"%d","pad":"%s"}' % (i, b"x" * (i % 50)) for i in range(start, start + n)]


def test_spool_resumes_after_committed_offset(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.open()
    assert spool.append(payloads(10)).written == 10
    batch = spool.read(4)
    assert batch is not None and batch.payloads == payloads(4)
    assert spool.read(4) == batch  # reading does not consume
    spool.commit(batch)
    spool.close()
    again = Spool(tmp_path, max_bytes=2**20)
    again.open()
    assert again.events == 6
    rest = again.read(100)
    assert rest is not None and rest.payloads == payloads(6, start=4)
    again.commit(rest)
    assert again.events == 0 and again.read(100) is None
    assert list(tmp_path.glob("seg-*")) == []
    again.close()


def test_spool_is_locked_to_one_owner(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=2**20)
    first.open()
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path, max_bytes=2**20).open()
    first.close()
    second = Spool(tmp_path, max_bytes=2**20)
    second.open()
    second.close()


def test_spool_bound_counts_every_dropped_event(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=16 * 1024)
    spool.open()
    dropped = 0
    for i in range(0, 2000, 7):
        result = spool.append(payloads(7, start=i))
        assert result.written == 7
        dropped += result.dropped_oldest
        assert spool.bytes <= 16 * 1024
    assert dropped > 0
    assert dropped + spool.events == 2002
    got: list[bytes] = []
    while (batch := spool.read(50)) is not None:
        got += batch.payloads
        spool.commit(batch)
    assert got == payloads(2002)[dropped:]
    spool.close()


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_segment_yields_a_prefix_never_garbage(cut: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        spool = Spool(directory, max_bytes=2**20)
        spool.open()
        spool.append(payloads(120))
        spool.close()
        (segment,) = directory.glob("seg-*.jsonl")
        data = segment.read_bytes()
        segment.write_bytes(data[: cut % (len(data) + 1)])
        reopened = Spool(directory, max_bytes=2**20)
        reopened.open()
        events = reopened.events
        got: list[bytes] = []
        while (batch := reopened.read(32)) is not None:
            got += batch.payloads
            reopened.commit(batch)
        assert got == payloads(len(got))
        assert len(got) == events
        assert reopened.corrupt_skipped <= 1
        reopened.close()
