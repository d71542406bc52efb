"""nfnetlink_log (NFLOG) wire messages: config encoders and a packet-log decoder.

Pure (no I/O). The socket side lives in ``egressd.nflogsock``; it only moves bytes.

    bind_group_msg / unbind_group_msg / set_mode_msg / set_timeout_msg /
    set_qthresh_msg / set_nlbufsiz_msg / set_flags_msg     config requests (bytes)
    parse_messages(buf) -> Parsed(packets, replies, garbled)

A datagram read from the socket holds one or more netlink messages::

    nlmsghdr (16, host order) | nfgenmsg (4: family, version, res_id=group BE) | nlattrs ...
                                                      NFULA_PREFIX   "egd:D:1001\\0"
                                                      NFULA_PAYLOAD  IPv4/IPv6 header + L4 header

Netlink headers and attribute headers are in host byte order; attribute values and the
nfgenmsg ``res_id`` are big-endian. ``parse_messages`` never raises: whatever cannot be
decoded is skipped and counted in ``garbled``.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

# Netlink.
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = 0x3FFF
AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 10
NFNETLINK_V0 = 0

# nfnetlink_log (linux/netfilter/nfnetlink_log.h).
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG

# Packet attributes.
NFULA_UNSPEC = 0
NFULA_PACKET_HDR = 1  # be16 hw_protocol, u8 hook, u8 pad
NFULA_MARK = 2
NFULA_TIMESTAMP = 3  # be64 sec, be64 usec
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_SEQ_GLOBAL = 13
NFULA_GID = 14
NFULA_HWTYPE = 15
NFULA_HWHEADER = 16
NFULA_HWLEN = 17
NFULA_CT = 18
NFULA_CT_INFO = 19
NFULA_VLAN = 20
NFULA_L2HDR = 21

# Config commands and attributes.
NFULNL_CFG_CMD_NONE = 0
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_CFG_CMD_PF_UNBIND = 4
NFULA_CFG_UNSPEC = 0
NFULA_CFG_CMD = 1  # u8 command
NFULA_CFG_MODE = 2  # be32 copy_range, u8 copy_mode, u8 pad
NFULA_CFG_NLBUFSIZ = 3  # be32 bytes
NFULA_CFG_TIMEOUT = 4  # be32 centiseconds
NFULA_CFG_QTHRESH = 5  # be32 messages
NFULA_CFG_FLAGS = 6  # be16
NFULNL_COPY_NONE, NFULNL_COPY_META, NFULNL_COPY_PACKET = 0, 1, 2
NFULNL_CFG_F_SEQ, NFULNL_CFG_F_SEQ_GLOBAL, NFULNL_CFG_F_CONNTRACK = 0x1, 0x2, 0x4

# IP protocol numbers the decoder knows.
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE = 33, 132, 136
IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_NONXT, IPV6_DSTOPTS = 0, 43, 44, 51, 59, 60
PROTOCOL_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp", IPPROTO_ICMPV6: "ipv6-icmp"}
_PORTED = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP})
_MAX_EXT_HEADERS = 8

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_NLATTR = struct.Struct("=HH")  # len, type (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big-endian)
_ERRNO = struct.Struct("=i")
_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")
_PORTS = struct.Struct("!HH")
_TIMESTAMP = struct.Struct("!QQ")
_MODE = struct.Struct("!IBx")


@dataclass(frozen=True)
class LoggedPacket:
    """One packet the kernel logged: who sent what to where, and the rule's prefix."""

    family: int  # 4 or 6
    prefix: str
    src: str
    dst: str
    protocol: str  # "tcp" | "udp" | "icmp" | "ipv6-icmp" | the protocol number as a string
    dport: int | None
    sport: int | None
    icmp_type: int | None
    timestamp: float | None  # NFULA_TIMESTAMP (only on prerouting/input/forward hooks)
    indev: int | None
    outdev: int | None


@dataclass(frozen=True)
class Ack:
    """NLMSG_ERROR with error 0: the request with this sequence number was accepted."""

    seq: int


@dataclass(frozen=True)
class NetlinkError:
    """NLMSG_ERROR with a nonzero code (``errno`` is positive), or an NLMSG_OVERRUN, which is
    reported as ENOBUFS with ``overrun`` set."""

    seq: int
    errno: int
    overrun: bool = False

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"netlink error {name} (seq {self.seq})"


