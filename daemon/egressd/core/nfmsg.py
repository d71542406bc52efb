"""nfnetlink messages that add (and delete) timeout-set elements, built by hand (struct.pack). Pure: bytes out.

One batch (NFNL_MSG_BATCH_BEGIN … END) is one nftables transaction: it all applies or nothing
does. For each set it holds, per chunk of elements, the same three steps as the text commands of
``program_elements``: add, delete, add, so that an existing entry gets its timeout reset on kernels
that do not update timeouts on add. Every message but the batch markers asks for an ACK.

Element comments are nftables' element user data (TLV type NFTNL_UDATA_SET_ELEM_COMMENT, a
NUL-terminated string), the form ``nft`` itself writes, so a listing (and Engine.adopt) reads them
back as ``comment``."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
#: Deletes elements and ignores those that are missing (Linux 6.3 and later).
NFT_MSG_DESTROYSETELEM = 30
NFPROTO_INET = 1

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP_INTR = 0x10
NLA_F_NESTED = 0x8000

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0

#: Elements per message: keeps the nested element list far below its 64 KiB attribute limit.
CHUNK = 256
#: Longest element comment kept (nftables' own limit is 128 bytes with the NUL).
COMMENT_MAX = 120

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)
_NLA = struct.Struct("=HH")  # len, type
_ERR = struct.Struct("=i")


@dataclass(frozen=True)
class Element:
    ip: str
    timeout_s: int
    comment: str


@lru_cache(maxsize=4096)
def comment_text(name: str) -> str:
    """An element comment from a DNS name: [a-z0-9._-*] kept, anything else dropped, never escaped."""
    if _COMMENT_PLAIN(name):  # the usual name, kept whole: no pass per character
        return name[:COMMENT_MAX]
    return "".join(c for c in name if c.isalnum() or c in "._-*")[:COMMENT_MAX]


_COMMENT_PLAIN = re.compile(r"[A-Za-z0-9._*-]*").fullmatch


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) & 3)


def _attr(atype: int, payload: bytes) -> bytes:
    return _pad(_NLA.pack(_NLA.size + len(payload), atype) + payload)


def _nest(atype: int, parts: bytes) -> bytes:
    return _NLA.pack(_NLA.size + len(parts), atype | NLA_F_NESTED) + parts


# The fixed parts of an element, packed once: the key's nest and value headers by address size,
# the timeout's header.
_KEY_HDR = {n: _NLA.pack(8 + n, NFTA_SET_ELEM_KEY | NLA_F_NESTED) + _NLA.pack(4 + n, NFTA_DATA_VALUE)
            for n in (4, 16)}
_TIMEOUT_HDR = _NLA.pack(12, NFTA_SET_ELEM_TIMEOUT)
_BE64 = struct.Struct(">Q")
_ELEM_HDR = struct.Struct("=HH")


def _key(ip: str) -> bytes:
    """4 or 16 bytes of an address (ValueError if it is none)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError as e:
        raise ValueError(f"not an IP address: {ip!r}") from e


@lru_cache(maxsize=4096)
def _udata(comment: str) -> bytes:
    text = comment_text(comment).encode()
    if not text:
        return b""
    return _attr(NFTA_SET_ELEM_USERDATA, bytes((NFTNL_UDATA_SET_ELEM_COMMENT, len(text) + 1)) + text + b"\0")


def element_attr(el: Element, *, key_only: bool = False) -> bytes:
    """One NFTA_LIST_ELEM: key, and unless key_only the timeout (ms) and the comment."""
    key = _key(el.ip)
    parts = _KEY_HDR[len(key)] + key
    if not key_only:
        parts += _TIMEOUT_HDR + _BE64.pack(int(el.timeout_s) * 1000) + _udata(el.comment)
    return _ELEM_HDR.pack(4 + len(parts), NFTA_LIST_ELEM | NLA_F_NESTED) + parts


def _message(mtype: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(family, 0, res_id) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, flags, seq, 0) + body


def _setelem(kind: int, prefix: bytes, elems: bytes, seq: int) -> bytes:
    """One NEWSETELEM/DELSETELEM message: prefix holds the table and set attributes."""
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
    attrs = prefix + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, elems)
    return _message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, NFPROTO_INET, 0, attrs)


