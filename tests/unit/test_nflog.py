"""egressd.core.nflog: captured kernel messages (tests/data/nflog, made by capture.py) decode to
their recorded form; the config encoders produce exact bytes; hostile input never raises."""

from __future__ import annotations

import dataclasses
import errno
import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.core import nflog
from egressd.core.nflog import (
    Ack,
    LoggedPacket,
    NetlinkError,
    bind_group_msg,
    parse_messages,
    set_flags_msg,
    set_mode_msg,
    set_nlbufsiz_msg,
    set_qthresh_msg,
    set_timeout_msg,
    unbind_group_msg,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "nflog"
CAPTURES = sorted(p.stem for p in DATA.glob("*.bin"))
BLOBS = {name: (DATA / f"{name}.bin").read_bytes() for name in CAPTURES}

# Netlink headers are host-endian; the captures come from a little-endian machine.
little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="captures are little-endian")


def as_json(buf: bytes) -> dict:
    packets, replies, garbled = parse_messages(buf)
    return {
        "packets": [dataclasses.asdict(p) for p in packets],
        "replies": [{"type": "ack", "seq": r.seq} if isinstance(r, Ack)
                    else {"type": "error", "seq": r.seq, "errno": r.errno, "overrun": r.overrun}
                    for r in replies],
        "garbled": garbled,
    }


# --- captured messages ------------------------------------------------------------------


def test_the_captures_are_there():
    expected = {
        "ack", "error_enodev", "batch_three_udp", "ipv4_tcp_syn", "ipv4_udp", "ipv4_icmp_echo",
        "ipv4_options_udp", "ipv4_later_fragment", "ipv4_udp_no_prefix", "ipv4_udp_input_timestamp",
        "ipv6_tcp_syn", "ipv6_udp_prefix_l", "ipv6_icmpv6_echo", "ipv6_udp_hbh_dstopts",
        "ipv6_first_fragment", "ipv6_later_fragment",
    }
    assert expected <= set(CAPTURES)
    for name in CAPTURES:
        assert (DATA / f"{name}.json").exists(), name


@little_endian_only
@pytest.mark.parametrize("name", CAPTURES)
def test_capture_decodes_to_its_recorded_form(name):
    want = json.loads((DATA / f"{name}.json").read_text())
    got = as_json(BLOBS[name])
    assert got == {k: want[k] for k in ("packets", "replies", "garbled")}


def one(name: str) -> LoggedPacket:
    packets, replies, garbled = parse_messages(BLOBS[name])
    assert len(packets) == 1 and not replies and garbled == 0
    return packets[0]


@little_endian_only
def test_captures_hold_what_was_sent():
    """Spot checks written by hand, independent of the recorded JSON."""
    p = one("ipv4_tcp_syn")
    assert (p.family, p.prefix, p.src, p.dst, p.protocol, p.sport, p.dport) == (
        4, "egd:D:1001", "10.99.0.1", "192.0.2.10", "tcp", 40001, 443)
    assert p.icmp_type is None and p.timestamp is None and p.indev is None and p.outdev == 3
    p = one("ipv4_icmp_echo")
    assert (p.protocol, p.icmp_type, p.dport, p.sport) == ("icmp", 8, None, None)
    p = one("ipv6_icmpv6_echo")
    assert (p.family, p.protocol, p.icmp_type, p.dst) == (6, "ipv6-icmp", 128, "2001:db8:1::1")
    p = one("ipv6_udp_hbh_dstopts")
    assert (p.protocol, p.sport, p.dport) == ("udp", 40005, 7000)
    p = one("ipv6_first_fragment")
    assert (p.protocol, p.sport, p.dport) == ("udp", 40006, 8443)
    for name in ("ipv6_later_fragment", "ipv4_later_fragment"):
        p = one(name)
        assert (p.protocol, p.sport, p.dport) == ("udp", None, None)
    assert one("ipv4_options_udp").dport == 5000
    assert one("ipv6_udp_prefix_l").prefix == "egd:L:1002"
    assert one("ipv4_udp_no_prefix").prefix == ""
    p = one("ipv4_udp_input_timestamp")
    assert p.timestamp is not None and p.timestamp > 1.6e9 and p.indev == 1 and p.outdev is None


