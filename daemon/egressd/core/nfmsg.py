"""nfnetlink messages that add timeout-set elements, built by hand (struct.pack). Pure: bytes out.

One batch (NFNL_MSG_BATCH_BEGIN … END) is one nftables transaction: it all applies or nothing
does. For each set it holds, per chunk of elements, the same three steps as the text commands of
``program_elements``: add, delete, add, so that an existing entry gets its timeout reset on kernels
that do not update timeouts on add. Every message but the batch markers asks for an ACK.

Element comments are nftables' element user data (TLV type NFTNL_UDATA_SET_ELEM_COMMENT, a
NUL-terminated string), the form ``nft`` itself writes, so a listing (and Engine.adopt) reads them
back as ``comment``."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFPROTO_INET = 1

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
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


def comment_text(name: str) -> str:
    """An element comment from a DNS name: [a-z0-9._-*] kept, anything else dropped, never escaped."""
    return "".join(c for c in name if c.isalnum() or c in "._-*")[:COMMENT_MAX]


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) & 3)


def _attr(atype: int, payload: bytes) -> bytes:
    return _pad(_NLA.pack(_NLA.size + len(payload), atype) + payload)


def _nest(atype: int, parts: bytes) -> bytes:
    return _NLA.pack(_NLA.size + len(parts), atype | NLA_F_NESTED) + parts


def _key(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def element_attr(el: Element, *, key_only: bool = False) -> bytes:
    """One NFTA_LIST_ELEM: key, and unless key_only the timeout (ms) and the comment."""
    parts = _nest(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, _key(el.ip)))
    if not key_only:
        parts += _attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", int(el.timeout_s) * 1000))
        text = comment_text(el.comment).encode()
        if text:
            udata = bytes((NFTNL_UDATA_SET_ELEM_COMMENT, len(text) + 1)) + text + b"\0"
            parts += _attr(NFTA_SET_ELEM_USERDATA, udata)
    return _nest(NFTA_LIST_ELEM, parts)


def _message(mtype: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(family, 0, res_id) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), mtype, flags, seq, 0) + body


def setelem_message(kind: int, table: str, set_name: str, elements: Iterable[Element], seq: int) -> bytes:
    """One NEWSETELEM (kind=NFT_MSG_NEWSETELEM) or DELSETELEM message for elements of one set."""
    key_only = kind == NFT_MSG_DELSETELEM
    elems = b"".join(element_attr(e, key_only=key_only) for e in elements)
    attrs = (
        _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
        + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, elems)
    )
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
    return _message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, NFPROTO_INET, 0, attrs)


@dataclass(frozen=True)
class Batch:
    data: bytes
    begin_seq: int
    #: seq -> set name of every message that asks for an ACK, in order.
    acks: dict[int, str]
    next_seq: int


def add_batch(table: str, sets: Mapping[str, Iterable[Element]], seq: int) -> Batch:
    """A batch that adds (resetting their timeouts) elements to named sets of an inet table.

    An IP given twice for one set is added once, with the longest timeout (a delete of the same
    element twice in one transaction would fail it)."""
    res = struct.unpack("=H", struct.pack(">H", NFNL_SUBSYS_NFTABLES))[0]
    begin_seq = seq
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res, b"")]
    acks: dict[int, str] = {}
    seq += 1
    for set_name, elements in sets.items():
        uniq: dict[str, Element] = {}
        for e in elements:
            have = uniq.get(e.ip)
            if have is None or e.timeout_s > have.timeout_s:
                uniq[e.ip] = e
        items = list(uniq.values())
        for i in range(0, len(items), CHUNK):
            chunk = items[i : i + CHUNK]
            for kind in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM):
                out.append(setelem_message(kind, table, set_name, chunk, seq))
                acks[seq] = set_name
                seq += 1
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, res, b""))
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