class Parsed(NamedTuple):
    """What one buffer held. Unpacks as ``packets, replies, garbled``."""

    packets: list[LoggedPacket]
    replies: list[Ack | NetlinkError]
    garbled: int


# --- encoders ---------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(atype: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(4 + len(value), atype) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _config_msg(group: int, seq: int, attrs: bytes, family: int = AF_UNSPEC) -> bytes:
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"NFLOG group must be 0..65535, got {group}")
    if not 0 <= seq <= 0xFFFFFFFF:
        raise ValueError(f"netlink sequence number out of range: {seq}")
    body = _NFGENMSG.pack(family, NFNETLINK_V0, group) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _u32(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must fit in 32 bits, got {value}")
    return _BE32.pack(value)


def bind_group_msg(group: int, seq: int) -> bytes:
    """Ask the kernel to send this netns's log group ``group`` to the sending socket."""
    return _config_msg(group, seq, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))


def unbind_group_msg(group: int, seq: int) -> bytes:
    """Release the group (closing the socket does so too)."""
    return _config_msg(group, seq, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))


def set_mode_msg(group: int, copy_range: int, seq: int, mode: int = NFULNL_COPY_PACKET) -> bytes:
    """Copy mode, and how many bytes of each packet (from the network header) to copy."""
    if mode not in (NFULNL_COPY_NONE, NFULNL_COPY_META, NFULNL_COPY_PACKET):
        raise ValueError(f"unknown copy mode {mode}")
    _u32("copy_range", copy_range)
    return _config_msg(group, seq, _attr(NFULA_CFG_MODE, _MODE.pack(copy_range, mode)))


def set_timeout_msg(group: int, centiseconds: int, seq: int) -> bytes:
    """Flush a partly filled batch after this long (1/100 s)."""
    return _config_msg(group, seq, _attr(NFULA_CFG_TIMEOUT, _u32("timeout", centiseconds)))


def set_qthresh_msg(group: int, n: int, seq: int) -> bytes:
    """Flush a batch once it holds ``n`` packets."""
    return _config_msg(group, seq, _attr(NFULA_CFG_QTHRESH, _u32("qthresh", n)))


def set_nlbufsiz_msg(group: int, size: int, seq: int) -> bytes:
    """Size of the kernel's batch buffer in bytes (the kernel caps it at 128 KiB)."""
    return _config_msg(group, seq, _attr(NFULA_CFG_NLBUFSIZ, _u32("nlbufsiz", size)))


def set_flags_msg(group: int, flags: int, seq: int) -> bytes:
    """NFULNL_CFG_F_* flags (sequence numbers, conntrack info)."""
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"flags must fit in 16 bits, got {flags}")
    return _config_msg(group, seq, _attr(NFULA_CFG_FLAGS, _BE16.pack(flags)))


# --- decoder ----------------------------------------------------------------------------


def parse_messages(buf: bytes) -> Parsed:
    """Decode every netlink message in ``buf``: logged packets, and acks/errors for our
    config requests. Never raises; undecodable messages (and a garbled tail) count in
    ``garbled``. NLMSG_NOOP and NLMSG_DONE are ignored."""
    packets: list[LoggedPacket] = []
    replies: list[Ack | NetlinkError] = []
    garbled = 0
    buf = bytes(buf)
    n = len(buf)
    off = 0
    while off < n:
        if n - off < _NLMSGHDR.size:
            garbled += 1  # a tail too short to be a message
            break
        length, mtype, _flags, seq, _portid = _NLMSGHDR.unpack_from(buf, off)
        if length < _NLMSGHDR.size or length > n - off:
            garbled += 1  # cannot find the next message boundary: give up on the rest
            break
        body = buf[off + _NLMSGHDR.size : off + length]
        off += _align(length)
        if mtype == MSG_PACKET:
            pkt = _packet(body)
            if pkt is None:
                garbled += 1
            else:
                packets.append(pkt)
        elif mtype == NLMSG_ERROR:
            if len(body) < _ERRNO.size:
                garbled += 1
                continue
            (code,) = _ERRNO.unpack_from(body)
            replies.append(Ack(seq) if code == 0 else NetlinkError(seq, abs(code)))
        elif mtype == NLMSG_OVERRUN:
            replies.append(NetlinkError(seq, _errno.ENOBUFS, overrun=True))
        elif mtype in (NLMSG_NOOP, NLMSG_DONE):
            continue
        else:
            garbled += 1
    return Parsed(packets, replies, garbled)