def _prefix(table: str, set_name: str) -> bytes:
    return _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(
        NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")


def setelem_message(kind: int, table: str, set_name: str, elements: Iterable[Element], seq: int) -> bytes:
    """One NEWSETELEM (kind=NFT_MSG_NEWSETELEM) or DELSETELEM message for elements of one set."""
    key_only = kind == NFT_MSG_DELSETELEM
    elems = b"".join(element_attr(e, key_only=key_only) for e in elements)
    return _setelem(kind, _prefix(table, set_name), elems, seq)


@dataclass(frozen=True)
class Batch:
    data: bytes
    begin_seq: int
    #: seq -> set name of every message that asks for an ACK, in order.
    acks: dict[int, str]
    next_seq: int


_RES_NFTABLES = struct.unpack("=H", struct.pack(">H", NFNL_SUBSYS_NFTABLES))[0]


def add_batch(table: str, sets: Mapping[str, Iterable[Element]], seq: int) -> Batch:
    """A batch that adds (resetting their timeouts) elements to named sets of an inet table.

    An IP given twice for one set is added once, with the longest timeout (a delete of the same
    element twice in one transaction would fail it)."""
    begin_seq = seq
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, _RES_NFTABLES, b"")]
    acks: dict[int, str] = {}
    seq += 1
    for set_name, elements in sets.items():
        uniq: dict[str, Element] = {}
        for e in elements:
            have = uniq.get(e.ip)
            if have is None or e.timeout_s > have.timeout_s:
                uniq[e.ip] = e
        items = list(uniq.values())
        prefix = _prefix(table, set_name)
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            full = b"".join([element_attr(e) for e in chunk])
            keys = b"".join([element_attr(e, key_only=True) for e in chunk])
            out.append(_setelem(NFT_MSG_NEWSETELEM, prefix, full, seq))
            out.append(_setelem(NFT_MSG_DELSETELEM, prefix, keys, seq + 1))
            out.append(_setelem(NFT_MSG_NEWSETELEM, prefix, full, seq + 2))
            for k in range(3):
                acks[seq + k] = set_name
            seq += 3
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, _RES_NFTABLES, b""))
    return Batch(b"".join(out), begin_seq, acks, seq + 1)


_BARE = {n: _ELEM_HDR.pack(4 + len(_KEY_HDR[n]) + n, NFTA_LIST_ELEM | NLA_F_NESTED) + _KEY_HDR[n] for n in (4, 16)}


def bare_key(ip: str) -> bytes:
    """One NFTA_LIST_ELEM holding only the key: element_attr(key_only=True) for a delete, in a
    third of the time (ValueError if ``ip`` is no address)."""
    try:
        if ":" in ip:
            return _BARE[16] + socket.inet_pton(socket.AF_INET6, ip)
        return _BARE[4] + socket.inet_pton(socket.AF_INET, ip)
    except OSError as e:
        raise ValueError(f"not an IP address: {ip!r}") from e


def delete_batch(table: str, sets: Mapping[str, Iterable[str]], seq: int, *, destroy: bool = False) -> Batch:
    """A batch that takes IPs out of named sets of an inet table, whether or not the kernel still
    holds them, so it never fails with ENOENT for an element (a missing set still fails it).
    ``destroy``: one DESTROYSETELEM per chunk (Linux 6.3 and later), which skips missing
    elements. Else, per chunk, an add of the bare keys (a no-op for a live element; a new element
    beside one that timed out and is not yet collected), then their delete: on this project's
    VM 2.2 µs an IP in all against destroy's 1.4. A live element deleted is freed by the commit
    (the explicit deletes of ipcache.GRACE); one that had timed out stays for the collector."""
    begin_seq = seq
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, _RES_NFTABLES, b"")]
    acks: dict[int, str] = {}
    seq += 1
    for set_name, ips in sets.items():
        items = list(dict.fromkeys(ips))  # a delete of the same element twice would fail the batch
        prefix = _prefix(table, set_name)
        for i in range(0, len(items), CHUNK):
            keys = b"".join([bare_key(ip) for ip in items[i : i + CHUNK]])
            if destroy:
                out.append(_setelem(NFT_MSG_DESTROYSETELEM, prefix, keys, seq))
                acks[seq] = set_name
                seq += 1
                continue
            out.append(_setelem(NFT_MSG_NEWSETELEM, prefix, keys, seq))
            out.append(_setelem(NFT_MSG_DELSETELEM, prefix, keys, seq + 1))
            acks[seq] = acks[seq + 1] = set_name
            seq += 2
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, _RES_NFTABLES, b""))
    return Batch(b"".join(out), begin_seq, acks, seq + 1)


