"""The pure nfnetlink message builder of set elements: layout checked field by field."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core import nfmsg
from egressd.core.nfmsg import Element, add_batch, comment_text, delete_batch, parse_acks

HDR = struct.Struct("=IHHII")


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message; lengths must tile the buffer exactly."""
    out, off = [], 0
    while off < len(data):
        length, mtype, flags, seq, pid = HDR.unpack_from(data, off)
        assert pid == 0 and length >= HDR.size and length % 4 == 0
        out.append((mtype, flags, seq, data[off + HDR.size : off + length]))
        off += length
    assert off == len(data)
    return out


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(data):
        length, atype = struct.unpack_from("=HH", data, off)
        assert length >= 4
        out.append((atype, data[off + 4 : off + length]))
        off += (length + 3) & ~3
    assert off == len(data)
    return out


def test_one_element_batch_layout() -> None:
    b = add_batch("egressd", {"ws_1_dyn4": [Element("192.0.2.1", 60, "pypi.org")]}, 100)
    msgs = messages(b.data)
    assert [m[0] for m in msgs] == [0x10, 0xA0C, 0xA0E, 0xA0C, 0x11]
    assert [m[2] for m in msgs] == [100, 101, 102, 103, 104] and b.next_seq == 105 and b.begin_seq == 100
    assert b.acks == {101: "ws_1_dyn4", 102: "ws_1_dyn4", 103: "ws_1_dyn4"}
    # Batch markers: no ACK asked, family unspec, res_id NFNL_SUBSYS_NFTABLES in network order.
    assert msgs[0][1] == nfmsg.NLM_F_REQUEST and msgs[0][3] == b"\x00\x00\x00\x0a"
    assert msgs[1][1] == nfmsg.NLM_F_REQUEST | nfmsg.NLM_F_ACK | nfmsg.NLM_F_CREATE
    assert msgs[2][1] == nfmsg.NLM_F_REQUEST | nfmsg.NLM_F_ACK
    payload = msgs[1][3]
    assert payload[:4] == b"\x01\x00\x00\x00"  # NFPROTO_INET, version 0, res_id 0
    top = attrs(payload[4:])
    assert top[0] == (1, b"egressd\0") and top[1] == (2, b"ws_1_dyn4\0")
    assert top[2][0] == 3 | nfmsg.NLA_F_NESTED
    (elem,) = attrs(top[2][1])
    assert elem[0] == 1 | nfmsg.NLA_F_NESTED
    key, timeout, udata = attrs(elem[1])
    assert key == (1 | nfmsg.NLA_F_NESTED, struct.pack("=HH", 8, 1) + bytes([192, 0, 2, 1]))
    assert timeout == (4, struct.pack(">Q", 60_000))  # milliseconds, big endian
    assert udata == (6, b"\x00\x09pypi.org\x00")  # comment TLV: type 0, length with the NUL
    # The delete carries the key only.
    (delem,) = attrs(attrs(msgs[2][3][4:])[2][1])
    assert attrs(delem[1]) == [key]


def test_ipv6_key_and_chunks_and_duplicates() -> None:
    els = [Element(f"2001:db8::{i:x}", 30, "x") for i in range(nfmsg.CHUNK + 1)]
    els.append(Element("2001:db8::5", 90, "y"))  # the same IP again: kept once, longest timeout
    b = add_batch("egressd", {"ws_1_dyn6": els}, 1)
    msgs = messages(b.data)
    assert len(msgs) == 2 + 3 * 2 and len(b.acks) == 6
    first = attrs(attrs(msgs[1][3][4:])[2][1])
    second = attrs(attrs(msgs[4][3][4:])[2][1])
    assert len(first) == nfmsg.CHUNK and len(second) == 1
    keys = {attrs(attrs(e[1])[0][1])[0][1]: attrs(e[1])[1][1] for e in first}
    assert len(next(iter(keys))) == 16
    assert keys[bytes.fromhex("20010db8000000000000000000000005")] == struct.pack(">Q", 90_000)