@little_endian_only
def test_batch_holds_three_packets_and_a_done():
    packets, replies, garbled = parse_messages(BLOBS["batch_three_udp"])
    assert [p.sport for p in packets] == [40010, 40011, 40012]
    assert {p.dst for p in packets} == {"198.51.100.8"}
    assert replies == [] and garbled == 0
    # the last message is NLMSG_DONE
    assert struct.unpack_from("=IH", BLOBS["batch_three_udp"], len(BLOBS["batch_three_udp"]) - 20) == (20, 3)


@little_endian_only
def test_ack_and_error_echo_the_requests_byte_for_byte():
    assert parse_messages(BLOBS["ack"]) == ([], [Ack(1)], 0)
    # the ack echoes the request's header (capped: header only)
    assert BLOBS["ack"][20:36] == bind_group_msg(7, 1)[:16]
    packets, replies, garbled = parse_messages(BLOBS["error_enodev"])
    assert replies == [NetlinkError(77, errno.ENODEV)] and not packets and garbled == 0
    # the error echoes the whole request, which capture.py made with set_mode_msg
    assert BLOBS["error_enodev"][20:] == set_mode_msg(8, 128, 77)
    assert "ENODEV" in str(replies[0])


@little_endian_only
def test_concatenated_captures_decode_to_the_concatenation():
    names = ["ipv4_udp", "ack", "batch_three_udp", "ipv6_tcp_syn", "error_enodev"]
    whole = parse_messages(b"".join(BLOBS[n] for n in names))
    parts = [parse_messages(BLOBS[n]) for n in names]
    assert whole.packets == [p for part in parts for p in part.packets]
    assert whole.replies == [r for part in parts for r in part.replies]
    assert whole.garbled == 0


# --- encoders ---------------------------------------------------------------------------

HDR = "0104" "0500"  # type (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG), flags REQUEST|ACK, host order (LE)


@little_endian_only
@pytest.mark.parametrize("msg,hexwire", [
    (bind_group_msg(7, 1), "1c000000" + HDR + "01000000" "00000000" "00000007" "0500" "0100" "01000000"),
    (unbind_group_msg(1053, 9), "1c000000" + HDR + "09000000" "00000000" "0000041d" "0500" "0100" "02000000"),
    (set_mode_msg(7, 128, 2), "20000000" + HDR + "02000000" "00000000" "00000007" "0a00" "0200" "00000080" "02000000"),
    (set_mode_msg(7, 0xFFFF, 2, nflog.NFULNL_COPY_META),
     "20000000" + HDR + "02000000" "00000000" "00000007" "0a00" "0200" "0000ffff" "01000000"),
    (set_timeout_msg(7, 1, 3), "1c000000" + HDR + "03000000" "00000000" "00000007" "0800" "0400" "00000001"),
    (set_qthresh_msg(7, 32, 4), "1c000000" + HDR + "04000000" "00000000" "00000007" "0800" "0500" "00000020"),
    (set_nlbufsiz_msg(7, 65536, 5), "1c000000" + HDR + "05000000" "00000000" "00000007" "0800" "0300" "00010000"),
    (set_flags_msg(65535, nflog.NFULNL_CFG_F_SEQ, 6),
     "1c000000" + HDR + "06000000" "00000000" "0000ffff" "0600" "0600" "00010000"),
])
def test_encoders_exact_bytes(msg, hexwire):
    assert msg.hex() == hexwire