def parse_acks(data: bytes) -> list[tuple[int, int]]:
    """(seq, errno) of every NLMSG_ERROR in a buffer of netlink messages (errno 0: an ACK)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            break
        if mtype == NLMSG_ERROR and off + _NLMSG.size + _ERR.size <= len(data):
            (err,) = _ERR.unpack_from(data, off + _NLMSG.size)
            out.append((seq, -err))
        off += (length + 3) & ~3
    return out


# --- reading a set back (Engine.adopt): a GETSETELEM dump, parsed without libnftables' JSON ---


class DumpError(ValueError):
    """A dump reply that is not what a GETSETELEM dump sends (or an error the kernel sent back)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class DumpedElement:
    ip: str
    #: Milliseconds until the kernel drops it (None for an element without a timeout).
    expires_ms: int | None
    comment: str


def getsetelem_dump(table: str, set_name: str, seq: int) -> bytes:
    """The request for every element of one set of an inet table."""
    return _message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, _prefix(table, set_name))


def _attrs(data: bytes, off: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in data[off:end]."""
    while off + _NLA.size <= end:
        length, atype = _NLA.unpack_from(data, off)
        if length < _NLA.size or off + length > end:
            raise DumpError(f"attribute of length {length} at {off} overruns its message")
        yield atype & 0x3FFF, off + _NLA.size, off + length
        off += (length + 3) & ~3


def _comment(data: bytes, start: int, end: int) -> str:
    """The element comment from nftables' user data TLVs (type, length, value...)."""
    off = start
    while off + 2 <= end:
        utype, ulen = data[off], data[off + 1]
        if off + 2 + ulen > end:
            break
        if utype == NFTNL_UDATA_SET_ELEM_COMMENT:
            return data[off + 2 : off + 2 + ulen].split(b"\0", 1)[0].decode("utf-8", "replace")
        off += 2 + ulen
    return ""


def _element(data: bytes, start: int, end: int) -> DumpedElement | None:
    ip: str | None = None
    expires: int | None = None
    comment = ""
    for atype, a, b in _attrs(data, start, end):
        if atype == NFTA_SET_ELEM_KEY:
            for vtype, va, vb in _attrs(data, a, b):
                if vtype == NFTA_DATA_VALUE and vb - va in (4, 16):
                    ip = socket.inet_ntop(socket.AF_INET if vb - va == 4 else socket.AF_INET6, data[va:vb])
        elif atype == NFTA_SET_ELEM_EXPIRATION and b - a == 8:
            (expires,) = _BE64.unpack_from(data, a)
        elif atype == NFTA_SET_ELEM_USERDATA:
            comment = _comment(data, a, b)
    return None if ip is None else DumpedElement(ip, expires, comment)


def parse_setelem_dump(data: bytes, seq: int) -> tuple[list[DumpedElement], bool]:
    """The elements in one buffer of dump replies to request ``seq``, and whether the dump is done.
    Raises DumpError for an error reply (errno set) or a malformed message."""
    out: list[DumpedElement] = []
    done = False
    off = 0
    new_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
    while off + _NLMSG.size <= len(data):
        length, mtype, flags, mseq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            raise DumpError(f"netlink message of length {length} at {off} overruns the buffer")
        end = off + length
        if mseq == seq:
            if flags & NLM_F_DUMP_INTR:
                raise DumpError("the set changed during the dump (NLM_F_DUMP_INTR)")
            if mtype == NLMSG_ERROR:
                (err,) = _ERR.unpack_from(data, off + _NLMSG.size) if length >= _NLMSG.size + 4 else (0,)
                if err:
                    raise DumpError(f"kernel refused the dump: errno {-err}", -err)
                done = True
            elif mtype == NLMSG_DONE:
                done = True
            elif mtype == new_type:
                body = off + _NLMSG.size + _NFGEN.size
                for atype, a, b in _attrs(data, body, end):
                    if atype != NFTA_SET_ELEM_LIST_ELEMENTS:
                        continue
                    for etype, ea, eb in _attrs(data, a, b):
                        if etype == NFTA_LIST_ELEM:
                            el = _element(data, ea, eb)
                            if el is not None:
                                out.append(el)
        off += (length + 3) & ~3
    return out, done