def _attrs(data: bytes) -> dict[int, bytes] | None:
    """The first value of each attribute type, or None when an attribute header is bad."""
    out: dict[int, bytes] = {}
    pos, n = 0, len(data)
    while n - pos >= _NLATTR.size:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < _NLATTR.size or alen > n - pos:
            return None
        out.setdefault(atype & NLA_TYPE_MASK, data[pos + _NLATTR.size : pos + alen])
        pos += _align(alen)
    return out


def _be32(v: bytes | None) -> int | None:
    return _BE32.unpack(v)[0] if v is not None and len(v) == 4 else None


def _packet(body: bytes) -> LoggedPacket | None:
    if len(body) < _NFGENMSG.size:
        return None
    family, _version, _group = _NFGENMSG.unpack_from(body)
    attrs = _attrs(body[_NFGENMSG.size :])
    if attrs is None:
        return None
    payload = attrs.get(NFULA_PAYLOAD)
    if not payload:
        return None
    ipv = {AF_INET: 4, AF_INET6: 6}.get(family)
    if ipv is None:  # netdev/bridge tables: fall back to the ethertype
        hdr = attrs.get(NFULA_PACKET_HDR)
        if hdr is not None and len(hdr) >= 2:
            ipv = {0x0800: 4, 0x86DD: 6}.get(_BE16.unpack_from(hdr)[0])
    if ipv is None or payload[0] >> 4 != ipv:
        return None
    net = _ipv4(payload) if ipv == 4 else _ipv6(payload)
    if net is None:
        return None
    src, dst, proto, l4 = net
    sport = dport = icmp_type = None
    if l4 is not None:
        if proto in _PORTED and len(l4) >= 4:
            sport, dport = _PORTS.unpack_from(l4)
        elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and len(l4) >= 1:
            icmp_type = l4[0]
    ts = attrs.get(NFULA_TIMESTAMP)
    timestamp = None
    if ts is not None and len(ts) == _TIMESTAMP.size:
        sec, usec = _TIMESTAMP.unpack(ts)
        timestamp = sec + usec / 1e6
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    return LoggedPacket(
        family=ipv,
        prefix=prefix,
        src=src,
        dst=dst,
        protocol=PROTOCOL_NAMES.get(proto, str(proto)),
        dport=dport,
        sport=sport,
        icmp_type=icmp_type,
        timestamp=timestamp,
        indev=_be32(attrs.get(NFULA_IFINDEX_INDEV)),
        outdev=_be32(attrs.get(NFULA_IFINDEX_OUTDEV)),
    )


def _ipv4(p: bytes) -> tuple[str, str, int, bytes | None] | None:
    """IPv4 header → (src, dst, protocol, L4 bytes or None for a non-first fragment)."""
    if len(p) < 20:
        return None
    ihl = (p[0] & 0x0F) * 4
    if ihl < 20:
        return None
    frag_offset = _BE16.unpack_from(p, 6)[0] & 0x1FFF
    l4 = p[ihl:] if frag_offset == 0 and len(p) > ihl else None
    return str(ipaddress.IPv4Address(p[12:16])), str(ipaddress.IPv4Address(p[16:20])), p[9], l4


def _ipv6(p: bytes) -> tuple[str, str, int, bytes | None] | None:
    """IPv6 header, walking extension headers → (src, dst, protocol, L4 bytes or None)."""
    if len(p) < 40:
        return None
    src, dst = str(ipaddress.IPv6Address(p[8:24])), str(ipaddress.IPv6Address(p[24:40]))
    nh, off = p[6], 40
    l4: bytes | None = None
    for _ in range(_MAX_EXT_HEADERS + 1):
        if nh in (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS, IPV6_AH):
            if len(p) - off < 2:
                break  # truncated: protocol stays the extension header's number
            hlen = (p[off + 1] + 2) * 4 if nh == IPV6_AH else (p[off + 1] + 1) * 8
            nh, off = p[off], off + hlen
        elif nh == IPV6_FRAGMENT:
            if len(p) - off < 8:
                break
            nh, frag_offset = p[off], _BE16.unpack_from(p, off + 2)[0] >> 3
            off += 8
            if frag_offset:
                break  # a later fragment: no L4 header in it
        else:
            if off < len(p) and nh != IPV6_NONXT:
                l4 = p[off:]
            break
    return src, dst, nh, l4