def test_delete_batch_adds_bare_keys_then_deletes_them_once_each() -> None:
    ips = [f"10.0.{i // 256}.{i % 256}" for i in range(300)]
    b = delete_batch("egressd", {"ws_1_dyn4": ips + ips[:5], "ws_1_dyn6": ["2001:db8::1"], "ws_2_dyn4": []}, 50)
    msgs = messages(b.data)
    # Two chunks of the v4 set (256 + 44), one of the v6 set: add, delete each; none for an empty set.
    assert [m[0] for m in msgs] == [0x10, 0xA0C, 0xA0E, 0xA0C, 0xA0E, 0xA0C, 0xA0E, 0x11]
    assert [m[2] for m in msgs] == list(range(50, 58)) and b.next_seq == 58
    assert b.acks == {**{s: "ws_1_dyn4" for s in range(51, 55)}, 55: "ws_1_dyn6", 56: "ws_1_dyn6"}
    assert msgs[1][1] == nfmsg.NLM_F_REQUEST | nfmsg.NLM_F_ACK | nfmsg.NLM_F_CREATE  # no EXCL: a no-op if live
    seen = []
    for (_t, _f, _s, payload), (_t2, _f2, _s2, payload2) in zip(msgs[1:7:2], msgs[2:7:2], strict=True):
        assert payload == payload2  # the add and the delete name the same bare keys
        top = attrs(payload[4:])
        for elem in attrs(top[2][1]):
            (key,) = attrs(elem[1])  # the key only: no timeout, no comment
            seen.append(key[1][4:])
    assert len(seen) == 301 and len(set(seen)) == 301


def test_delete_batch_with_destroy_is_one_message_a_chunk() -> None:
    ips = [f"10.0.{i // 256}.{i % 256}" for i in range(300)]
    b = delete_batch("egressd", {"ws_1_dyn4": ips, "ws_1_dyn6": ["2001:db8::1"]}, 9, destroy=True)
    msgs = messages(b.data)
    assert [m[0] for m in msgs] == [0x10, 0xA1E, 0xA1E, 0xA1E, 0x11]  # NFT_MSG_DESTROYSETELEM = 30
    assert b.acks == {10: "ws_1_dyn4", 11: "ws_1_dyn4", 12: "ws_1_dyn6"} and b.next_seq == 14
    assert msgs[1][1] == nfmsg.NLM_F_REQUEST | nfmsg.NLM_F_ACK
    plain = messages(delete_batch("egressd", {"ws_1_dyn4": ips, "ws_1_dyn6": ["2001:db8::1"]}, 9).data)
    assert [m[3] for m in msgs[1:4]] == [m[3] for m in plain[2:7:2]]  # the same keys as the deletes


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_bare_key_is_the_key_only_element(ip) -> None:
    assert nfmsg.bare_key(str(ip)) == nfmsg.element_attr(Element(str(ip), 0, ""), key_only=True)


@given(st.text(max_size=45))
def test_bare_key_refuses_what_is_not_an_address(text: str) -> None:
    try:
        want = nfmsg.element_attr(Element(text, 0, ""), key_only=True)
    except ValueError:
        want = None
    try:
        got = nfmsg.bare_key(text)
    except ValueError:
        got = None
    assert got == want


def test_empty_batch_has_no_acks() -> None:
    b = add_batch("egressd", {}, 7)
    assert b.acks == {} and [m[0] for m in messages(b.data)] == [0x10, 0x11]


def test_comment_text_drops_what_is_not_a_name() -> None:
    assert comment_text('a"b c;{x}.example-1_*') == "abcx.example-1_*"
    assert len(comment_text("a" * 300)) == nfmsg.COMMENT_MAX
    assert comment_text("Bücher.example") == "Bücher.example"  # str.isalnum() keeps letters
    el = nfmsg.element_attr(Element("192.0.2.1", 1, '";'))
    assert len(attrs(attrs(el)[0][1])) == 2  # an empty comment is left out


def _comment_by_character(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "._-*")[: nfmsg.COMMENT_MAX]


@given(st.one_of(st.text(max_size=300), st.from_regex(r"[a-zA-Z0-9._*-]{0,300}", fullmatch=True)))
def test_comment_text_plain_names_take_the_fast_path_with_the_same_result(name: str) -> None:
    assert comment_text.__wrapped__(name) == _comment_by_character(name)


def test_parse_acks() -> None:
    ack = HDR.pack(36, 2, 0x100, 5, 0) + struct.pack("=i", 0) + HDR.pack(16, 0xA0C, 5, 5, 0)
    err = HDR.pack(36, 2, 0, 6, 0) + struct.pack("=i", -2) + HDR.pack(16, 0xA0C, 5, 6, 0)
    other = HDR.pack(20, 0xA0C, 0, 9, 0) + b"\0" * 4
    assert parse_acks(ack + other + err) == [(5, 0), (6, 2)]


# --- GETSETELEM dump: request and the parser of its replies ---------------------------------------


from egressd.core.nfmsg import DumpError, DumpedElement, getsetelem_dump, parse_setelem_dump

_NEW = (nfmsg.NFNL_SUBSYS_NFTABLES << 8) | nfmsg.NFT_MSG_NEWSETELEM


