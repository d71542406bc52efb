"""Regenerate the captured NFLOG messages in this directory from the real kernel.

    cd /work/main && sudo .venv/bin/python tests/data/nflog/capture.py          # rewrite *.bin/*.json
    cd /work/main && sudo .venv/bin/python tests/data/nflog/capture.py --check  # capture, compare, write nothing

Needs root, `ip` and `nft`. Everything happens in a throw-away network namespace (deleted at
the end) that holds only ``lo`` and a veth pair ``d0``/``d1`` (nothing answers on it):

    d0  10.99.0.1/24, 2001:db8:99::1/64; routes to 192.0.2.0/24, 198.51.100.0/24,
        203.0.113.0/24 and 2001:db8::/32 point at d0.
    table inet t   output: packets out of d0 to those ranges are logged to group 7
                           (prefix "egd:D:1001", or "egd:L:1002" for 2001:db8:2::/48, or no
                           prefix for UDP port 5353) and dropped;
                   input:  UDP to 127.0.0.1:9999 on lo is logged with prefix "egd:D:1003"
                           (the input hook is where the kernel adds NFULA_TIMESTAMP).

For each case in CASES the script runs a few lines of Python inside the namespace (sockets
with fixed source ports, raw sockets for crafted headers), reads the raw datagrams from a
NETLINK_NETFILTER socket bound to group 7 (copy mode packet, copy_range 128, as egressd
uses), checks that they decode to what the case expects, and writes ``<case>.bin`` (the
datagram bytes exactly as recv() returned them) and ``<case>.json`` (the decoded form).
Netlink headers are in host byte order: these files come from a little-endian machine.

tests/priv/test_nflog_capture.py imports this module and replays CASES through NflogReader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.core import nflog
from egressd.nflogsock import socket_in_netns

HERE = Path(__file__).resolve().parent
GROUP = 7
LO, D0 = 1, 3  # interface indexes in a fresh namespace: lo, then d1 (2) and d0 (3)
ANY = "<any>"  # an expected value that depends on the moment of capture (timestamps)

RULESET = f"""
table inet t {{
    chain out {{
        type filter hook output priority 0; policy accept;
        oifname "d0" udp dport 5353 log group {GROUP} drop
        oifname "d0" ip6 daddr 2001:db8:2::/48 log group {GROUP} prefix "egd:L:1002" drop
        oifname "d0" ip daddr {{ 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 }} log group {GROUP} prefix "egd:D:1001" drop
        oifname "d0" ip6 daddr 2001:db8::/32 log group {GROUP} prefix "egd:D:1001" drop
    }}
    chain in {{
        type filter hook input priority 0; policy accept;
        iifname "lo" udp dport 9999 log group {GROUP} prefix "egd:D:1003"
    }}
}}
"""

# Python run inside the namespace. The drop rules make sends fail with EPERM: ignored.
_PRELUDE = """
import socket, struct
def send(fn):
    try:
        fn()
    except PermissionError:
        pass
def udp(fam, src, dst, payload=b"x"):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind(src)
    send(lambda: s.sendto(payload, dst))
    s.close()
def tcp(fam, src, dst):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind(src)
    try:
        s.connect(dst)
    except (BlockingIOError, PermissionError):
        pass
    s.close()
def raw(fam, proto, dst, data):
    s = socket.socket(fam, socket.SOCK_RAW, proto)
    send(lambda: s.sendto(data, dst))
    s.close()
def v4(src, dst, proto, body, ihl_opts=b"", frag=0):
    ihl = 5 + len(ihl_opts) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 0, 0x1234, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + ihl_opts + body