def test_encoders_are_aligned_and_self_consistent():
    for msg in (bind_group_msg(1, 1), set_mode_msg(1, 128, 1), set_flags_msg(1, 1, 1)):
        length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", msg)
        assert length == len(msg) and len(msg) % 4 == 0
        assert mtype == nflog.MSG_CONFIG and flags == nflog.NLM_F_REQUEST | nflog.NLM_F_ACK
        # a config request is not a packet, an ack or an error: the parser skips it as unknown
        assert parse_messages(msg) == ([], [], 1)


@pytest.mark.parametrize("call", [
    lambda: bind_group_msg(65536, 1),
    lambda: bind_group_msg(-1, 1),
    lambda: bind_group_msg(1, 2**32),
    lambda: set_mode_msg(1, 2**32, 1),
    lambda: set_mode_msg(1, 128, 1, mode=7),
    lambda: set_timeout_msg(1, -1, 1),
    lambda: set_flags_msg(1, 0x10000, 1),
])
def test_encoders_refuse_out_of_range(call):
    with pytest.raises(ValueError):
        call()


# --- synthetic messages: the corners the kernel rarely shows ------------------------------


def attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(mtype: int, body: bytes, seq: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def packet_msg(payload: bytes | None, *, family: int = 2, prefix: bytes | None = b"egd:D:1\0",
               hwproto: int = 0x0800, extra: bytes = b"") -> bytes:
    body = struct.pack("!BBH", family, 0, 7) + attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", hwproto, 3))
    if prefix is not None:
        body += attr(nflog.NFULA_PREFIX, prefix)
    body += extra
    if payload is not None:
        body += attr(nflog.NFULA_PAYLOAD, payload)
    return nlmsg(nflog.MSG_PACKET, body)


def ip4(proto: int, l4: bytes, *, src: str = "10.0.0.1", dst: str = "192.0.2.1", frag: int = 0,
        opts: bytes = b"") -> bytes:
    import ipaddress
    ihl = 5 + len(opts) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(l4), 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + opts + l4


def ip6(nh: int, rest: bytes, *, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    import ipaddress
    return struct.pack("!IHBB16s16s", 0x60000000, len(rest), nh, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + rest


PORTS = struct.pack("!HH", 1234, 443) + b"\0" * 16


def test_ipv4_basic_and_options():
    [p], _, g = parse_messages(packet_msg(ip4(6, PORTS)))
    assert (p.family, p.src, p.dst, p.protocol, p.sport, p.dport, p.prefix) == (
        4, "10.0.0.1", "192.0.2.1", "tcp", 1234, 443, "egd:D:1")
    [p], _, _ = parse_messages(packet_msg(ip4(17, PORTS, opts=b"\x01" * 8)))
    assert (p.protocol, p.dport) == ("udp", 443)


@pytest.mark.parametrize("proto,name", [(132, "132"), (136, "136"), (33, "33")])
def test_other_ported_protocols_are_numbers_with_ports(proto, name):
    [p], _, _ = parse_messages(packet_msg(ip4(proto, PORTS)))
    assert (p.protocol, p.dport) == (name, 443)


def test_unknown_protocol_has_no_ports():
    [p], _, _ = parse_messages(packet_msg(ip4(47, PORTS)))  # GRE
    assert (p.protocol, p.sport, p.dport, p.icmp_type) == ("47", None, None, None)


def test_truncated_l4_keeps_addresses():
    [p], _, g = parse_messages(packet_msg(ip4(6, b"\x01\x02")))
    assert (p.protocol, p.dst, p.dport) == ("tcp", "192.0.2.1", None) and g == 0
    [p], _, _ = parse_messages(packet_msg(ip4(1, b"")))
    assert (p.protocol, p.icmp_type) == ("icmp", None)
    # IHL claims more than was copied
    wire = bytearray(ip4(6, b""))
    wire[0] = 0x4F
    [p], _, _ = parse_messages(packet_msg(bytes(wire)))
    assert p.dport is None


def test_ipv6_extension_header_walk():
    hbh = bytes([43, 0]) + b"\x01\x04\0\0\0\0"  # → routing
    rt = bytes([51, 0, 0, 0]) + b"\0" * 4  # → AH
    ah = bytes([60, 1]) + b"\0" * 10  # (1 + 2) * 4 = 12 bytes → dstopts
    dst = bytes([44, 1]) + b"\0" * 14  # 16 bytes → fragment
    frag = bytes([6, 0]) + struct.pack("!HI", 0x0001, 9)  # offset 0, M=1 → TCP
    [p], _, g = parse_messages(packet_msg(ip6(0, hbh + rt + ah + dst + frag + PORTS), family=10, hwproto=0x86DD))
    assert (p.family, p.protocol, p.sport, p.dport, p.src) == (6, "tcp", 1234, 443, "2001:db8::1") and g == 0


def test_ipv6_later_fragment_and_no_next_header():
    frag = bytes([17, 0]) + struct.pack("!HI", 5 << 3, 9)
    [p], _, _ = parse_messages(packet_msg(ip6(44, frag + PORTS), family=10))
    assert (p.protocol, p.dport) == ("udp", None)
    [p], _, _ = parse_messages(packet_msg(ip6(59, PORTS), family=10))
    assert (p.protocol, p.dport) == ("59", None)


def test_ipv6_endless_or_truncated_extension_headers():
    chain = (bytes([60, 0]) + b"\0" * 6) * 20  # 20 destination-options headers
    [p], _, _ = parse_messages(packet_msg(ip6(60, chain + PORTS), family=10))
    assert (p.protocol, p.dport) == ("60", None)
    [p], _, _ = parse_messages(packet_msg(ip6(0, b"\x06"), family=10))  # half a header
    assert (p.protocol, p.dport) == ("0", None)
    [p], _, _ = parse_messages(packet_msg(ip6(0, bytes([6, 200])), family=10))  # header longer than data
    assert (p.protocol, p.dport) == ("tcp", None)


def test_icmpv6_type():
    [p], _, _ = parse_messages(packet_msg(ip6(58, bytes([128, 0, 0, 0])), family=10))
    assert (p.protocol, p.icmp_type) == ("ipv6-icmp", 128)


def test_family_from_ethertype_when_nfgen_family_is_not_ip():
    [p], _, g = parse_messages(packet_msg(ip6(17, PORTS), family=5, hwproto=0x86DD))  # netdev
    assert p.family == 6 and g == 0
    assert parse_messages(packet_msg(ip6(17, PORTS), family=7, hwproto=0x0806)) == ([], [], 1)


def test_garbled_packets_are_counted():
    bad = [
        packet_msg(None),  # no payload
        packet_msg(ip6(17, PORTS), family=2),  # family says v4, payload is v6
        packet_msg(ip4(6, PORTS)[:19]),  # short IPv4 header
        packet_msg(b"\x45" + b"\0" * 39, family=10),  # v4 bytes under a v6 family
        packet_msg(ip6(17, PORTS)[:39], family=10),  # short IPv6 header
        packet_msg(b"\x44" + ip4(6, PORTS)[1:]),  # IHL 4
        nlmsg(nflog.MSG_PACKET, b"\x02\x00"),  # short nfgenmsg
        nlmsg(nflog.MSG_PACKET, struct.pack("!BBH", 2, 0, 7) + struct.pack("=HH", 2, 9)),  # attr len < 4
        nlmsg(nflog.MSG_PACKET, struct.pack("!BBH", 2, 0, 7) + struct.pack("=HH", 200, 9)),  # attr overruns
        nlmsg(nflog.NLMSG_ERROR, b"\0\0"),  # short error
        nlmsg(0x0999, b""),  # another subsystem
    ]
    good = packet_msg(ip4(6, PORTS))
    packets, replies, garbled = parse_messages(b"".join(bad) + good)
    assert len(packets) == 1 and replies == [] and garbled == len(bad)


def test_attribute_flags_are_masked_and_first_value_wins():
    extra = attr(nflog.NFULA_IFINDEX_OUTDEV | nflog.NLA_F_NET_BYTEORDER, struct.pack("!I", 9))
    extra += attr(nflog.NFULA_IFINDEX_OUTDEV, struct.pack("!I", 10))
    extra += attr(nflog.NFULA_IFINDEX_INDEV, b"\0\0")  # wrong size: ignored
    extra += attr(nflog.NFULA_TIMESTAMP, struct.pack("!QQ", 1_700_000_000, 250_000))
    [p], _, _ = parse_messages(packet_msg(ip4(17, PORTS), extra=extra))
    assert (p.outdev, p.indev, p.timestamp) == (9, None, 1_700_000_000.25)


def test_prefix_decoding():
    for raw, want in [(b"egd:D:1001\0", "egd:D:1001"), (b"egd:L:7\0junk", "egd:L:7"), (b"", ""),
                      (b"\xff\xfe\0", "\ufffd\ufffd"), (None, "")]:
        [p], _, _ = parse_messages(packet_msg(ip4(17, PORTS), prefix=raw))
        assert p.prefix == want


def test_control_messages():
    msgs = (nlmsg(nflog.NLMSG_NOOP, b"") + nlmsg(nflog.NLMSG_DONE, b"\0" * 4)
            + nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", 0), seq=5)
            + nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", -errno.EPERM), seq=6)
            + nlmsg(nflog.NLMSG_OVERRUN, b"", seq=7))
    packets, replies, garbled = parse_messages(msgs)
    assert packets == [] and garbled == 0
    assert replies == [Ack(5), NetlinkError(6, errno.EPERM), NetlinkError(7, errno.ENOBUFS, overrun=True)]


def test_broken_framing():
    good = packet_msg(ip4(6, PORTS))
    assert parse_messages(b"") == ([], [], 0)
    assert parse_messages(good + b"\0" * 8).garbled == 1  # a tail shorter than a header
    assert parse_messages(good + struct.pack("=IHHII", 8, 2, 0, 0, 0)).garbled == 1  # nlmsg_len < 16
    p = parse_messages(good + struct.pack("=IHHII", 4096, 2, 0, 0, 0) + good)  # len past the end: stop
    assert len(p.packets) == 1 and p.garbled == 1
    # the last message may come unpadded
    unpadded = struct.pack("=IHHII", 20, nflog.NLMSG_ERROR, 0, 3, 0) + struct.pack("=i", 0)
    assert parse_messages(unpadded) == ([], [Ack(3)], 0)


def test_accepts_bytearray_and_memoryview():
    good = packet_msg(ip4(6, PORTS))
    assert parse_messages(bytearray(good)) == parse_messages(memoryview(good)) == parse_messages(good)


# --- fuzzing ----------------------------------------------------------------------------


def check_shape(result) -> None:
    packets, replies, garbled = result
    assert isinstance(garbled, int) and garbled >= 0
    for p in packets:
        assert isinstance(p, LoggedPacket) and p.family in (4, 6)
        assert p.dport is None or 0 <= p.dport <= 65535
    for r in replies:
        assert isinstance(r, (Ack, NetlinkError))


@given(st.binary(max_size=2048))
@settings(max_examples=1500, deadline=None)
def test_random_bytes_never_raise(buf):
    check_shape(parse_messages(buf))


SEEDS = [BLOBS[n] for n in CAPTURES] or [b""]


@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
    st.integers(0, 4096),
)
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_and_truncated_captures_never_raise(seed, flips, cut):
    buf = bytearray(seed)
    for pos, val in flips:
        if buf:
            buf[pos % len(buf)] = val
    check_shape(parse_messages(bytes(buf[:cut])))


@given(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=6), st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_spliced_captures_never_raise(parts, junk):
    check_shape(parse_messages(b"".join(parts) + junk))
    check_shape(parse_messages(junk + b"".join(parts)))
