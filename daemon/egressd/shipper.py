"""Delivers denial events to egress-collector, in order, without losing them.

::

    submit(event) ─► memory queue ─────────────────────────► POST {url}/v1/events ─► collector
      (sync, O(1))        │ collector down or slow, queue        ▲        200 = durable
                          │ full, or the spool not yet drained   │ oldest first
                          ▼                                      │
                    Spool (<state.dir>/spool, bounded) ──────────┘

One task, the pump, owns everything but the memory queue. It takes the next batch (the batch being
retried, else the spool's oldest records, else the memory queue), posts it, and between ticks
spills the memory queue to the spool when needed. Invariant: every event on disk is older than
every event in memory, so "spool first, then memory" is submission order. A memory batch that
fails is spilled ahead of the queue; a spooled batch is acknowledged in the spool only after the
collector answered 200. Blocking file I/O runs in one worker thread, one call at a time.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog

from egressd.spool import AppendResult, Spool, SpoolBatch

log = structlog.get_logger("egressd.shipper")

CONNECT_TIMEOUT = 1.0
TOTAL_TIMEOUT = 5.0
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0
SLOW_AFTER = 1.0  # a post in flight this long means the collector is slow: spool behind it
_REJECT_STATUSES = frozenset({400, 413, 422})  # the batch itself is at fault: split, then drop

_T = TypeVar("_T")


def _encode(event: dict[str, Any]) -> bytes | None:
    """One event as compact JSON (never contains a raw newline), or None if it cannot be encoded."""
    try:
        return json.dumps(event, separators=(",", ":"), default=str).encode()
    except (TypeError, ValueError):
        return None


def _event_id(payload: bytes) -> str | None:
    try:
        return str(json.loads(payload).get("event_id"))
    except (ValueError, AttributeError):
        return None


@dataclass
class _Batch:
    payloads: list[bytes]  # what is still to be delivered, oldest first
    spool: SpoolBatch | None = None  # where it came from, when from the spool
    spilled: bool = False  # a memory batch already copied to the spool


class Shipper:
    """Ships event dicts (each carrying a unique ``event_id``) to the collector."""

    def __init__(
        self,
        *,
        url: str,
        spool_dir: Path,
        max_queue: int = 10000,
        batch_max: int = 500,
        flush_interval: float = 0.05,
        spool_max_bytes: int = 256 * 2**20,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self._endpoint = url.rstrip("/") + "/v1/events"
        self._max_queue = max_queue
        self._hard_cap = 2 * max_queue  # only reached if spilling cannot keep up
        self._batch_max = batch_max
        self._flush_interval = flush_interval
        self._spool = Spool(Path(spool_dir), max_bytes=spool_max_bytes)
        self._session_factory = session_factory
        self._timeout = aiohttp.ClientTimeout(
            total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT
        )
        self._mem: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()  # set by submit(): there is something to send
        self._pressure = asyncio.Event()  # set by submit(): the queue reached max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="egressd-spool")
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: _Batch | None = None
        self._healthy = True
        self._slow = False
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._last_spill = 0.0
        self._counts = dict.fromkeys(
            ("delivered", "dropped_oldest", "dropped_newest", "batches_rejected", "events_rejected"), 0
        )
        self._last_error: str | None = None

    # -- public API ---------------------------------------------------------------------------

    def submit(self, event: dict[str, Any]) -> None:
        """Queues one event. Synchronous and O(1); call it from the event loop's thread."""
        if self._closed or len(self._mem) >= self._hard_cap:
            self._counts["dropped_newest"] += 1
            return
        self._mem.append(event)
        self._wake.set()
        if len(self._mem) >= self._max_queue:
            self._pressure.set()  # the pump spills at once, even in the middle of a wait

    async def start(self) -> None:
        """Opens the spool (a previous run's events are delivered first) and starts the pump."""
        if self._task is not None:
            return
        await self._io(self._spool.open)
        if self._spool.events:
            log.info("spool_replay", events=self._spool.events, bytes=self._spool.bytes)
        if self._spool.corrupt_skipped:
            log.warning("spool_corrupt_records", count=self._spool.corrupt_skipped)
        for problem in self._spool.unreadable:
            log.error("spool_segment_unreadable", detail=problem)
        self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="egressd-shipper")

    async def close(self, timeout: float = 5) -> None:
        """Delivers what it can within ``timeout``; what is left stays in the spool for next start."""
        if self._closed:
            return
        self._closing = True
        self._deadline = asyncio.get_running_loop().time() + timeout * 0.8
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
                log.error("shipper_close_timeout", lost=len(self._mem))
            except Exception:  # noqa: BLE001 - shutting down: report, never raise
                log.exception("shipper_close_failed")
        await self._teardown()

    async def abort(self) -> None:
        """Stops at once, as a crash would: memory is lost, the spool is left as it is."""
        if self._closed:
            return
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._teardown()

    def stats(self) -> dict[str, Any]:
        """Counters for the status API and metrics."""
        in_memory = len(self._mem)
        pending = self._pending
        if pending is not None and pending.spool is None and not pending.spilled:
            in_memory += len(pending.payloads)
        spool = self._spool
        return {
            "queued": in_memory,
            "delivered": self._counts["delivered"],
            "spooled_bytes": spool.bytes,
            "spool_events": spool.events,
            "spool_segments": spool.segments,
            "spool_corrupt_skipped": spool.corrupt_skipped,
            "dropped_oldest": self._counts["dropped_oldest"],
            "dropped_newest": self._counts["dropped_newest"],
            "batches_rejected": self._counts["batches_rejected"],
            "events_rejected": self._counts["events_rejected"],
            "collector_up": self._healthy,
            "last_error": self._last_error,
            "backlog": in_memory + spool.events + spool.orphans,
        }

    # -- the pump -----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self._closing and (not self._healthy or self._past_deadline()):
                    break
                await self._maybe_spill()
                batch = self._pending or await self._next_batch()
                if batch is None:
                    if self._closing:
                        break
                    await self._idle()
                    continue
                self._pending = batch
                if await self._deliver(batch):
                    self._pending = None
                    if batch.spool is not None:
                        await self._commit(batch.spool)
                    if not self._healthy:
                        log.info("collector_recovered", backlog=self.stats()["backlog"])
                    self._healthy, failures = True, 0
                    continue
                if batch.spool is None:  # a memory batch goes to disk, ahead of the queue
                    if not batch.spilled:
                        await self._spill(head_in_flight=False)
                    self._pending = None
                if self._healthy and not self._closing:
                    log.warning("collector_unreachable", error=self._last_error, url=self._endpoint)
                self._healthy = False
                failures += 1
                await self._backoff(failures)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop delivery for good
                self._last_error = repr(exc)
                log.exception("shipper_error")
                await asyncio.sleep(1)
        await self._spill(head_in_flight=False)
        if self._spool.orphans:  # read from a segment that was dropped, never delivered
            self._count_dropped_oldest(self._spool.orphans)
            self._spool.orphans = 0

    async def _next_batch(self) -> _Batch | None:
        if self._spool.events:
            got = await self._io(self._spool.read, self._batch_max)
            if got is not None:
                return _Batch(got.payloads, spool=got)
        if not self._mem:
            return None
        n = min(self._batch_max, len(self._mem))
        payloads = []
        for _ in range(n):
            payload = _encode(self._mem.popleft())
            if payload is None:
                self._counts["events_rejected"] += 1
            else:
                payloads.append(payload)
        return _Batch(payloads)

    async def _deliver(self, batch: _Batch) -> bool:
        """Posts the batch; True once every event is acknowledged or rejected for good.

        A rejected batch is split in halves until the bad events stand alone, so the good ones
        land. On a transient failure ``batch.payloads`` keeps what is still to be sent.
        """
        todo: deque[list[bytes]] = deque([batch.payloads] if batch.payloads else [])
        split = False
        while todo:
            part = todo[0]
            status, detail = await self._post_watching(part)
            if status is not None and 200 <= status < 300:
                todo.popleft()
                self._counts["delivered"] += len(part)
            elif status in _REJECT_STATUSES:
                todo.popleft()
                split = True
                self._counts["batches_rejected"] += 1
                if len(part) > 1:
                    mid = len(part) // 2
                    todo.extendleft((part[mid:], part[:mid]))
                    log.warning(
                        "batch_rejected", status=status, size=len(part), reason=detail, action="split"
                    )
                else:
                    self._counts["events_rejected"] += 1
                    log.error(
                        "batch_rejected", status=status, size=1, reason=detail,
                        action="dropped", event_id=_event_id(part[0]),
                    )
            else:
                self._last_error = detail if status is None else f"HTTP {status}: {detail}"
                batch.payloads = [p for chunk in todo for p in chunk]
                return False
            if split:
                batch.payloads = [p for chunk in todo for p in chunk]
        batch.payloads = []
        return True

    async def _post_watching(self, payloads: list[bytes]) -> tuple[int | None, str]:
        """Posts while still spilling the queue on time if the collector is slow to answer."""
        loop = asyncio.get_running_loop()
        post = asyncio.ensure_future(self._post(payloads))
        pressure = asyncio.ensure_future(self._pressure.wait())
        started = loop.time()
        try:
            while True:
                await asyncio.wait(
                    {post, pressure}, timeout=self._flush_interval, return_when=asyncio.FIRST_COMPLETED
                )
                if post.done():
                    return post.result()
                if pressure.done():
                    pressure = asyncio.ensure_future(self._pressure.wait())
                if self._closing and self._past_deadline():
                    return None, "shutting down"
                # A slow collector is treated like a down one: spill on every tick.
                self._slow = loop.time() - started >= SLOW_AFTER
                await self._maybe_spill()
        finally:
            self._slow = False
            pressure.cancel()
            if not post.done():
                post.cancel()

    async def _post(self, payloads: list[bytes]) -> tuple[int | None, str]:
        assert self._session is not None
        body = b"[" + b",".join(payloads) + b"]"
        try:
            async with self._session.post(
                self._endpoint,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
            ) as resp:
                text = (await resp.read())[:500].decode("utf-8", "replace")
                return resp.status, text
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    # -- spilling -----------------------------------------------------------------------------

    async def _maybe_spill(self) -> None:
        """Spills the queue if it is full, or on each tick while the spool must come first."""
        pending = self._pending
        inflight = pending is not None and pending.spool is None and not pending.spilled
        if not self._mem and not inflight:
            return
        if len(self._mem) >= self._max_queue:
            await self._spill()
            return
        self._pressure.clear()
        durable = not self._healthy or self._slow or self._spool.events > 0
        now = asyncio.get_running_loop().time()
        if durable and now - self._last_spill >= self._flush_interval:
            await self._spill()

    async def _spill(self, head_in_flight: bool = True) -> None:
        """Appends the pending memory batch (if any) and then the whole queue to the spool.

        If the disk refuses, the events are dropped, except a batch whose post is still in flight.
        """
        self._last_spill = asyncio.get_running_loop().time()
        head: list[bytes] = []
        pending = self._pending
        if pending is not None and pending.spool is None and not pending.spilled:
            head = list(pending.payloads)
            pending.spilled = True
        events, self._mem = self._mem, deque()
        self._pressure.clear()
        if not head and not events:
            return
        result, unencodable = await self._io(self._append, head, events)
        self._counts["events_rejected"] += unencodable
        if result.dropped_oldest:
            self._count_dropped_oldest(result.dropped_oldest)
        if result.failed:
            lost_head = max(0, len(head) - result.written)
            if lost_head and head_in_flight and pending is not None:
                pending.spilled = False  # may still land; if its post fails, it is spilled again
                lost = result.failed - lost_head
            else:
                lost = result.failed
            self._counts["dropped_newest"] += lost
            err = result.error
            self._last_error = f"spool: {err}"
            log.error(
                "spool_write_failed", dropped=lost,
                errno=errno.errorcode.get(err.errno or 0, str(err.errno)) if err else None,
                error=str(err),
            )

    def _append(self, head: list[bytes], events: deque[dict[str, Any]]) -> tuple[AppendResult, int]:
        """Runs in the worker thread: encodes the queue and appends everything."""
        payloads = list(head)
        unencodable = 0
        for event in events:
            payload = _encode(event)
            if payload is None:
                unencodable += 1
            else:
                payloads.append(payload)
        return self._spool.append(payloads), unencodable

    async def _commit(self, batch: SpoolBatch) -> None:
        try:
            await self._io(self._spool.commit, batch)
        except OSError as exc:
            self._last_error = f"spool: {exc}"
            log.error("spool_commit_failed", error=str(exc))

    def _count_dropped_oldest(self, count: int) -> None:
        self._counts["dropped_oldest"] += count
        log.warning("spool_dropped_oldest", count=count, max_bytes=self._spool.max_bytes)

    # -- waiting ------------------------------------------------------------------------------

    async def _idle(self) -> None:
        self._wake.clear()
        if self._mem or self._closing:
            return
        try:
            async with asyncio.timeout(1.0):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _backoff(self, failures: int) -> None:
        """Waits before the next attempt (jittered, capped), spilling the queue meanwhile."""
        loop = asyncio.get_running_loop()
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures - 1, 16))
        end = loop.time() + delay * random.uniform(0.5, 1.0)
        while not self._closing:
            left = end - loop.time()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(min(left, self._flush_interval)):
                    await self._pressure.wait()
            except TimeoutError:
                pass
            await self._maybe_spill()

    def _past_deadline(self) -> bool:
        return asyncio.get_running_loop().time() >= self._deadline

    # -- plumbing -----------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _teardown(self) -> None:
        self._closed = True
        if self._mem:  # submitted after the pump's last spill
            self._counts["dropped_newest"] += len(self._mem)
            log.error("shipper_closed_with_queue", lost=len(self._mem))
            self._mem.clear()
        try:
            await self._io(self._spool.close)
        except OSError as exc:
            log.error("spool_close_failed", error=str(exc))
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._executor.shutdown(wait=False)