def v6(src, dst, nh, body):
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + body
def udph(sport, dport, data=b"x"):
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
"""


def _pkt(family: int, prefix: str, src: str, dst: str, protocol: str, *, dport: int | None = None,
         sport: int | None = None, icmp_type: int | None = None, timestamp: Any = None,
         indev: int | None = None, outdev: int | None = D0) -> dict[str, Any]:
    return {"family": family, "prefix": prefix, "src": src, "dst": dst, "protocol": protocol,
            "dport": dport, "sport": sport, "icmp_type": icmp_type, "timestamp": timestamp,
            "indev": indev, "outdev": outdev}


@dataclass
class Case:
    name: str
    description: str
    send: str  # Python code, after _PRELUDE, run inside the namespace
    expect: list[dict[str, Any]]
    qthresh: int = 1  # >1 batches several packets into one datagram
    datagrams: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


P4, P6 = socket.AF_INET, socket.AF_INET6
CASES = [
    Case("ipv4_tcp_syn", "IPv4 TCP SYN from 10.99.0.1:40001 to 192.0.2.10:443",
         "tcp(socket.AF_INET, ('10.99.0.1', 40001), ('192.0.2.10', 443))",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "192.0.2.10", "tcp", dport=443, sport=40001)]),
    Case("ipv4_udp", "IPv4 UDP datagram from 10.99.0.1:40002 to 198.51.100.7:53",
         "udp(socket.AF_INET, ('10.99.0.1', 40002), ('198.51.100.7', 53))",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "198.51.100.7", "udp", dport=53, sport=40002)]),
    Case("ipv4_icmp_echo", "IPv4 ICMP echo request to 203.0.113.5 (raw socket)",
         "raw(socket.AF_INET, socket.IPPROTO_ICMP, ('203.0.113.5', 0), struct.pack('!BBHHH', 8, 0, 0xf7fe, 1, 0))",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "203.0.113.5", "icmp", icmp_type=8)]),
    Case("ipv4_options_udp", "IPv4 header with options (IHL 6, NOP NOP NOP EOL) carrying UDP 40007 -> 5000",
         "raw(socket.AF_INET, socket.IPPROTO_RAW, ('192.0.2.20', 0),"
         " v4('10.99.0.1', '192.0.2.20', 17, udph(40007, 5000), ihl_opts=bytes([1, 1, 1, 0])))",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "192.0.2.20", "udp", dport=5000, sport=40007)]),
    Case("ipv4_later_fragment", "IPv4 non-first fragment (offset 800 bytes) of a UDP datagram: no ports",
         "raw(socket.AF_INET, socket.IPPROTO_RAW, ('192.0.2.21', 0),"
         " v4('10.99.0.1', '192.0.2.21', 17, b'y' * 16, frag=100))",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "192.0.2.21", "udp")]),
    Case("ipv6_tcp_syn", "IPv6 TCP SYN from [2001:db8:99::1]:40003 to [2001:db8:1::10]:443",
         "tcp(socket.AF_INET6, ('2001:db8:99::1', 40003), ('2001:db8:1::10', 443))",
         [_pkt(6, "egd:D:1001", "2001:db8:99::1", "2001:db8:1::10", "tcp", dport=443, sport=40003)]),
    Case("ipv6_udp_prefix_l", "IPv6 UDP to [2001:db8:2::53]:53, logged by the rule with prefix egd:L:1002",
         "udp(socket.AF_INET6, ('2001:db8:99::1', 40004), ('2001:db8:2::53', 53))",
         [_pkt(6, "egd:L:1002", "2001:db8:99::1", "2001:db8:2::53", "udp", dport=53, sport=40004)]),
    Case("ipv6_icmpv6_echo", "ICMPv6 echo request to 2001:db8:1::1 (raw socket)",
         "raw(socket.AF_INET6, socket.IPPROTO_ICMPV6, ('2001:db8:1::1', 0), struct.pack('!BBHHH', 128, 0, 0, 1, 1))",
         [_pkt(6, "egd:D:1001", "2001:db8:99::1", "2001:db8:1::1", "ipv6-icmp", icmp_type=128)]),
    Case("ipv6_udp_hbh_dstopts", "IPv6 UDP with hop-by-hop and destination options headers (sticky socket options)",
         "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
         "s.setsockopt(socket.IPPROTO_IPV6, 54, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n"  # IPV6_HOPOPTS, PadN
         "s.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n"  # IPV6_DSTOPTS, PadN
         "s.bind(('2001:db8:99::1', 40005))\n"
         "send(lambda: s.sendto(b'x', ('2001:db8:1::20', 7000)))\n",
         [_pkt(6, "egd:D:1001", "2001:db8:99::1", "2001:db8:1::20", "udp", dport=7000, sport=40005)]),
    Case("ipv6_first_fragment", "IPv6 first fragment (fragment header, offset 0, M=1) of UDP 40006 -> 8443 (raw)",
         "raw(socket.AF_INET6, socket.IPPROTO_RAW, ('2001:db8:1::30', 0), v6('2001:db8:99::1', '2001:db8:1::30', 44,"
         " struct.pack('!BBHI', 17, 0, 0x0001, 0xabcd) + udph(40006, 8443, b'z' * 16)))",
         [_pkt(6, "egd:D:1001", "2001:db8:99::1", "2001:db8:1::30", "udp", dport=8443, sport=40006)]),
    Case("ipv6_later_fragment", "IPv6 non-first fragment (offset 24 bytes) of a UDP datagram: no ports (raw)",
         "raw(socket.AF_INET6, socket.IPPROTO_RAW, ('2001:db8:1::31', 0), v6('2001:db8:99::1', '2001:db8:1::31', 44,"
         " struct.pack('!BBHI', 17, 0, 3 << 3, 0xabce) + b'q' * 16))",
         [_pkt(6, "egd:D:1001", "2001:db8:99::1", "2001:db8:1::31", "udp")]),
    Case("ipv4_udp_no_prefix", "IPv4 UDP to 192.0.2.53:5353, logged by a rule without a prefix",
         "udp(socket.AF_INET, ('10.99.0.1', 40009), ('192.0.2.53', 5353))",
         [_pkt(4, "", "10.99.0.1", "192.0.2.53", "udp", dport=5353, sport=40009)]),
    Case("ipv4_udp_input_timestamp", "IPv4 UDP 127.0.0.1:40008 -> 127.0.0.1:9999 logged on the input hook "
         "(has NFULA_TIMESTAMP and an input device)",
         "udp(socket.AF_INET, ('127.0.0.1', 40008), ('127.0.0.1', 9999))",
         [_pkt(4, "egd:D:1003", "127.0.0.1", "127.0.0.1", "udp", dport=9999, sport=40008,
               timestamp=ANY, indev=LO, outdev=None)]),
    Case("batch_three_udp", "three IPv4 UDP datagrams batched into one netlink datagram (qthresh 3), "
         "with NLM_F_MULTI and a closing NLMSG_DONE",
         "for p in (40010, 40011, 40012):\n    udp(socket.AF_INET, ('10.99.0.1', p), ('198.51.100.8', 123))\n",
         [_pkt(4, "egd:D:1001", "10.99.0.1", "198.51.100.8", "udp", dport=123, sport=p)
          for p in (40010, 40011, 40012)], qthresh=3),
]


class Netns:
    """A scratch namespace with lo, the d0/d1 veth pair, routes and the RULESET. Deleted on exit."""

    def __init__(self, prefix: str = "egcap") -> None:
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.path = f"/run/netns/{self.name}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            for cmd in (
                "link set lo up",
                "link add d0 type veth peer name d1",
                "link set d1 up",
                "link set d0 up",
                "addr add 10.99.0.1/24 dev d0",
                "addr add 2001:db8:99::1/64 dev d0 nodad",
                "route add 192.0.2.0/24 dev d0 src 10.99.0.1",
                "route add 198.51.100.0/24 dev d0 src 10.99.0.1",
                "route add 203.0.113.0/24 dev d0 src 10.99.0.1",
                "-6 route add 2001:db8::/32 dev d0 src 2001:db8:99::1",
            ):
                self.ip(*cmd.split())
            self.exec(["nft", "-f", "-"], input=RULESET)
            idx = int(self.exec(["cat", "/sys/class/net/d0/ifindex"]).strip())
            if idx != D0:
                raise RuntimeError(f"d0 has ifindex {idx}, expected {D0}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True)

    def exec(self, argv: list[str], input: str | None = None) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.name, *argv], input=input,
                           capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"{argv} in {self.name} failed: {r.stderr.strip()}")
        return r.stdout

    def python(self, code: str) -> None:
        self.exec([sys.executable, "-c", _PRELUDE + "\n" + code])


class RawGroup:
    """A bare NETLINK_NETFILTER socket bound to GROUP, returning datagrams unparsed."""

    def __init__(self, netns: str) -> None:
        self.sock = socket_in_netns(netns)
        self.sock.bind((0, 0))
        self.seq = 0
        self.bind_ack = self.request(nflog.bind_group_msg(GROUP, self.next_seq()))
        self.request(nflog.set_mode_msg(GROUP, 128, self.next_seq()))
        self.request(nflog.set_timeout_msg(GROUP, 1, self.next_seq()))

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, msg: bytes) -> bytes:
        """Send a config message; return the raw datagram holding its ack (or error)."""
        self.sock.send(msg)
        data = self.recv(2.0)
        if data is None:
            raise RuntimeError("no reply to a config request")
        return data

    def recv(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return self.sock.recv(1 << 18) if ready else None

    def drain(self) -> None:
        while self.recv(0.05) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


def decoded(buf: bytes) -> dict[str, Any]:
    """The JSON form of what parse_messages makes of ``buf``."""
    packets, replies, garbled = nflog.parse_messages(buf)
    return {
        "packets": [dataclasses.asdict(p) for p in packets],
        "replies": [{"type": "ack", "seq": r.seq} if isinstance(r, nflog.Ack)
                    else {"type": "error", "seq": r.seq, "errno": r.errno, "overrun": r.overrun}
                    for r in replies],
        "garbled": garbled,
    }


def matches(expect: list[dict[str, Any]], got: list[dict[str, Any]], now: float) -> bool:
    if len(expect) != len(got):
        return False
    for e, g in zip(expect, got):
        for k, v in e.items():
            if v == ANY:
                if not isinstance(g[k], float) or abs(g[k] - now) > 60:
                    return False
            elif g[k] != v:
                return False
    return True


def capture_case(ns: Netns, grp: RawGroup, case: Case) -> bytes:
    grp.request(nflog.set_qthresh_msg(GROUP, case.qthresh, grp.next_seq()))
    grp.drain()
    ns.python(case.send)
    data = b""
    deadline = time.monotonic() + 5
    for _ in range(case.datagrams):
        got = grp.recv(max(0.0, deadline - time.monotonic()))
        if got is None:
            raise RuntimeError(f"{case.name}: no NFLOG datagram")
        data += got
    if grp.recv(0.3) is not None:
        raise RuntimeError(f"{case.name}: more datagrams than expected")
    return data


def main(argv: list[str]) -> int:
    check = "--check" in argv
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    outputs: dict[str, tuple[bytes, dict[str, Any]]] = {}
    failed = 0
    with Netns() as ns:
        grp = RawGroup(ns.path)
        try:
            outputs["ack"] = (grp.bind_ack, {"description": "the kernel's ack (NLMSG_ERROR, error 0) to the bind request, seq 1"})
            # Configuring a group nobody bound: the kernel answers ENODEV.
            grp.sock.send(nflog.set_mode_msg(GROUP + 1, 128, 77))
            err = grp.recv(2.0) or b""
            outputs["error_enodev"] = (err, {"description": "NLMSG_ERROR ENODEV (seq 77): set mode on an unbound group"})
            for case in CASES:
                data = capture_case(ns, grp, case)
                outputs[case.name] = (data, {"description": case.description})
                got = decoded(data)
                if got["garbled"] or got["replies"] or not matches(case.expect, got["packets"], time.time()):
                    print(f"MISMATCH {case.name}: expected {case.expect}\n  got {got}", file=sys.stderr)
                    failed += 1
        finally:
            grp.close()
    for name, (data, meta) in outputs.items():
        doc = {**meta, **decoded(data)}
        if check:
            print(f"{name}: {len(data)} bytes, {len(doc['packets'])} packets, {doc['replies']}")
            continue
        (HERE / f"{name}.bin").write_bytes(data)
        (HERE / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(outputs)} captures, {failed} mismatches" + ("" if check else f", written to {HERE}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