def _reply(seq: int, elements: list[tuple[str, int | None, str]]) -> bytes:
    """A NEWSETELEM reply as the kernel dumps it: key, timeout, expiration and the comment."""
    parts = b""
    for ip, expires_ms, comment in elements:
        el = nfmsg.element_attr(Element(ip, 60, comment))
        if expires_ms is not None:  # the kernel adds NFTA_SET_ELEM_EXPIRATION
            extra = nfmsg._attr(nfmsg.NFTA_SET_ELEM_EXPIRATION, struct.pack(">Q", expires_ms))
            length = struct.unpack_from("=H", el)[0] + len(extra)
            el = struct.pack("=HH", length, nfmsg.NFTA_LIST_ELEM | nfmsg.NLA_F_NESTED) + el[4:] + extra
        parts += el
    attrs_ = nfmsg._prefix("egressd", "ws_a_dyn4") + nfmsg._nest(nfmsg.NFTA_SET_ELEM_LIST_ELEMENTS, parts)
    return nfmsg._message(_NEW, 2, seq, nfmsg.NFPROTO_INET, 0, attrs_)


def _done(seq: int) -> bytes:
    return HDR.pack(HDR.size + 4, nfmsg.NLMSG_DONE, 2, seq, 0) + b"\0" * 4


def test_dump_request_names_table_and_set() -> None:
    [(mtype, flags, seq, payload)] = messages(getsetelem_dump("egressd", "ws_a_dyn4", 77))
    assert mtype == (10 << 8) | 13 and flags == 0x301 and seq == 77
    assert attrs(payload[4:]) == [(1, b"egressd\0"), (2, b"ws_a_dyn4\0")]


def test_dump_replies_parse_to_elements_until_done() -> None:
    one = _reply(9, [("192.0.2.1", 29_500, "a.example"), ("2001:db8::1", None, "")])
    two = _reply(9, [("198.51.100.7", 1, "b.example")])
    els, done = parse_setelem_dump(one, 9)
    assert els == [DumpedElement("192.0.2.1", 29_500, "a.example"), DumpedElement("2001:db8::1", None, "")]
    assert not done
    els, done = parse_setelem_dump(two + _done(9), 9)
    assert els == [DumpedElement("198.51.100.7", 1, "b.example")] and done
    # Replies to another request are not ours.
    assert parse_setelem_dump(_reply(8, [("192.0.2.9", 5, "x")]), 9) == ([], False)


def test_dump_error_reply_carries_errno() -> None:
    err = HDR.pack(HDR.size + 4 + HDR.size, nfmsg.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -2) + b"\0" * HDR.size
    try:
        parse_setelem_dump(err, 5)
    except DumpError as e:
        assert e.errno == 2
    else:
        raise AssertionError("an error reply must raise")


def test_interrupted_dump_is_a_dump_error() -> None:
    data = bytearray(_reply(6, [("192.0.2.1", 100, "a.example")]))
    struct.pack_into("=H", data, 6, 2 | nfmsg.NLM_F_DUMP_INTR)  # nlmsg_flags: NLM_F_MULTI | DUMP_INTR
    try:
        parse_setelem_dump(bytes(data), 6)
    except DumpError as e:
        assert "changed during the dump" in str(e)
    else:
        raise AssertionError("an interrupted dump must raise")


def test_truncated_reply_is_a_dump_error() -> None:
    data = _reply(3, [("192.0.2.1", 100, "a.example")])
    for cut in (len(data) - 1, len(data) - 9):
        try:
            parse_setelem_dump(data[:cut], 3)
        except DumpError:
            continue
        raise AssertionError(f"cut at {cut} must raise")
    bad = bytearray(data)
    struct.pack_into("=H", bad, HDR.size + 4 + 12 + 16, 0xFFF0)  # the element list's length
    try:
        parse_setelem_dump(bytes(bad), 3)
    except DumpError:
        pass
    else:
        raise AssertionError("an attribute overrunning its message must raise")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 0xFFFFFFFF))
def test_garbage_is_a_dump_error_or_nothing(data: bytes, seq: int) -> None:
    try:
        els, _done = parse_setelem_dump(data, seq)
    except DumpError:
        return
    assert all(isinstance(e, DumpedElement) for e in els)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 400))
def test_mutated_replies_never_raise_anything_else(noise: bytes, at: int) -> None:
    data = bytearray(_reply(4, [("192.0.2.1", 100, "a.example"), ("2001:db8::2", 7, "b.example")]) + _done(4))
    at %= len(data)
    data[at : at + len(noise)] = noise[: len(data) - at]
    try:
        parse_setelem_dump(bytes(data), 4)
    except DumpError:
        pass
