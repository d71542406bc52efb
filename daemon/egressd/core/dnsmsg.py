"""DNS wire messages: the little the DNS shim needs, and nothing more.

Pure (no I/O). A small hand-written reader of the RFC 1035 wire format, strict where a
firewall must be (one question, sane names, loop-free compression) and tolerant elsewhere.
Responses the shim makes itself echo the client's question bytes verbatim (0x20 case kept).

    parse_query(wire) -> Query          what a client asked
    deny_response / servfail_response / refused_response / formerr_response
    parse_answer(wire, id, qname, qtype) -> AnswerInfo   what upstream said, and the A/AAAA
                                        records reached from qname through the CNAME chain
    with_id, truncate_for_udp           small rewrites of a message

Every parse error is a DnsFormatError; nothing else escapes on hostile input.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from egressd.errors import DnsFormatError

# RCODEs, types, flags.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
CLASS_IN = 1
EDE_OPTION = 15  # RFC 8914 option code
EDE_BLOCKED = 15  # RFC 8914 INFO-CODE "Blocked"
EDE_OTHER = 0  # RFC 8914 INFO-CODE "Other" (the text says what)
EDNS_UDP_SIZE = 1232  # what the shim advertises in the OPT records it writes

_QR, _TC, _RD, _RA, _CD = 0x8000, 0x0200, 0x0100, 0x0080, 0x0010
_OPCODE_MASK = 0x7800
_DO = 0x8000  # DNSSEC OK bit in the OPT TTL
_MAX_CHAIN = 16
_MAX_NAME = 255

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")
_RRHDR = struct.Struct("!HHIH")
_OPT_HDR = struct.Struct("!BHHIH")  # root owner, type, class, ttl, rdlength

# Bytes allowed in a query name label: printable ASCII except '.' and '\\', so the
# dotted string form is unambiguous (names are compared as strings downstream).
_LABEL_OK = bytes(b for b in range(0x21, 0x7F) if b not in b".\\")

Labels = tuple[bytes, ...]


@dataclass(frozen=True)
class Query:
    """A client query. ``qname`` is lower-case ASCII (punycode), without the trailing dot."""

    id: int
    qname: str
    qtype: int
    qclass: int
    has_edns: bool
    udp_size: int  # 512 without EDNS
    wire: bytes
    question: bytes = b""  # the question section as sent (echoed verbatim in our answers)
    dnssec_ok: bool = False


@dataclass(frozen=True)
class AnswerInfo:
    """What an upstream answer says, as far as the firewall cares."""

    id: int
    rcode: int
    truncated: bool
    qname: str
    qtype: int
    addresses: tuple[tuple[str, int], ...]  # (ip, ttl) reached from qname, duplicates removed
    #: What answercache.ttl_offsets(wire) says of this answer, found in the same pass: the
    #: offsets of its TTL fields and the smallest TTL, or None when it must not be cached.
    ttls: tuple[tuple[int, ...], int] | None = field(default=None, compare=False, repr=False)


# --- reading --------------------------------------------------------------------------


def _header(wire: bytes) -> tuple[int, int, int, int, int, int]:
    if len(wire) < 12:
        raise DnsFormatError("message shorter than a DNS header")
    return _HEADER.unpack_from(wire)


def _read_name(buf: bytes, off: int) -> tuple[Labels, int]:
    """Read a (possibly compressed) name at ``off``; return its labels and the offset after it.

    Compression pointers must point into the body and strictly before the segment being
    read, so every jump goes backwards and reading always ends.
    """
    labels: list[bytes] = []
    size = len(buf)
    end = -1
    floor = off
    wire_len = 1
    while True:
        if off >= size:
            raise DnsFormatError("name runs past the end of the message")
        length = buf[off]
        if length == 0:
            return tuple(labels), (off + 1 if end < 0 else end)
        kind = length & 0xC0
        if kind == 0xC0:
            if off + 1 >= size:
                raise DnsFormatError("truncated compression pointer")
            ptr = ((length & 0x3F) << 8) | buf[off + 1]
            if ptr < 12 or ptr >= floor:
                raise DnsFormatError("bad compression pointer")
            if end < 0:
                end = off + 2
            off = floor = ptr
            continue
        if kind:
            raise DnsFormatError("unsupported label type")
        wire_len += length + 1
        if wire_len > _MAX_NAME:
            raise DnsFormatError("name longer than 255 octets")
        off += 1
        if off + length > size:
            raise DnsFormatError("label runs past the end of the message")
        labels.append(buf[off : off + length])
        off += length


def _read_question(buf: bytes, off: int) -> tuple[Labels, int, int, int]:
    labels, off = _read_name(buf, off)
    if off + 4 > len(buf):
        raise DnsFormatError("truncated question")
    qtype, qclass = _U16X2.unpack_from(buf, off)
    return labels, qtype, qclass, off + 4


def _read_rr(buf: bytes, off: int) -> tuple[Labels, int, int, int, int, int]:
    """Return owner, type, class, ttl, rdata start and rdata end (= offset of the next RR)."""
    owner, off = _read_name(buf, off)
    if off + 10 > len(buf):
        raise DnsFormatError("truncated resource record")
    rtype, rclass, ttl, rdlen = _RRHDR.unpack_from(buf, off)
    off += 10
    if off + rdlen > len(buf):
        raise DnsFormatError("record data runs past the end of the message")
    return owner, rtype, rclass, ttl, off, off + rdlen


def _lower(labels: Labels) -> Labels:
    return tuple(map(bytes.lower, labels))


def _qname_str(labels: Labels) -> str:
    for label in labels:
        if label.translate(None, _LABEL_OK):
            raise DnsFormatError("query name has a label with unsupported characters")
    return b".".join(labels).lower().decode("ascii")


def _labels_of(name: str) -> Labels:
    name = name.lower().rstrip(".")
    return tuple(name.encode("ascii").split(b".")) if name else ()


# --- queries --------------------------------------------------------------------------


def parse_query(wire: bytes) -> Query:
    """Parse a client query: QR=0, opcode QUERY, exactly one question, at most one OPT."""
    wire = bytes(wire)
    qid, flags, qdcount, ancount, nscount, arcount = _header(wire)
    if flags & _QR:
        raise DnsFormatError("not a query (QR bit set)")
    opcode = (flags & _OPCODE_MASK) >> 11
    if opcode != 0:
        raise DnsFormatError(f"unsupported opcode {opcode}")
    if qdcount != 1:
        raise DnsFormatError(f"expected exactly one question, got {qdcount}")
    labels, qtype, qclass, off = _read_question(wire, 12)
    qname = _qname_str(labels)
    question = wire[12:off]
    has_edns, udp_size, dnssec_ok = False, 512, False
    for i in range(ancount + nscount + arcount):
        owner, rtype, rclass, ttl, _, off = _read_rr(wire, off)
        if rtype != TYPE_OPT:
            continue
        if i < ancount + nscount:
            raise DnsFormatError("OPT record outside the additional section")
        if has_edns:
            raise DnsFormatError("more than one OPT record")
        if owner:
            raise DnsFormatError("OPT record owner is not the root")
        has_edns, udp_size, dnssec_ok = True, max(512, rclass), bool(ttl & _DO)
    if off != len(wire):
        raise DnsFormatError("trailing bytes after the message")
    return Query(qid, qname, qtype, qclass, has_edns, udp_size, wire, question, dnssec_ok)


def _question_of(q: Query) -> bytes:
    if q.question:
        return q.question
    out = bytearray()
    for label in _labels_of(q.qname):
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out) + _U16X2.pack(q.qtype, q.qclass)


def _opt(ext_rcode: int, dnssec_ok: bool, options: bytes) -> bytes:
    ttl = (ext_rcode << 24) | (_DO if dnssec_ok else 0)
    return _OPT_HDR.pack(0, TYPE_OPT, EDNS_UDP_SIZE, ttl, len(options)) + options


def _response(q: Query, rcode: int, options: bytes = b"") -> bytes:
    if not 0 <= rcode <= 0xFFF or (rcode > 15 and not q.has_edns):
        raise ValueError(f"rcode {rcode} cannot be sent in this response")
    qflags = _U16.unpack_from(q.wire, 2)[0] if len(q.wire) >= 4 else _RD
    flags = _QR | (qflags & (_RD | _CD)) | _RA | (rcode & 0xF)
    out = _HEADER.pack(q.id, flags, 1, 0, 0, 1 if q.has_edns else 0) + _question_of(q)
    if q.has_edns:
        out += _opt(rcode >> 4, q.dnssec_ok, options)
    return out


def deny_response(q: Query, rcode: int, ede_text: str, ede_code: int = EDE_BLOCKED) -> bytes:
    """Answer ``rcode`` with, when the query had EDNS, an Extended DNS Error (15 Blocked unless
    ``ede_code`` says otherwise)."""
    if not q.has_edns:
        return _response(q, rcode)
    # Keep the whole answer within 512 octets whatever the client's buffer size.
    budget = 512 - 12 - len(_question_of(q)) - _OPT_HDR.size - 6
    text = ede_text.encode("utf-8")[: max(budget, 0)].decode("utf-8", "ignore").encode("utf-8")
    option = struct.pack("!HHH", EDE_OPTION, 2 + len(text), ede_code) + text
    return _response(q, rcode, option)


def servfail_response(q: Query) -> bytes:
    return _response(q, SERVFAIL)


def refused_response(q: Query) -> bytes:
    return _response(q, REFUSED)


def formerr_response(wire: bytes) -> bytes | None:
    """Header-only FORMERR (NOTIMP for an opcode other than QUERY) for a message we could not use.

    None when not even the header is readable, or when the message is itself a response
    (answering responses invites loops and reflection).
    """
    if len(wire) < 12:
        return None
    qid, flags = _U16X2.unpack_from(wire)
    if flags & _QR:
        return None
    rcode = FORMERR if flags & _OPCODE_MASK == 0 else NOTIMP
    out_flags = _QR | (flags & (_OPCODE_MASK | _RD | _CD)) | _RA | rcode
    return _HEADER.pack(qid, out_flags, 0, 0, 0, 0)


def with_id(wire: bytes, id: int) -> bytes:  # noqa: A002 - the DNS field is called ID
    """The same message with another 16-bit ID."""
    if len(wire) < 2:
        raise DnsFormatError("message shorter than an ID")
    return _U16.pack(id & 0xFFFF) + bytes(wire[2:])


def truncate_for_udp(answer_wire: bytes, q: Query) -> bytes:
    """If the answer exceeds the client's UDP size, header + question with TC=1, else unchanged."""
    if len(answer_wire) <= q.udp_size:
        return answer_wire
    qid, flags = _U16X2.unpack_from(answer_wire)
    out = _HEADER.pack(qid, flags | _TC, 1, 0, 0, 1 if q.has_edns else 0) + _question_of(q)
    if q.has_edns:
        out += _opt(0, q.dnssec_ok, b"")
    return out


