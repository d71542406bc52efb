"""The NFLOG socket: a thin adapter that moves bytes between the kernel and ``core.nflog``.

    kernel nft rule `log group G prefix "egd:D:1001"`
        └─ nfnetlink_log ──(NETLINK_NETFILTER datagrams)──▶ NflogReader
               loop.add_reader → recv until EAGAIN (bounded) → core.nflog.parse_messages
               → on_packets(list[LoggedPacket])

Only one socket can bind a given group per network namespace; a second binder gets
``NflogGroupBusy``. Closing the socket releases the group. Overruns of the socket receive
buffer surface as ENOBUFS on recv and are counted in ``lost`` (each count is one overrun,
which may have dropped several packets).
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from egressd.core import nflog
from egressd.core.nflog import Ack, LoggedPacket, NetlinkError
from egressd.errors import EgressdError
from egressd.netns import entered
from egressd.sockbuf import set_buffer

log = structlog.get_logger("egressd.nflog")

NETLINK_NETFILTER = 12
RECV_SIZE = 256 * 1024  # above the kernel's 128 KiB batch limit, so a datagram fits
MAX_READS_PER_WAKEUP = 64
MAX_PENDING = 10_000  # packets kept while configuring, before start()


class NflogError(EgressdError):
    """The NFLOG socket could not be set up. ``errno`` is the kernel's answer, if any."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NflogGroupBusy(NflogError):
    """Another socket in this network namespace already receives the group."""


def socket_in_netns(netns: str | None) -> socket.socket:
    """A non-blocking NETLINK_NETFILTER socket, created inside the network namespace at path
    ``netns`` (e.g. /run/netns/NAME) when given; it stays in that namespace."""
    kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    if netns is None:
        return socket.socket(socket.AF_NETLINK, kind, NETLINK_NETFILTER)
    with entered(netns):
        return socket.socket(socket.AF_NETLINK, kind, NETLINK_NETFILTER)


