"""The shim's answer cache (pure): keys, TTLs served counted down, expiry, what is never cached."""

from __future__ import annotations

import dnslib
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.answercache import AnswerCache, age_ttls, ttl_offsets


def _query(name: str = "pypi.org", qid: int = 0x1234) -> bytes:
    q = dnslib.DNSRecord.question(name, "A")
    q.header.id = qid
    return bytes(q.pack())


def _answer(query: bytes, ttls: list[int], rcode: int = 0, tc: bool = False, edns: bool = True) -> bytes:
    q = dnslib.DNSRecord.parse(query)
    r = q.reply()
    r.header.rcode = rcode
    r.header.tc = int(tc)
    for i, ttl in enumerate(ttls):
        r.add_answer(dnslib.RR(str(q.q.qname), dnslib.QTYPE.A, rdata=dnslib.A(f"198.51.100.{i + 1}"), ttl=ttl))
    if edns:
        r.add_ar(dnslib.EDNS0(udp_len=1232))
    return bytes(r.pack())


def test_hit_gets_the_querys_id_and_ttls_counted_down():
    c = AnswerCache()
    q = _query(qid=1)
    assert c.put("10.0.0.2", q, _answer(q, [60, 300]), now=100.0)
    out = c.get("10.0.0.2", _query(qid=0xBEEF), now=107.9)
    r = dnslib.DNSRecord.parse(out)
    assert r.header.id == 0xBEEF
    assert [rr.ttl for rr in r.rr] == [53, 293]
    assert [str(rr.rdata) for rr in r.rr] == ["198.51.100.1", "198.51.100.2"]
    assert r.ar[0].rtype == dnslib.QTYPE.OPT  # the OPT record's TTL field (flags) is left alone


def test_expires_with_the_smallest_ttl():
    c = AnswerCache()
    q = _query()
    c.put("10.0.0.2", q, _answer(q, [300, 5]), now=0.0)
    assert c.get("10.0.0.2", q, now=4.9) is not None
    assert c.get("10.0.0.2", q, now=5.0) is None
    assert len(c) == 0


def test_keyed_on_client_and_query_bytes():
    c = AnswerCache()
    q = _query()
    c.put("10.0.0.2", q, _answer(q, [60]), now=0.0)
    assert c.get("10.0.0.3", q, now=1.0) is None  # another client (maybe another workspace)
    assert c.get("10.0.0.2", _query("PyPI.org"), now=1.0) is None  # other bytes
    assert c.get("10.0.0.2", q, now=1.0) is not None


def test_never_cached_truncated_errors_empty_or_zero_ttl():
    q = _query()
    c = AnswerCache()
    assert not c.put("c", q, _answer(q, [60], tc=True), now=0)
    assert not c.put("c", q, _answer(q, [60], rcode=2), now=0)  # SERVFAIL
    assert not c.put("c", q, _answer(q, [60], rcode=5), now=0)  # REFUSED
    assert not c.put("c", q, _answer(q, []), now=0)  # no records
    assert not c.put("c", q, _answer(q, [0]), now=0)
    assert not c.put("c", q, b"\x00" * 5, now=0)
    assert not c.put("c", q, _answer(q, [60]) + b"junk", now=0)
    assert len(c) == 0


def test_bounded_oldest_goes_first_and_clear_sets_generation():
    c = AnswerCache(max_entries=3)
    qs = [_query(f"n{i}.example") for i in range(4)]
    for i, q in enumerate(qs):
        c.put("c", q, _answer(q, [60]), now=float(i))
    assert len(c) == 3
    assert c.get("c", qs[0], now=5) is None and c.get("c", qs[3], now=5) is not None
    c.clear(generation=7)
    assert len(c) == 0 and c.generation == 7


@settings(max_examples=200, deadline=None)
@given(ttls=st.lists(st.integers(1, 2**31 - 1), min_size=1, max_size=6), age=st.floats(0, 10**6))
def test_served_ttls_are_the_originals_minus_whole_seconds_of_age(ttls, age):
    q = _query()
    a = _answer(q, ttls)
    got = ttl_offsets(a)
    assert got is not None and got[1] == min(ttls)
    c = AnswerCache()
    assert c.put("c", q, a, now=0.0)
    out = c.get("c", q, now=age)
    if age >= min(ttls):
        assert out is None
        return
    r = dnslib.DNSRecord.parse(out)
    assert [rr.ttl for rr in r.rr] == [max(t - int(age), 0) for t in ttls]


def test_age_ttls_floor_is_zero():
    q = _query()
    a = _answer(q, [3])
    offsets, _ = ttl_offsets(a)
    r = dnslib.DNSRecord.parse(age_ttls(a, offsets, 10))
    assert r.rr[0].ttl == 0