# --- answers --------------------------------------------------------------------------


def _address(rtype: int, rdata: bytes) -> str:
    if rtype == TYPE_A:
        if len(rdata) != 4:
            raise DnsFormatError("A record with bad length")
        return "%d.%d.%d.%d" % tuple(rdata)
    if len(rdata) != 16:
        raise DnsFormatError("AAAA record with bad length")
    return str(ipaddress.IPv6Address(rdata))


def parse_answer(wire: bytes, expect_id: int, expect_qname: str, expect_qtype: int) -> AnswerInfo:
    """Parse an upstream answer to the query (expect_id, expect_qname, expect_qtype).

    Raises DnsFormatError on garbage and on answers to another question (spoofed or stray).
    An error answer (not NOERROR/NXDOMAIN) without a question section is accepted.
    A truncated answer is not read past its question: its records may be cut.
    """
    wire = bytes(wire)
    qid, flags, qdcount, ancount, nscount, arcount = _header(wire)
    if qid != expect_id:
        raise DnsFormatError("answer ID does not match the query")
    if not flags & _QR:
        raise DnsFormatError("not a response (QR bit clear)")
    if flags & _OPCODE_MASK:
        raise DnsFormatError("response opcode is not QUERY")
    rcode = flags & 0xF
    truncated = bool(flags & _TC)
    want = _labels_of(expect_qname)
    qname = b".".join(want).decode("ascii")
    if qdcount == 0 and rcode not in (NOERROR, NXDOMAIN):
        return AnswerInfo(qid, rcode, truncated, qname, expect_qtype, ())
    if qdcount != 1:
        raise DnsFormatError(f"expected exactly one question, got {qdcount}")
    labels, qtype, _, off = _read_question(wire, 12)
    if qtype != expect_qtype or _lower(labels) != want:
        raise DnsFormatError("answer is for another question")
    if truncated:
        return AnswerInfo(qid, rcode, True, qname, expect_qtype, ())

    cnames: dict[Labels, Labels] = {}
    found: list[tuple[Labels, str, int]] = []
    offsets: list[int] = []  # the TTL fields of every record but OPT (for the answer cache)
    low = -1
    for i in range(ancount + nscount + arcount):
        owner, rtype, rclass, ttl, start, off = _read_rr(wire, off)
        if rtype != TYPE_OPT:
            offsets.append(start - 6)
            if low < 0 or ttl < low:
                low = ttl
        if i < ancount:
            if rclass != CLASS_IN:
                continue
            if rtype == TYPE_CNAME:
                target, end = _read_name(wire, start)
                if end != off:
                    raise DnsFormatError("CNAME record with bad length")
                cnames.setdefault(_lower(owner), _lower(target))
            elif rtype in (TYPE_A, TYPE_AAAA):
                ttl = 0 if ttl & 0x80000000 else ttl  # RFC 2181 section 8
                found.append((_lower(owner), _address(rtype, wire[start:off]), ttl))
        elif rtype == TYPE_OPT and i >= ancount + nscount:
            rcode |= (ttl >> 24) << 4  # extended RCODE (RFC 6891)

    chain = {want}
    name = want
    for _ in range(_MAX_CHAIN):
        target = cnames.get(name)
        if target is None or target in chain:
            break
        chain.add(target)
        name = target

    addresses: dict[str, int] = {}
    for owner, ip, ttl in found:
        if owner in chain:
            addresses[ip] = min(ttl, addresses.get(ip, ttl))
    # Cacheable as ttl_offsets() decides: NOERROR or NXDOMAIN (the header's 4 bits), no
    # trailing bytes, some record, every TTL at least 1 s and below 2^31.
    ttls = (tuple(offsets), low) if (
        flags & 0xF in (NOERROR, NXDOMAIN) and off == len(wire) and 1 <= low < 0x80000000) else None
    return AnswerInfo(qid, rcode, False, qname, expect_qtype, tuple(addresses.items()), ttls)
