"""Adding (and deleting) timeout-set elements over one raw NETLINK_NETFILTER socket (no libnftables on the DNS path).

The kernel runs an nfnetlink batch inside sendmsg(), so its ACKs are queued when send returns: the
writer sends one batch and reads the ACKs back at once (a receive timeout guards against a kernel
that stays silent). The socket belongs to the network namespace it was opened in: open the writer
in the namespace whose ruleset it must change."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Mapping

from .core.nfmsg import (
    Batch,
    DumpedElement,
    DumpError,
    Element,
    add_batch,
    delete_batch,
    getsetelem_dump,
    parse_acks,
    parse_setelem_dump,
)
from .errors import ApplyError
from .sockbuf import set_buffer

TABLE = "egressd"  # of family inet
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # error ACKs carry the request's header only, not the whole request
_BUF = 4 * 1024 * 1024
_RECV = 256 * 1024


class NftSetError(ApplyError):
    """A batch the kernel refused (nothing of it applied), or a set that could not be read back.
    errno and set name of the first error."""

    def __init__(self, set_name: str, err: int, doing: str = "adding elements to") -> None:
        self.set_name = set_name
        self.errno = err
        super().__init__(f"{doing} set inet {TABLE} {set_name}: "
                         f"{errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _open(timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        s.bind((0, 0))
        # Forced past net.core.wmem_max: at Debian's default a batch over about 416 KB (about
        # 3,100 IPs, at 137 bytes an IP with a 22-character name) failed with EMSGSIZE.
        set_buffer(s, _BUF, send=True)
        set_buffer(s, _BUF)
        try:
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass
        # The kernel enforces the receive timeout (SO_RCVTIMEO): a Python-level timeout would
        # poll() before every send and receive, two more system calls per batch.
        sec = int(timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((timeout - sec) * 1e6)))
    except BaseException:
        s.close()
        raise
    return s


class NftSetWriter:
    def __init__(self, *, timeout: float = 2.0) -> None:
        self._sock = _open(timeout)
        self._seq = int.from_bytes(os.urandom(2), "little") << 8
        self._dirty = False  # replies of a timed-out batch may still arrive
        #: Whether the kernel takes DESTROYSETELEM (None: not known until the first delete).
        self.destroy: bool | None = None

    def close(self) -> None:
        self._sock.close()

    def add(self, sets: Mapping[str, Iterable[Element]]) -> int:
        """Add elements (resetting their timeouts) to sets of table inet egressd as one transaction.
        Returns the number of messages sent; raises NftSetError naming the set and errno, after
        which nothing of the batch applied."""
        return self._send(add_batch(TABLE, sets, self._seq), "adding elements to")

    def delete(self, sets: Mapping[str, Iterable[str]]) -> int:
        """Take IPs out of sets of table inet egressd as one transaction, whether the kernel still
        holds them or not (see delete_batch). Returns the number of messages sent; raises
        NftSetError (a set that is missing: ENOENT), after which nothing of the batch applied.
        The first delete tries DESTROYSETELEM; a kernel that does not know it (before 6.3:
        EINVAL, or EOPNOTSUPP) gets the add-then-delete form from then on."""
        if self.destroy is not False:
            try:
                n = self._send(delete_batch(TABLE, sets, self._seq, destroy=True), "deleting elements from")
            except NftSetError as e:
                if self.destroy is not None or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.destroy = False
            else:
                self.destroy = True
                return n
        return self._send(delete_batch(TABLE, sets, self._seq), "deleting elements from")

    def _send(self, batch: Batch, doing: str) -> int:
        self._seq = batch.next_seq & 0xFFFFFFFF
        if batch.next_seq > 0xFFFFFF00:
            self._seq = 1
        if not batch.acks:
            return 0
        if self._dirty:
            self._drain()
        self._sock.sendall(batch.data)
        pending = set(batch.acks)
        first: tuple[str, int] | None = None
        while pending:
            try:
                data = self._sock.recv(_RECV)
            except (BlockingIOError, TimeoutError) as e:  # SO_RCVTIMEO ran out: EAGAIN
                self._dirty = True
                raise NftSetError(next(iter(batch.acks.values())), errno.ETIMEDOUT, doing) from e
            for seq, err in parse_acks(data):
                if seq == batch.begin_seq and err:
                    # The batch as a whole was refused (EPERM, no nf_tables...): no more ACKs come.
                    raise NftSetError(next(iter(batch.acks.values())), err, doing)
                if seq in pending:
                    pending.discard(seq)
                    if err and first is None:
                        first = (batch.acks[seq], err)
        if first is not None:
            raise NftSetError(*first, doing)
        return len(batch.acks)

    def dump(self, set_name: str) -> list[DumpedElement]:
        """Every element of set inet egressd ``set_name``: one GETSETELEM dump, with no libnftables
        cache and no JSON, so reading 100,000 elements back costs little more than the elements
        themselves. Raises NftSetError (ENOENT when there is no such set, ETIMEDOUT when the
        kernel stays silent)."""
        if self._dirty:
            self._drain()
        seq = self._seq
        self._seq = (seq + 1) & 0xFFFFFFFF or 1
        self._sock.sendall(getsetelem_dump(TABLE, set_name, seq))
        out: list[DumpedElement] = []
        done = False
        while not done:
            try:
                data = self._sock.recv(_RECV)
            except (BlockingIOError, TimeoutError) as e:
                self._dirty = True
                raise NftSetError(set_name, errno.ETIMEDOUT, "reading") from e
            try:
                els, done = parse_setelem_dump(data, seq)
            except DumpError as e:
                self._dirty = True  # the rest of a malformed dump may still come
                raise NftSetError(set_name, e.errno or errno.EPROTO, "reading") from e
            out += els
        return out

    def _drain(self) -> None:
        """Drop stale replies (of a batch given up on after a timeout) before a new one."""
        while select.select([self._sock], [], [], 0)[0]:
            self._sock.recv(_RECV)
        self._dirty = False
