"""A bounded, crash-safe FIFO of encoded events on disk: the shipper's spool.

Layout of the spool directory (``<state.dir>/spool``)::

    seg-0000000000000007.jsonl   append-only segments, oldest first; the newest one is appended to
    seg-0000000000000008.jsonl
    committed.json               {"segment": 7, "offset": 1234}: every record before it is acknowledged
    lock                         flock()ed by the one process that owns the spool

A record is one line, ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``. A line whose checksum does not
match, or a last line without its newline (torn by a crash), is skipped, never delivered.

Durability is paid per batch: an append is one ``pwrite`` and one ``fsync`` per segment it touches.
After each acknowledged batch ``committed.json`` is replaced atomically (temp file, fsync, rename,
fsync of the directory). A segment file is deleted only once everything in it was acknowledged, so a
crash loses nothing that was appended and replays at most the batch that was in flight.

The spool is bounded: before an append would take it over ``max_bytes``, the oldest segments are
deleted and the unacknowledged events that went with them are reported to the caller.

Not thread-safe: the shipper calls it from a single worker thread, one call at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from egressd.errors import EgressdError

SEGMENT_BYTES = 4 * 2**20
_MIN_SEGMENT_BYTES = 1024
_READ_CHUNK = 256 * 1024
_SEGMENT_RE = re.compile(r"^seg-(\d{16})\.jsonl$")
_COMMITTED = "committed.json"
_LOCK = "lock"


class SpoolLockedError(EgressdError):
    """Another process (or another Spool object) owns this spool directory."""


def encode_record(payload: bytes) -> bytes:
    """Frames one JSON payload (which must not contain a raw newline) as a spool line."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_record(body: bytes) -> bytes | None:
    """The payload of one spool line given without its newline, or None if it is damaged."""
    if len(body) < 10 or body[8:9] != b" ":
        return None
    payload = body[9:]
    try:
        crc = int(body[:8], 16)
    except ValueError:
        return None
    return payload if zlib.crc32(payload) == crc else None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Writes all of ``data`` at ``offset``. One function, so tests can simulate a full disk."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_valid(data: bytes) -> tuple[int, int]:
    """(intact records, damaged lines) in a segment's bytes; a torn last line counts as damaged."""
    lines = data.split(b"\n")
    tail = lines.pop()
    valid = sum(1 for body in lines if decode_record(body) is not None)
    return valid, len(lines) - valid + (1 if tail else 0)


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int = 0  # bytes of the file that belong to the spool
    pending: int = 0  # intact records not yet acknowledged


@dataclass(frozen=True)
class SpoolBatch:
    """Records handed out by :meth:`Spool.read`; pass it back to :meth:`Spool.commit` once delivered."""

    payloads: list[bytes]
    seq: int  # the segment it was read from
    end: int  # offset just past its last record


@dataclass
class AppendResult:
    """What became of the payloads given to :meth:`Spool.append`, in order."""

    written: int = 0  # the first ``written`` payloads are durable
    failed: int = 0  # the rest could not be written (``error`` says why)
    dropped_oldest: int = 0  # older unacknowledged events deleted to stay under max_bytes
    error: OSError | None = None


