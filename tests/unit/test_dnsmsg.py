"""egressd.core.dnsmsg against messages built (and decoded) with dnslib."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from dnslib import AAAA, CNAME, DNSHeader, DNSQuestion, DNSRecord, EDNS0, QTYPE, RCODE, RD, RR, A
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.core import dnsmsg
from egressd.core.answercache import ttl_offsets
from egressd.core.dnsmsg import (
    AnswerInfo,
    Query,
    deny_response,
    formerr_response,
    parse_answer,
    parse_query,
    refused_response,
    servfail_response,
    truncate_for_udp,
    with_id,
)
from egressd.errors import DnsFormatError


def query_wire(name: str = "www.example.com", qtype: str = "A", *, edns: int | None = None,
               do: bool = False, qid: int = 0x1234, rd: bool = True) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=int(rd)))
    rec.add_question(DNSRecord.question(name, qtype).q)
    if edns is not None:
        rec.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return rec.pack()


def header(qid: int = 7, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QTAIL = struct.pack("!HH", 1, 1)
NAME = b"\x03www\x07example\x03com\x00"
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


# --- parse_query ------------------------------------------------------------------------


def test_parse_query_basic() -> None:
    wire = query_wire("WWW.Example.COM.", "AAAA", qid=99)
    q = parse_query(wire)
    assert q == Query(99, "www.example.com", 28, 1, False, 512, wire, q.question, False)
    assert q.question == wire[12:]
    assert b"WWW" in q.question  # the client's case is kept for echoing


@pytest.mark.parametrize(
    ("udp_len", "do", "expect_size"),
    [(4096, False, 4096), (1232, True, 1232), (100, False, 512), (65535, False, 65535)],
)
def test_parse_query_edns(udp_len: int, do: bool, expect_size: int) -> None:
    q = parse_query(query_wire(edns=udp_len, do=do))
    assert q.has_edns and q.udp_size == expect_size and q.dnssec_ok is do


@pytest.mark.parametrize(
    ("name", "expect"),
    [(".", ""), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
     ("_dmarc.Ex.org", "_dmarc.ex.org")],
)
def test_parse_query_names(name: str, expect: str) -> None:
    assert parse_query(query_wire(name)).qname == expect


LONG_NAME = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 octets

BAD_QUERIES = {
    "empty": b"",
    "short header": b"\x00\x01\x00",
    "response": header(flags=0x8100) + NAME + QTAIL,
    "opcode notify": header(flags=4 << 11) + NAME + QTAIL,
    "opcode update": header(flags=5 << 11) + NAME + QTAIL,
    "no question": header(qd=0),
    "two questions": header(qd=2) + NAME + QTAIL + NAME + QTAIL,
    "question cut": header() + NAME + b"\x00",
    "label past end": header() + b"\x07exam",
    "name without end": header() + b"\x03www",
    "pointer in question": header() + b"\x03www\xc0\x0c" + QTAIL,
    "pointer to header": header() + b"\xc0\x02" + QTAIL,
    "extended label type": header() + b"\x41abc\x00" + QTAIL,
    "name too long": header() + LONG_NAME + QTAIL,
    "dot in label": header() + b"\x05a.com\x00" + QTAIL,
    "space in label": header() + b"\x03a b\x00" + QTAIL,
    "non-ascii label": header() + b"\x02\xc3\xa9\x00" + QTAIL,
    "backslash in label": header() + b"\x02a\\\x00" + QTAIL,
    "trailing bytes": header() + NAME + QTAIL + b"\x00",
    "missing additional": header(ar=1) + NAME + QTAIL,
    "two OPT": header(ar=2) + NAME + QTAIL + OPT + OPT,
    "OPT in answer": header(an=1) + NAME + QTAIL + OPT,
    "OPT not at root": header(ar=1) + NAME + QTAIL + b"\xc0\x0c" + OPT[1:],
    "rdata past end": header(ar=1) + NAME + QTAIL + b"\x00" + struct.pack("!HHIH", 41, 512, 0, 9),
}


@pytest.mark.parametrize("wire", list(BAD_QUERIES.values()), ids=list(BAD_QUERIES))
def test_parse_query_rejects(wire: bytes) -> None:
    with pytest.raises(DnsFormatError) as err:
        parse_query(wire)
    assert str(err.value)


def test_parse_query_follows_backward_pointer_in_additional() -> None:
    # An additional record whose owner is compressed to the question name is fine.
    wire = header(ar=1) + NAME + QTAIL + b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0, 1) + b"\x00"
    assert parse_query(wire).qname == "www.example.com"


# --- responses made by the shim -------------------------------------------------------


def ede_options(rec: DNSRecord) -> list[bytes]:
    return [o.data for rr in rec.ar if rr.rtype == QTYPE.OPT for o in rr.rdata if o.code == 15]


@pytest.mark.parametrize("rcode", [RCODE.NXDOMAIN, RCODE.REFUSED])
def test_deny_response_with_edns(rcode: int) -> None:
    q = parse_query(query_wire("Blocked.Example.COM", edns=4096, do=True, qid=4242))
    rec = DNSRecord.parse(deny_response(q, rcode, "denied by policy restricted-etl"))
    assert rec.header.id == 4242 and rec.header.qr == 1 and rec.header.ra == 1
    assert rec.header.rd == 1 and rec.header.rcode == rcode and rec.header.aa == 0
    assert str(rec.q.qname) == "Blocked.Example.COM."  # question echoed verbatim
    assert rec.rr == [] and len(rec.ar) == 1
    opt = rec.ar[0]
    assert opt.rtype == QTYPE.OPT and opt.edns_do == 1 and opt.edns_rcode == 0
    assert ede_options(rec) == [b"\x00\x0f" + b"denied by policy restricted-etl"]


def test_deny_response_without_edns_has_no_opt() -> None:
    q = parse_query(query_wire("blocked.example.com", rd=False, qid=1))
    rec = DNSRecord.parse(deny_response(q, RCODE.NXDOMAIN, "denied"))
    assert rec.header.rcode == RCODE.NXDOMAIN and rec.header.rd == 0 and rec.header.ra == 1
    assert rec.ar == [] and rec.header.ar == 0
    assert str(rec.q.qname) == "blocked.example.com." and rec.q.qtype == QTYPE.A


def test_deny_response_text_is_cut_to_fit_512() -> None:
    name = ".".join(["a" * 60] * 4)  # 245 octets
    q = parse_query(query_wire(name, edns=4096))
    wire = deny_response(q, RCODE.NXDOMAIN, "é" * 400)
    assert len(wire) <= 512
    (data,) = ede_options(DNSRecord.parse(wire))
    assert data[:2] == b"\x00\x0f" and set(data[2:].decode("utf-8")) == {"é"}


def test_deny_response_from_a_bare_query_object() -> None:
    q = Query(5, "pypi.org", 1, 1, True, 1232, b"")
    rec = DNSRecord.parse(deny_response(q, 3, "x"))
    assert str(rec.q.qname) == "pypi.org." and rec.header.id == 5
    assert ede_options(rec) == [b"\x00\x0fx"]


@pytest.mark.parametrize(("make", "rcode"), [(servfail_response, 2), (refused_response, 5)])
@pytest.mark.parametrize("edns", [None, 1232])
def test_servfail_refused(make, rcode: int, edns: int | None) -> None:  # noqa: ANN001
    q = parse_query(query_wire(edns=edns, qid=77))
    rec = DNSRecord.parse(make(q))
    assert rec.header.id == 77 and rec.header.rcode == rcode and rec.header.qr == 1
    assert str(rec.q.qname) == "www.example.com."
    assert len(rec.ar) == (1 if edns else 0) and ede_options(rec) == []


@pytest.mark.parametrize(
    ("wire", "rcode"),
    [
        (b"", None),
        (b"\x12\x34\x01\x00\x00", None),
        (header(qid=0x1234) + b"\xff", RCODE.FORMERR),
        (header(qid=0x1234, flags=4 << 11), RCODE.NOTIMP),
        (header(qid=0x1234, flags=0x8000), None),  # never answer a response
    ],
)
def test_formerr_response(wire: bytes, rcode: int | None) -> None:
    out = formerr_response(wire)
    if rcode is None:
        assert out is None
        return
    assert out is not None
    rec = DNSRecord.parse(out)
    assert rec.header.id == 0x1234 and rec.header.rcode == rcode and rec.header.qr == 1
    assert rec.questions == []


def test_with_id() -> None:
    wire = query_wire(qid=1)
    assert with_id(wire, 0xBEEF)[:2] == b"\xbe\xef" and with_id(wire, 0xBEEF)[2:] == wire[2:]
    with pytest.raises(DnsFormatError):
        with_id(b"\x01", 2)


# --- parse_answer -----------------------------------------------------------------------


def answer(qname: str = "www.example.com", qtype: str = "A", *records: RR, qid: int = 0x1234,
           additional: tuple[RR, ...] = (), rcode: int = 0, tc: bool = False) -> bytes:
    rec = DNSRecord.question(qname, qtype).reply()
    rec.header.id = qid
    rec.header.rcode = rcode
    rec.header.tc = int(tc)
    for rr in records:
        rec.add_answer(rr)
    for rr in additional:
        rec.add_ar(rr)
    return rec.pack()


def a(name: str, ip: str, ttl: int = 60) -> RR:
    return RR(name, QTYPE.A, rdata=A(ip), ttl=ttl)


def aaaa(name: str, ip: str, ttl: int = 60) -> RR:
    return RR(name, QTYPE.AAAA, rdata=AAAA(ip), ttl=ttl)


def cname(name: str, target: str, ttl: int = 60) -> RR:
    return RR(name, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl)


CHAIN_CASES = {
    "plain A": ([a("www.example.com", "192.0.2.1", 30)], [("192.0.2.1", 30)]),
    "case-insensitive owner": ([a("WWW.EXAMPLE.com", "192.0.2.1")], [("192.0.2.1", 60)]),
    "cname chain": (
        [cname("www.example.com", "a.cdn.net"), cname("a.cdn.net", "b.cdn.net"),
         a("b.cdn.net", "192.0.2.2", 20), aaaa("b.cdn.net", "2001:db8::2", 40)],
        [("192.0.2.2", 20), ("2001:db8::2", 40)],
    ),
    "chain out of order": (
        [a("b.cdn.net", "192.0.2.2"), cname("a.cdn.net", "b.cdn.net"),
         cname("www.example.com", "a.cdn.net")],
        [("192.0.2.2", 60)],
    ),
    "chain to a target without records": ([cname("www.example.com", "elsewhere.net")], []),
    "out-of-chain records ignored": (
        [cname("www.example.com", "a.cdn.net"), a("a.cdn.net", "192.0.2.3"),
         a("evil.example.org", "203.0.113.66"), cname("other.net", "evil.example.org"),
         aaaa("example.com", "2001:db8::66")],
        [("192.0.2.3", 60)],
    ),
    "cname loop": (
        [cname("www.example.com", "x.net"), cname("x.net", "www.example.com"),
         a("x.net", "192.0.2.4"), a("www.example.com", "192.0.2.5")],
        [("192.0.2.4", 60), ("192.0.2.5", 60)],
    ),
    "duplicates keep the lowest ttl": (
        [a("www.example.com", "192.0.2.6", 300), a("www.example.com", "192.0.2.6", 10),
         a("www.example.com", "192.0.2.7", 5)],
        [("192.0.2.6", 10), ("192.0.2.7", 5)],
    ),
    "ttl with the high bit is zero": (
        [a("www.example.com", "192.0.2.8", 0x80000001)], [("192.0.2.8", 0)]
    ),
    "non-address types ignored": ([RR("www.example.com", QTYPE.TXT, rdata=RD(b"\x01x"))], []),
}


@pytest.mark.parametrize(("records", "expect"), list(CHAIN_CASES.values()), ids=list(CHAIN_CASES))
def test_parse_answer_addresses(records: list[RR], expect: list[tuple[str, int]]) -> None:
    info = parse_answer(answer("www.example.com", "A", *records), 0x1234, "www.example.com", 1)
    assert info == AnswerInfo(0x1234, 0, False, "www.example.com", 1, tuple(expect))


def test_parse_answer_ignores_additional_section_addresses() -> None:
    wire = answer("www.example.com", "A", a("www.example.com", "192.0.2.1"),
                  additional=(a("www.example.com", "192.0.2.99"),))
    assert parse_answer(wire, 0x1234, "www.example.com", 1).addresses == (("192.0.2.1", 60),)


def test_parse_answer_chain_depth_is_bounded() -> None:
    names = ["www.example.com"] + [f"c{i}.example.net" for i in range(20)]
    records = [cname(names[i], names[i + 1]) for i in range(20)]
    records += [a(names[16], "192.0.2.16"), a(names[17], "192.0.2.17")]
    info = parse_answer(answer("www.example.com", "A", *records), 0x1234, "www.example.com", 1)
    assert info.addresses == (("192.0.2.16", 60),)


def test_parse_answer_aaaa_query_and_trailing_dot() -> None:
    wire = answer("v6.example.com", "AAAA", aaaa("v6.example.com", "2001:db8::1"))
    info = parse_answer(wire, 0x1234, "V6.example.com.", 28)
    assert info.qname == "v6.example.com" and info.addresses == (("2001:db8::1", 60),)


@pytest.mark.parametrize(
    ("rcode", "tc"), [(RCODE.NXDOMAIN, False), (RCODE.SERVFAIL, False), (0, True)]
)
def test_parse_answer_rcode_and_truncation(rcode: int, tc: bool) -> None:
    wire = answer("www.example.com", "A", a("www.example.com", "192.0.2.1"), rcode=rcode, tc=tc)
    info = parse_answer(wire, 0x1234, "www.example.com", 1)
    assert info.rcode == rcode and info.truncated is tc
    if tc:
        assert info.addresses == ()


def test_parse_answer_truncated_mid_record() -> None:
    wire = answer("www.example.com", "A", *[a("www.example.com", f"192.0.2.{i}") for i in range(9)],
                  tc=True)
    info = parse_answer(wire[:60], 0x1234, "www.example.com", 1)
    assert info.truncated and info.addresses == ()


def test_parse_answer_extended_rcode() -> None:
    wire = answer(additional=(EDNS0(ext_rcode=1, udp_len=1232),))  # BADVERS = 16
    assert parse_answer(wire, 0x1234, "www.example.com", 1).rcode == 16


def test_parse_answer_error_without_question() -> None:
    wire = header(qid=0x1234, flags=0x8000 | RCODE.REFUSED, qd=0)
    info = parse_answer(wire, 0x1234, "www.example.com", 1)
    assert info.rcode == RCODE.REFUSED and info.addresses == ()


WWW = "www.example.com"
MISMATCH = {
    "id": (answer(qid=0x1235), 0x1234, "www.example.com", 1),
    "qname": (answer("www.example.org"), 0x1234, "www.example.com", 1),
    "parent qname": (answer("example.com"), 0x1234, "www.example.com", 1),
    "qtype": (answer("www.example.com", "AAAA"), 0x1234, "www.example.com", 1),
    "a query, not an answer": (query_wire(qid=0x1234), 0x1234, "www.example.com", 1),
    "noerror without question": (header(qid=0x1234, flags=0x8000, qd=0), 0x1234, WWW, 1),
    "two questions": (header(qid=0x1234, flags=0x8000, qd=2) + NAME + QTAIL + NAME + QTAIL,
                      0x1234, "www.example.com", 1),
    "short": (b"\x12\x34\x81", 0x1234, "www.example.com", 1),
    "bad A length": (answer(WWW, "A", RR(WWW, QTYPE.A, rdata=RD(b"abc"))), 0x1234, WWW, 1),
    "bad AAAA length": (answer(WWW, "A", RR(WWW, QTYPE.AAAA, rdata=RD(b"abc"))), 0x1234, WWW, 1),
}


@pytest.mark.parametrize(
    ("wire", "qid", "qname", "qtype"), list(MISMATCH.values()), ids=list(MISMATCH)
)
def test_parse_answer_rejects(wire: bytes, qid: int, qname: str, qtype: int) -> None:
    with pytest.raises(DnsFormatError):
        parse_answer(wire, qid, qname, qtype)


def test_parse_answer_compression_loop_is_rejected() -> None:
    # A CNAME whose target points at itself.
    body = NAME + QTAIL
    rr_at = 12 + len(body)
    rdata = struct.pack("!H", 0xC000 | (rr_at + 12))  # points at its own rdata
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, len(rdata)) + rdata
    wire = header(qid=1, flags=0x8180, an=1) + body + rr
    with pytest.raises(DnsFormatError):
        parse_answer(wire, 1, "www.example.com", 1)


def test_deny_response_is_a_valid_answer() -> None:
    q = parse_query(query_wire(edns=1232))
    info = parse_answer(deny_response(q, 3, "no"), q.id, q.qname, q.qtype)
    assert info.rcode == 3 and info.addresses == ()


# --- truncate_for_udp -------------------------------------------------------------------

BIG = [a("www.example.com", f"192.0.2.{i}") for i in range(60)]  # about 1000 octets


@pytest.mark.parametrize(
    ("edns", "truncated"), [(None, True), (512, True), (1232, False), (4096, False)]
)
def test_truncate_for_udp(edns: int | None, truncated: bool) -> None:
    q = parse_query(query_wire(edns=edns))
    wire = answer("www.example.com", "A", *BIG, qid=q.id)
    out = truncate_for_udp(wire, q)
    if not truncated:
        assert out is wire
        return
    rec = DNSRecord.parse(out)
    assert rec.header.tc == 1 and rec.header.id == q.id and rec.rr == []
    assert str(rec.q.qname) == "www.example.com." and len(out) <= 512
    assert len(rec.ar) == (1 if edns else 0)


def test_truncate_for_udp_leaves_small_answers() -> None:
    q = parse_query(query_wire())
    wire = answer("www.example.com", "A", a("www.example.com", "192.0.2.1"), qid=q.id)
    assert truncate_for_udp(wire, q) == wire


# --- fuzzing ----------------------------------------------------------------------------

SEEDS = [
    query_wire(edns=1232, do=True),
    answer(WWW, "A", *CHAIN_CASES["cname chain"][0], additional=(EDNS0(udp_len=1232),)),
    answer("www.example.com", "A", *CHAIN_CASES["cname loop"][0]),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, len(wire)))
        if op == "flip" and pos < len(wire):
            wire[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del wire[pos:]
        elif op == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del wire[pos : pos + draw(st.integers(1, 4))]
    return bytes(wire)


def parse_all(wire: bytes) -> None:
    for fn in (lambda: parse_query(wire),
               lambda: parse_answer(wire, wire[0] << 8 | wire[1] if len(wire) > 1 else 0,
                                    "www.example.com", 1),
               lambda: formerr_response(wire)):
        try:
            out = fn()
        except DnsFormatError:
            continue
        if isinstance(out, AnswerInfo):
            # The answer cache takes the TTL offsets read while parsing instead of reading
            # the answer again: both readings must agree on every answer that parses.
            assert out.ttls == ttl_offsets(wire)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(wire: bytes) -> None:
    parse_all(wire)
    head = header(qid=wire[0] if wire else 0, flags=0x8180, an=3, ns=1, ar=2)
    parse_all(head + NAME + QTAIL + wire)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_messages(wire: bytes) -> None:
    parse_all(wire)
    try:
        q = parse_query(wire)
    except DnsFormatError:
        return
    # Whatever parses as a query can be answered, and our answers parse back.
    for out in (deny_response(q, 3, "x"), servfail_response(q), truncate_for_udp(wire, q)):
        assert len(out) >= 12


@given(st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,63}", fullmatch=True), min_size=1, max_size=3),
       st.sampled_from(["A", "AAAA", "TXT", "HTTPS"]))
def test_names_round_trip(labels: list[str], qtype: str) -> None:
    name = ".".join(labels)
    q = parse_query(query_wire(name, qtype))
    assert q.qname == name.lower() and q.qtype == getattr(QTYPE, qtype)
    rec = DNSRecord.parse(servfail_response(q))
    assert str(rec.q.qname).rstrip(".") == name


def test_module_is_pure() -> None:
    with open(dnsmsg.__file__, encoding="utf-8") as f:
        src = f.read()
    for mod in ("socket", "asyncio", "dnslib", "os", "egressd.shim"):
        assert f"import {mod}" not in src


# --- differential: random well-formed answers, decoded by dnslib and by parse_answer --------

_OWNERS = ["www.example.com", "WWW.Example.COM", "a.cdn.net", "b.cdn.net", "c.cdn.net", "other.org"]


@st.composite
def random_answer(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, str, int]]]:
    """An answer to www.example.com/A with random A/AAAA/CNAME/TXT records (in any order)."""
    records = []
    for _ in range(draw(st.integers(0, 10))):
        owner = draw(st.sampled_from(_OWNERS))
        kind = draw(st.sampled_from(["A", "AAAA", "CNAME", "TXT"]))
        ttl = draw(st.integers(0, 2**32 - 1))
        if kind == "A":
            value = str(draw(st.ip_addresses(v=4)))
        elif kind == "AAAA":
            value = str(draw(st.ip_addresses(v=6)))
        elif kind == "CNAME":
            value = draw(st.sampled_from(_OWNERS))
        else:
            value = "x"
        records.append((owner, kind, value, ttl))
    rrs = [RR(o, getattr(QTYPE, k), ttl=t,
              rdata={"A": A, "AAAA": AAAA, "CNAME": CNAME}.get(k, lambda v: RD(b"\x01x"))(v))
           for o, k, v, t in records]
    # Built without DNSRecord.question(), which draws a random ID from the random module.
    rec = DNSRecord(DNSHeader(id=0x1234, qr=1, ra=1), q=DNSQuestion("www.example.com", QTYPE.A), rr=rrs)
    return rec.pack(), records


def _expected(records: list[tuple[str, str, str, int]]) -> dict[str, int]:
    """What parse_answer must find: A/AAAA of the CNAME chain from the qname (first CNAME of an
    owner wins, loops stop it), the lowest TTL per address, TTLs with the high bit set as 0."""
    cnames: dict[str, str] = {}
    for owner, kind, value, _ in records:
        if kind == "CNAME":
            cnames.setdefault(owner.lower(), value.lower())
    chain, name = {"www.example.com"}, "www.example.com"
    while (target := cnames.get(name)) is not None and target not in chain:
        chain.add(target)
        name = target
    out: dict[str, int] = {}
    for owner, kind, value, ttl in records:
        if kind in ("A", "AAAA") and owner.lower() in chain:
            ttl = 0 if ttl & 0x80000000 else ttl
            ip = str(ipaddress.ip_address(value))
            out[ip] = min(ttl, out.get(ip, ttl))
    return out


@settings(max_examples=500, deadline=None)
@given(random_answer())
def test_parse_answer_agrees_with_dnslib_built_answers(built) -> None:
    wire, records = built
    info = parse_answer(wire, 0x1234, "www.example.com", 1)
    assert dict(info.addresses) == _expected(records)
    assert info.ttls == ttl_offsets(wire)
    # dnslib reads the same message back: we are decoding a well-formed answer.
    assert len(DNSRecord.parse(wire).rr) == len(records)


# --- hostile answers: out-of-bailiwick records, giant answers --------------------------------


def test_parse_answer_ignores_out_of_bailiwick_records_in_every_section() -> None:
    """Only A/AAAA of the answer section's CNAME chain from the qname count: addresses for other
    names in the answer section, and any address in the authority or additional section (even one
    owned by the qname or a chain name), are never reported."""
    rec = DNSRecord.question(WWW, "A").reply()
    rec.header.id = 0x1234
    rec.add_answer(cname(WWW, "edge.cdn.example"))
    rec.add_answer(a("edge.cdn.example", "198.51.100.10"))
    rec.add_answer(a("victim.example", "192.0.2.66"))  # unrelated owner, answer section
    rec.add_answer(aaaa("example.com", "2001:db8::66"))  # the parent zone
    rec.add_answer(a("evil.www.example.com", "192.0.2.67"))  # a child of the qname
    rec.add_auth(RR("example.com", QTYPE.NS, rdata=CNAME("ns.evil.example")))
    rec.add_auth(a("ns.evil.example", "192.0.2.68"))
    rec.add_auth(a(WWW, "192.0.2.69"))  # the qname itself, but in the authority section
    rec.add_ar(a("ns.evil.example", "192.0.2.70"))
    rec.add_ar(a("edge.cdn.example", "192.0.2.71"))  # a chain name, but in the additional section
    rec.add_ar(aaaa(WWW, "2001:db8::71"))
    info = parse_answer(rec.pack(), 0x1234, WWW, 1)
    assert info.addresses == (("198.51.100.10", 60),)


def test_parse_answer_cname_outside_the_answer_section_is_not_followed() -> None:
    rec = DNSRecord.question(WWW, "A").reply()
    rec.header.id = 0x1234
    rec.add_auth(cname(WWW, "evil.example"))
    rec.add_ar(a("evil.example", "192.0.2.66"))
    assert parse_answer(rec.pack(), 0x1234, WWW, 1).addresses == ()


def test_parse_answer_keeps_answer_order_for_thousands_of_records() -> None:
    """3,000 A records (a TCP-sized answer) come back in answer order, duplicates removed at their
    first position: the engine's max_ips_per_name cap keeps the first N of them."""
    import random

    order = random.Random(11).sample(range(3000), 3000)
    ips = [f"10.{200 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in order]
    records = [a(WWW, ip, 300) for ip in ips] + [a(WWW, ips[0], 30)]
    wire = answer(WWW, "A", *records)
    assert len(wire) > 40_000
    info = parse_answer(wire, 0x1234, WWW, 1)
    assert [ip for ip, _ in info.addresses] == ips
    assert info.addresses[0] == (ips[0], 30) and info.addresses[1] == (ips[1], 300)


@pytest.mark.parametrize(("ttl", "expect"), [(0, 0), (2**31 - 1, 2**31 - 1), (2**31, 0), (2**32 - 1, 0)])
def test_parse_answer_reports_extreme_ttls_as_sent(ttl: int, expect: int) -> None:
    """TTL 0 and 2^31-1 are reported as sent (the IP cache clamps them); TTLs with the high bit
    set read as 0 (RFC 2181 section 8)."""
    info = parse_answer(answer(WWW, "A", a(WWW, "198.51.100.1", ttl)), 0x1234, WWW, 1)
    assert info.addresses == (("198.51.100.1", expect),)