class NflogReader:
    """Receives one NFLOG group. The constructor opens, binds and configures the socket
    (raising NflogError / NflogGroupBusy); ``start`` hands decoded packets to a callback."""

    def __init__(
        self,
        group: int,
        *,
        copy_range: int = 128,
        qthresh: int = 32,
        timeout_cs: int = 1,
        nlbufsiz: int | None = 65536,
        rcvbuf: int = 8 << 20,
        netns: str | None = None,
        ack_timeout: float = 2.0,
    ) -> None:
        self.group = group
        self.received = 0
        self.garbled = 0
        self.lost = 0
        self.errors = 0
        self.callback_errors = 0
        self._seq = 0
        self._pending: list[LoggedPacket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packets: Callable[[list[LoggedPacket]], Any] | None = None
        self._buf = bytearray(RECV_SIZE)
        self._closed = False
        self._sock = socket_in_netns(netns)
        try:
            set_buffer(self._sock, rcvbuf)
            self._sock.bind((0, 0))
            deadline = time.monotonic() + ack_timeout
            try:
                self._request(lambda seq: nflog.bind_group_msg(group, seq), deadline)
            except NflogError as e:
                # EPERM: another socket owns the group; EBUSY: this one already does.
                if e.errno in (errno.EPERM, errno.EBUSY):
                    raise NflogGroupBusy(
                        f"NFLOG group {group} is already bound by another socket in this network "
                        f"namespace (another egressd, ulogd, or a capture on nflog:{group})",
                        e.errno,
                    ) from e
                raise
            self._request(lambda seq: nflog.set_mode_msg(group, copy_range, seq), deadline)
            if nlbufsiz is not None:
                self._request(lambda seq: nflog.set_nlbufsiz_msg(group, nlbufsiz, seq), deadline)
            self._request(lambda seq: nflog.set_qthresh_msg(group, qthresh, seq), deadline)
            self._request(lambda seq: nflog.set_timeout_msg(group, timeout_cs, seq), deadline)
        except BaseException:
            self._sock.close()
            self._closed = True
            raise

    # --- set-up ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _request(self, build: Callable[[int], bytes], deadline: float) -> None:
        """Send one config request (``build(seq)``) and wait for its ack. Packets that arrive
        meanwhile are kept for ``start``. Raises NflogError carrying the kernel's errno."""
        seq = self._next_seq()
        try:
            self._sock.send(build(seq))
        except OSError as e:
            raise NflogError(f"NFLOG group {self.group}: send failed: {e}") from e
        poller = select.poll()  # not select(): the fd may be above FD_SETSIZE in a busy daemon
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NflogError(f"NFLOG group {self.group}: no ack from the kernel (seq {seq})")
            if not poller.poll(max(1, int(left * 1000))):
                continue
            for reply in self._read_burst(self._pending, MAX_READS_PER_WAKEUP):
                if reply.seq != seq:
                    continue
                if isinstance(reply, Ack):
                    return
                raise NflogError(f"NFLOG group {self.group}: kernel refused config: {reply}", reply.errno)
            del self._pending[MAX_PENDING:]

    # --- reading --------------------------------------------------------------------------

    def _read_burst(self, into: list[LoggedPacket], max_reads: int) -> list[Ack | NetlinkError]:
        """Read datagrams until EAGAIN (at most ``max_reads``), decode them, append packets to
        ``into`` and return the acks/errors seen. Never raises for socket errors."""
        replies: list[Ack | NetlinkError] = []
        for _ in range(max_reads):
            try:
                n = self._sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost += 1  # the receive buffer overran; the kernel dropped messages
                    continue
                self.errors += 1
                log.warning("nflog_recv_failed", group=self.group, error=str(e))
                break
            if n == 0:
                break
            truncated = n > len(self._buf)  # MSG_TRUNC: the datagram did not fit, its tail is gone
            packets, got, garbled = nflog.parse_messages(bytes(self._buf[: min(n, len(self._buf))]))
            self.garbled += max(garbled, 1) if truncated else garbled
            into.extend(packets)
            for r in got:
                if isinstance(r, NetlinkError) and r.overrun:
                    self.lost += 1
            replies.extend(got)
        return replies

    async def start(
        self,
        loop: asyncio.AbstractEventLoop | None,
        on_packets: Callable[[list[LoggedPacket]], Any],
    ) -> None:
        """Begin delivering decoded packets to ``on_packets`` (one call per socket wakeup).
        Packets that arrived during set-up are delivered first."""
        if self._closed:
            raise NflogError(f"NFLOG group {self.group}: reader is closed")
        if self._loop is not None:
            raise NflogError(f"NFLOG group {self.group}: already started")
        self._loop = loop or asyncio.get_running_loop()
        self._on_packets = on_packets
        pending, self._pending = self._pending, []
        if pending:
            self._loop.call_soon(self._deliver, pending)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        packets: list[LoggedPacket] = []
        for reply in self._read_burst(packets, MAX_READS_PER_WAKEUP):
            if isinstance(reply, NetlinkError) and not reply.overrun:
                self.errors += 1
                log.warning("nflog_netlink_error", group=self.group, error=str(reply))
        if packets:
            self._deliver(packets)

    def _deliver(self, packets: list[LoggedPacket]) -> None:
        self.received += len(packets)
        if self._on_packets is None:
            return
        try:
            self._on_packets(packets)
        except Exception:  # a bad callback must not stop the reader
            self.callback_errors += 1
            log.exception("nflog_callback_failed", group=self.group)

    # --- teardown -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "garbled": self.garbled,
            "lost": self.lost,
            "errors": self.errors,
            "callback_errors": self.callback_errors,
        }

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Stop reading, unbind the group (best effort) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        try:
            self._sock.send(nflog.unbind_group_msg(self.group, self._next_seq()))
        except OSError:
            pass  # closing the socket releases the group anyway
        self._sock.close()