class Spool:
    """Durable FIFO of JSON payloads. Call :meth:`open` before anything else."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Several segments fit under the bound, so dropping the oldest never empties the spool.
        self.segment_bytes = max(_MIN_SEGMENT_BYTES, min(segment_bytes, max_bytes // 4))
        self.bytes = 0  # size of all segment files
        self.events = 0  # intact, unacknowledged records on disk
        self.orphans = 0  # records of a read batch whose segment was dropped while it was out
        self.corrupt_skipped = 0  # damaged records found (on open) and never delivered
        self.unreadable: list[str] = []  # segment files open() could not read; left in place
        self._segments: list[_Segment] = []  # oldest first
        self._active: _Segment | None = None  # the segment appended to (always the last one)
        self._active_fd: int | None = None
        self._offset = 0  # read/commit position in self._segments[0]
        self._reader: tuple[int, int] | None = None  # (seq, fd) of the head segment
        self._reserved: tuple[int, int] | None = None  # (seq, count) of the batch read, not committed
        self._next_seq = 1
        self._lock_fd: int | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Locks the directory and finds the segments a previous run left, to be read first."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolLockedError(f"spool {self.directory} is in use by another process") from None
        self._lock_fd = lock_fd
        committed_seq, committed_offset = self._load_committed()
        seqs = sorted(
            int(m.group(1)) for name in os.listdir(self.directory) if (m := _SEGMENT_RE.match(name))
        )
        for seq in seqs:
            path = self._path(seq)
            if seq < committed_seq:
                path.unlink(missing_ok=True)  # acknowledged; a crash came before its deletion
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                self.unreadable.append(f"{path.name}: {exc}")
                continue
            start = min(committed_offset, len(data)) if seq == committed_seq else 0
            valid, damaged = _count_valid(data[start:])
            self.corrupt_skipped += damaged
            self._segments.append(_Segment(seq, path, size=len(data), pending=valid))
            self.bytes += len(data)
            self.events += valid
        if self._segments and self._segments[0].seq == committed_seq:
            self._offset = min(committed_offset, self._segments[0].size)
        self._next_seq = max([committed_seq, *seqs]) + 1

    def close(self) -> None:
        """Closes the files and releases the lock. Everything appended is already durable."""
        self._close_reader()
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        self._active = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def segments(self) -> int:
        return len(self._segments)

    # -- writing ------------------------------------------------------------------------------

    def append(self, payloads: list[bytes]) -> AppendResult:
        """Appends payloads durably, in order. Never raises OSError: the result says what failed."""
        result = AppendResult()
        records = [encode_record(p) for p in payloads]
        i = 0
        try:
            while i < len(records):
                seg = self._writable(len(records[i]))
                room = self.segment_bytes - seg.size
                j, size = i + 1, len(records[i])
                while j < len(records) and size + len(records[j]) <= room:
                    size += len(records[j])
                    j += 1
                result.dropped_oldest += self._enforce_bound(size)
                self._write(seg, b"".join(records[i:j]))
                seg.pending += j - i
                self.events += j - i
                result.written += j - i
                i = j
        except OSError as exc:
            result.failed = len(records) - i
            result.error = exc
        return result

    def _writable(self, first_record: int) -> _Segment:
        """The active segment, rotated first if the next record would not fit in it."""
        seg = self._active
        if seg is not None and (seg.size == 0 or seg.size + first_record <= self.segment_bytes):
            return seg
        if self._active_fd is not None:
            os.close(self._active_fd)  # already fsync'ed by its last append
        self._active, self._active_fd = None, None
        seq = self._next_seq
        path = self._path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._next_seq += 1
        seg = _Segment(seq, path)
        self._segments.append(seg)
        self._active, self._active_fd = seg, fd
        _fsync_dir(self.directory)
        return seg

    def _write(self, seg: _Segment, data: bytes) -> None:
        assert self._active_fd is not None
        try:
            _pwrite_all(self._active_fd, data, seg.size)
            os.fsync(self._active_fd)
        except OSError:
            try:  # take back a partial write; a later append overwrites it anyway
                os.ftruncate(self._active_fd, seg.size)
            except OSError:
                pass
            raise
        seg.size += len(data)
        self.bytes += len(data)

    def _enforce_bound(self, incoming: int) -> int:
        """Deletes the oldest segments until ``incoming`` more bytes fit; returns events lost."""
        dropped = 0
        while self.bytes + incoming > self.max_bytes and self._segments:
            seg = self._segments[0]
            if seg is self._active:
                break
            self._segments.pop(0)
            if self._reader is not None and self._reader[0] == seg.seq:
                self._close_reader()
            lost = seg.pending
            if self._reserved is not None and self._reserved[0] == seg.seq:
                # The caller holds that batch and will still deliver it: not lost.
                lost -= self._reserved[1]
                self.orphans += self._reserved[1]
                self._reserved = None
            self.events -= seg.pending
            self.bytes -= seg.size
            self._offset = 0
            dropped += lost
            seg.path.unlink(missing_ok=True)
        return dropped

    # -- reading ------------------------------------------------------------------------------

    def read(self, max_events: int) -> SpoolBatch | None:
        """The oldest unacknowledged records (at most ``max_events``, from one segment), or None.

        Reading does not consume: the same records come back until :meth:`commit`.
        """
        while self._segments:
            seg = self._segments[0]
            if self._offset >= seg.size:
                if seg is self._active:
                    return None
                self._retire_head()
                continue
            payloads, end = self._read_lines(seg, max_events)
            if payloads:
                self._reserved = (seg.seq, len(payloads))
                return SpoolBatch(payloads, seg.seq, end)
            self._offset = end  # only damaged lines: skip them for good
            try:
                self._persist_head()
            except OSError:
                pass  # a restart would skip them again
        return None

    def _read_lines(self, seg: _Segment, max_events: int) -> tuple[list[bytes], int]:
        if self._reader is None or self._reader[0] != seg.seq:
            self._close_reader()
            self._reader = (seg.seq, os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC))
        fd = self._reader[1]
        payloads: list[bytes] = []
        pos, want = self._offset, _READ_CHUNK
        while len(payloads) < max_events and pos < seg.size:
            chunk = os.pread(fd, min(want, seg.size - pos), pos)
            if not chunk:  # the file is shorter than we thought: nothing more in it
                return payloads, seg.size
            cut = chunk.rfind(b"\n")
            if cut < 0:
                if pos + len(chunk) >= seg.size:  # torn last line
                    return payloads, seg.size
                want *= 2  # one record longer than the chunk
                continue
            for body in chunk[:cut].split(b"\n"):
                if len(payloads) >= max_events:
                    break
                pos += len(body) + 1
                payload = decode_record(body)
                if payload is not None:
                    payloads.append(payload)
        return payloads, pos

    def _close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader[1])
            self._reader = None

    # -- acknowledging ------------------------------------------------------------------------

    def commit(self, batch: SpoolBatch) -> None:
        """Marks ``batch`` delivered. In-memory state moves first; OSError means only the
        committed-offset file could not be written (a crash would then replay some duplicates)."""
        self._reserved = None
        head = self._segments[0] if self._segments else None
        if head is None or batch.seq != head.seq or batch.end <= self._offset:
            self.orphans = 0  # its segment was dropped to honour max_bytes while it was out
            return
        head.pending -= len(batch.payloads)
        self.events -= len(batch.payloads)
        self._offset = batch.end
        self._persist_head()

    def _persist_head(self) -> None:
        head = self._segments[0]
        if self._offset < head.size:
            self._write_committed(head.seq, self._offset)
        else:
            self._retire_head()

    def _retire_head(self) -> None:
        """Deletes the fully acknowledged head segment (safe at any time: nothing in it is pending)."""
        seg = self._segments.pop(0)
        if self._reader is not None and self._reader[0] == seg.seq:
            self._close_reader()
        if seg is self._active:
            if self._active_fd is not None:
                os.close(self._active_fd)
            self._active, self._active_fd = None, None
        self.bytes -= seg.size
        self.events -= seg.pending  # zero unless damaged lines were miscounted
        self._offset = 0
        try:
            self._write_committed(seg.seq + 1, 0)
        except OSError:
            pass  # harmless: an older committed position still points at or before the next segment
        seg.path.unlink(missing_ok=True)

    def _write_committed(self, seq: int, offset: int) -> None:
        tmp = self.directory / (_COMMITTED + ".tmp")
        data = json.dumps({"segment": seq, "offset": offset}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / _COMMITTED)
        _fsync_dir(self.directory)

    def _load_committed(self) -> tuple[int, int]:
        try:
            doc = json.loads((self.directory / _COMMITTED).read_bytes())
            seq, offset = int(doc["segment"]), int(doc["offset"])
        except FileNotFoundError:
            return 0, 0
        except (ValueError, KeyError, TypeError):
            return 0, 0  # damaged: replay everything (duplicates are harmless)
        return max(seq, 0), max(offset, 0)

    def _path(self, seq: int) -> Path:
        return self.directory / f"seg-{seq:016d}.jsonl"
