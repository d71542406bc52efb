"""Bypass attempts from a RESTRICTED workload, with real clients and scapy-crafted packets.

Every attempt goes from w1 (workspace 1001, ENFORCED) to addresses its policy does not allow. A
raw-socket sniffer on the internet side of the node (``Sniffer``) records every frame that leaves
the node for the target addresses, so "denied" means: the client fails, nothing reaches the far
side, and a denial event with the right destination, port and protocol reaches the collector
(or, where no event can exist by design, the counter or the kernel statistic that proves the drop
moved). Each crafted attempt has a control: the same packets from w3 (FULL_ACCESS) do arrive,
so the sniffer is known to see them.

Covered elsewhere, not repeated here:
- plain TCP connects to denied IPv4/IPv6 fail at once: test_enforce.py::test_direct_connect_to_denied_ip_fails_fast,
  and are logged with every column: test_logs.py::test_denied_ip_appears_within_1s_with_ip_event,
  test_logs.py::test_ipv6_and_udp_denials_are_logged;
- DNS to other resolvers on UDP and TCP 53 is answered by the shim (denied names never reach any
  upstream): test_enforce.py::test_query_to_another_resolver_is_answered_by_the_shim,
  test_enforce.py::test_denied_name_is_never_asked_upstream;
- DNS over TLS (TCP 853) to an allowed IP is rejected: test_enforce.py::test_dns_over_tls_is_rejected
  (its event is checked here);
- co-hosting (another name on an allowed IP) is accepted by design:
  test_enforce.py::test_cohosted_name_on_an_allowed_ip_answers_200.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import textwrap
import time
from unittest import mock

import pytest

from egressd.lab import Lab, world
from egressd.lab import dnsmasq as lab_dnsmasq
from egressd.lab.apiclient import call
from egressd.lab.collectorproc import CollectorProc
from egressd.lab.daemonproc import DaemonProc

# --------------------------------------------------------------------------- helpers

SNIFF = textwrap.dedent(
    """
    import json, select, socket, struct, sys, time
    wanted = set(sys.argv[1:])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("eth0", 0))
    s.setblocking(False)
    seen = []

    def take(frame, pkttype):
        if pkttype == socket.PACKET_OUTGOING or len(frame) < 34:
            return
        etype = struct.unpack("!H", frame[12:14])[0]
        ip = frame[14:]
        if etype == 0x0800:
            src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
            proto, ihl, frag = ip[9], (ip[0] & 15) * 4, struct.unpack("!H", ip[6:8])[0]
            offset, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
            l4 = ip[ihl:]
        elif etype == 0x86DD and len(ip) >= 40:
            src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
            proto, l4, offset, more = ip[6], ip[40:], 0, False
            if proto == 44 and len(l4) >= 8:  # fragment header
                fo = struct.unpack("!H", l4[2:4])[0]
                proto, offset, more, l4 = l4[0], fo & 0xFFF8, bool(fo & 1), l4[8:]
        else:
            return
        if dst not in wanted:
            return
        dport = struct.unpack("!H", l4[2:4])[0] if proto in (6, 17) and offset == 0 and len(l4) >= 4 else None
        flags = l4[13] if proto == 6 and offset == 0 and len(l4) >= 14 else None
        seen.append({"src": src, "dst": dst, "proto": proto, "dport": dport, "offset": offset, "more": more,
                     "tcp_flags": flags})

    print("READY", flush=True)
    deadline = time.monotonic() + 60  # bounded, whatever the test does
    while time.monotonic() < deadline:
        r, _, _ = select.select([s, sys.stdin], [], [], 1)
        if s in r:
            for _ in range(1000):
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                take(frame, addr[2])
        if sys.stdin in r and not sys.stdin.readline():
            break
    for _ in range(1000):
        try:
            frame, addr = s.recvfrom(65535)
        except BlockingIOError:
            break
        take(frame, addr[2])
    print(json.dumps(seen), flush=True)
    """
)


class Sniffer:
    """Records the frames that reach the internet namespace for some destination addresses."""

    def __init__(self, lab: Lab, *dsts: str) -> None:
        self.lab = lab
        self.dsts = [str(ipaddress.ip_address(d)) for d in dsts]
        self.proc: subprocess.Popen | None = None
        self.frames: list[dict] = []

    def __enter__(self) -> Sniffer:
        self.proc = self.lab.popen(self.lab.inet_ns, [sys.executable, "-c", SNIFF, *self.dsts],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", self.proc.stderr.read()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # frames in flight
        out, err = self.proc.communicate(input="", timeout=15)
        self.frames = json.loads(out.strip().splitlines()[-1]) if out.strip() else []
        assert self.proc.returncode == 0, err

    def to(self, dst: str, src: str | None = None) -> list[dict]:
        dst = str(ipaddress.ip_address(dst))
        return [f for f in self.frames if f["dst"] == dst and (src is None or f["src"] == src)]


SEND = textwrap.dedent(
    """
    import sys
    from scapy.all import (Ether, IP, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrDestOpt, TCP, UDP, ICMP,
                           ICMPv6EchoRequest, Raw, DNS, DNSQR, fragment, fragment6, sendp, conf)
    conf.verb = 0
    scope = dict(globals())
    exec(sys.argv[2], scope)
    frames = [Ether(dst=sys.argv[1]) / p for p in scope["pkts"]]
    sendp(frames, iface="eth0", inter=0.02)
    print(len(frames))
    """
)


def gateway_mac(env_lab: Lab, host) -> str:
    out = env_lab.run(env_lab.node_ns, ["ip", "-j", "link", "show", host.node_ifname], check=True).stdout
    return json.loads(out)[0]["address"]


def scapy_send(lab: Lab, host, code: str) -> int:
    """Send the packets that ``code`` puts in ``pkts`` (scapy, L3 upwards) from a workload, as
    Ethernet frames to its gateway on the node. Returns how many frames were sent."""
    r = lab.run(host.netns, [sys.executable, "-c", SEND, gateway_mac(lab, host), code], timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1])


def events(env, dst: str, extra: str = "") -> list[dict]:
    dst = str(ipaddress.ip_address(dst))
    return env.collector.sql(
        f"select * from system.access.outbound_network where destination = '{dst}' {extra} order by event_time")


def wait_event(env, dst: str, port: int | None, proto: str, *, workload: str = "ws1-notebook") -> dict:
    """The first denial event for dst with that port and protocol; fails after 5 s."""
    dst = str(ipaddress.ip_address(dst))
    port_sql = "is null" if port is None else f"= {port}"
    q = (f"select * from system.access.outbound_network where destination = '{dst}' and workload_id = '{workload}' "
         f"and ip_event.protocol = '{proto}' and ip_event.destination_port {port_sql}")
    rows, waited = env.collector.wait_rows(q, lambda r: len(r) >= 1, timeout=5)
    assert rows, f"no {proto}/{port} denial event for {dst} after {waited:.1f}s"
    r = rows[0]
    assert r["destination_type"] == "IP" and r["access_type"] == "DROP"
    assert r["workspace_id"] == "1001" and r["network_policy_id"] == "restricted-etl"
    return r


def sync_events(env, tag_port: int) -> None:
    """A marker denial (UDP to 192.0.2.250:tag_port from w1), waited for: events are shipped in
    order, so anything logged before it is in the collector once it is."""
    env.lab.run(env.w1.netns, [sys.executable, "-c",
                               f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'm', ('192.0.2.250', {tag_port}))"])
    wait_event(env, "192.0.2.250", tag_port, "udp")


def deny_counters(env) -> tuple[int, int]:
    """(TCP resets, other rejects or drops) counted by the table's deny chain."""
    doc = json.loads(env.nft("-j", "list", "chain", "inet", "egressd", "deny"))
    counts = []
    for o in doc["nftables"]:
        rule = o.get("rule")
        if rule:
            counts += [s["counter"]["packets"] for s in rule["expr"] if "counter" in s]
    return counts[0], counts[-1]


def metric(env, name: str) -> float:
    status, text = env.api("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def node_netstat(env, *keys: str) -> dict[str, int]:
    out = env.lab.run(env.lab.node_ns, ["nstat", "-az", "--json"], check=True).stdout
    doc = json.loads(out)
    flat = {k: v for table in doc.values() for k, v in table.items()}
    return {k: int(flat.get(k, 0)) for k in keys}


def v6(a: str) -> str:
    return str(ipaddress.ip_address(a))


# --------------------------------------------------------------------------- TCP with odd flags

# kind -> (scapy flags, payload, does conntrack see a new flow?)
TCP_KINDS = {
    "syn_payload": ("S", "GET / HTTP/1.0\\r\\n\\r\\n", True),
    "bare_ack": ("A", "", True),      # nf_conntrack_tcp_loose=1 (default): picked up mid-stream, a NEW flow
    "fin": ("F", "", False),          # no connection: conntrack marks it INVALID
    "null": ("", "", False),          # no flags at all: INVALID
    "xmas": ("FPU", "", False),       # FIN+PSH+URG: INVALID
}


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_with_odd_flags_never_leaves_the_node(env, family):
    """SYN with payload, bare ACK, FIN, no flags, FIN+PSH+URG to a denied IP: nothing arrives;
    every one hits the deny chain; the ones conntrack sees as a new flow are logged."""
    dst = "192.0.2.131" if family == 4 else "2001:db8:ff::131"
    ctl = "192.0.2.132" if family == 4 else "2001:db8:ff::132"
    ipl = "IP" if family == 4 else "IPv6"
    src1 = env.w1.ipv4 if family == 4 else env.w1.ipv6
    src3 = env.w3.ipv4 if family == 4 else env.w3.ipv6
    code = "pkts = [\n" + "".join(
        f"  {ipl}(src='{{src}}', dst='{{dst}}') / TCP(sport={40000 + i}, dport={21000 + i}, flags='{fl}', seq=1000, ack=5)"
        + (f" / Raw(b'{pl}')" if pl else "") + ",\n"
        for i, (fl, pl, _new) in enumerate(TCP_KINDS.values())) + "]"
    resets_before, _ = deny_counters(env)
    with Sniffer(env.lab, dst, ctl) as sn:
        assert scapy_send(env.lab, env.w1, code.format(src=src1, dst=dst)) == len(TCP_KINDS)
        scapy_send(env.lab, env.w3, code.format(src=src3, dst=ctl))
    assert sn.to(dst) == [], sn.to(dst)
    assert len(sn.to(ctl)) == len(TCP_KINDS), "control: every crafted segment from full access arrives"
    resets_after, _ = deny_counters(env)
    assert resets_after - resets_before >= len(TCP_KINDS)
    for i, (kind, (_fl, _pl, new)) in enumerate(TCP_KINDS.items()):
        if new:
            r = wait_event(env, dst, 21000 + i, "tcp")
            assert r["ip_event"]["source_ip"] == src1 and r["ip_event"]["destination_ip"] == v6(dst), kind
    sync_events(env, 21100 + family)
    logged = {r["ip_event"]["destination_port"] for r in events(env, dst)}
    assert logged == {21000 + i for i, v in enumerate(TCP_KINDS.values()) if v[2]}, \
        "INVALID segments (no flow) are rejected but not logged: they cannot open a flow"


def test_bare_ack_without_loose_pickup_is_invalid_rejected_and_not_logged(env):
    """With nf_conntrack_tcp_loose=0 a bare ACK is INVALID rather than a new flow: still rejected,
    not logged (the log records new flows)."""
    node = env.lab.node_ns
    env.lab.run(node, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"], check=True)
    try:
        dst = "192.0.2.133"
        resets_before, _ = deny_counters(env)
        with Sniffer(env.lab, dst) as sn:
            scapy_send(env.lab, env.w1, f"pkts = [IP(src='{env.w1.ipv4}', dst='{dst}') / TCP(sport=40100, dport=21200, flags='A', seq=7, ack=9)]")
        assert sn.to(dst) == []
        assert deny_counters(env)[0] - resets_before >= 1
        sync_events(env, 21201)
        assert events(env, dst) == []
    finally:
        env.lab.run(node, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=1"], check=True)


# --------------------------------------------------------------------------- DNS, ICMP, UDP

@pytest.mark.parametrize("port,tcp", [(5353, False), (5300, False), (5300, True), (443, False)],
                         ids=["udp5353", "udp5300", "tcp5300", "udp443"])
def test_dns_on_other_ports_to_a_denied_ip_gets_no_answer_and_is_logged(env, port, tcp):
    dst = f"192.0.2.{140 + port % 7 + (10 if tcp else 0)}"
    with Sniffer(env.lab, dst) as sn:
        r = env.lab.dig(env.w1, "pypi.org", server=dst, tcp=tcp, timeout=2, extra=["-p", str(port)])
        ctl = env.lab.dig(env.w3, "pypi.org", server=dst, tcp=tcp, timeout=1, extra=["-p", str(port)])
    assert r.status is None, r.output
    assert r.elapsed < 1.5, f"reject is immediate, took {r.elapsed:.2f}s"
    assert sn.to(dst, env.w1.ipv4) == []
    assert sn.to(dst, env.w3.ipv4), "control: full access reaches the address (nobody answers there)"
    assert ctl.status is None
    wait_event(env, dst, port, "tcp" if tcp else "udp")


PING = textwrap.dedent(
    """
    import os, socket, struct, sys, time
    dst = sys.argv[1]
    v6 = ":" in dst
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"egressd-bypass"
    if not v6:  # the kernel computes ICMPv6 checksums itself
        words = sum(struct.unpack("!%dH" % (len(msg) // 2), msg))
        words = (words >> 16) + (words & 0xFFFF)
        msg = msg[:2] + struct.pack("!H", ~(words + (words >> 16)) & 0xFFFF) + msg[4:]
    s.sendto(msg, (dst, 0))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, peer = s.recvfrom(2000)
        except socket.timeout:
            break
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        kind = icmp[0]
        if kind in ((129,) if v6 else (0,)) and struct.unpack("!H", icmp[4:6])[0] == ident:
            print("reply", peer[0]); sys.exit(0)
        if kind in ((1,) if v6 else (3,)):
            print("unreachable", peer[0], "code", icmp[1]); sys.exit(1)
    print("timeout"); sys.exit(1)
    """
)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo_to_a_denied_ip_is_rejected_and_logged(env, family):
    # The lab image has no ping binary: a raw-socket echo request, and what comes back.
    dst = "192.0.2.161" if family == 4 else "2001:db8:ff::161"
    with Sniffer(env.lab, dst) as sn:
        r1 = env.lab.run(env.w1.netns, [sys.executable, "-c", PING, dst], timeout=10)
        r3 = env.lab.run(env.w3.netns, [sys.executable, "-c", PING, dst], timeout=10)
    # reject: ICMP admin-prohibited (code 13) / ICMPv6 administratively prohibited (code 1), from the node
    assert r1.stdout.split()[:1] == ["unreachable"] and r1.stdout.split()[-1] == ("13" if family == 4 else "1"), r1.stdout + r1.stderr
    assert r3.stdout.startswith("reply"), "control: full access gets the echo reply: " + r3.stdout + r3.stderr
    assert sn.to(dst, env.w1.ipv4 if family == 4 else env.w1.ipv6) == []
    r = wait_event(env, dst, None, "icmp" if family == 4 else "ipv6-icmp")
    assert r["ip_event"]["destination_ip"] == v6(dst)


UDP_ECHO = textwrap.dedent(
    """
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((sys.argv[1], int(sys.argv[2])))
    try:
        s.send(b"ping")
        print(s.recv(100).decode())
    except OSError as e:
        print("error", type(e).__name__, e)
    """
)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_to_a_denied_ip_gets_no_echo_and_is_logged(env, family):
    dst = "192.0.2.171" if family == 4 else "2001:db8:ff::171"
    with Sniffer(env.lab, dst) as sn:
        out1 = env.lab.run(env.w1.netns, [sys.executable, "-c", UDP_ECHO, dst, "7"]).stdout
        out3 = env.lab.run(env.w3.netns, [sys.executable, "-c", UDP_ECHO, dst, "7"]).stdout
    assert out1.startswith("error"), out1
    assert out3.strip() == "ping", "control: the lab echoes UDP 7 on every address"
    assert sn.to(dst, env.w1.ipv4 if family == 4 else env.w1.ipv6) == []
    wait_event(env, dst, 7, "udp")


def test_dns_over_tls_rejection_is_logged(env):
    # The rejection itself: test_enforce.py::test_dns_over_tls_is_rejected.
    assert env.lab.dig(env.w1, "pypi.org").status == "NOERROR"
    assert env.lab.curl(env.w1, "http://198.51.100.10:853/", timeout=3)[0] is None
    r = wait_event(env, "198.51.100.10", 853, "tcp")
    assert r["ip_event"]["source_ip"] == env.w1.ipv4


def test_dns_over_quic_udp_853_to_an_allowed_ip_is_rejected_and_logged(env):
    # DoQ (RFC 9250) runs on UDP 853: closed like DoT, even to an allowed IP; other UDP ports to
    # the same IP stay open (control), so it is the port that is refused.
    assert env.lab.dig(env.w1, "pypi.org").status == "NOERROR"
    dst = "198.51.100.10"
    assert env.lab.run(env.w1.netns, [sys.executable, "-c", UDP_ECHO, dst, "7"]).stdout.strip() == "ping"
    out = env.lab.run(env.w1.netns, [sys.executable, "-c", UDP_ECHO, dst, "853"]).stdout
    assert out.startswith("error"), out
    assert env.lab.run(env.w3.netns, [sys.executable, "-c", UDP_ECHO, dst, "853"]).stdout.strip() == "ping", \
        "control: the lab echoes UDP 853 for an unrestricted workload"
    r = wait_event(env, dst, 853, "udp")
    assert r["ip_event"]["source_ip"] == env.w1.ipv4


# --------------------------------------------------------------------------- fragments

def _frag_code(family: int, src: str, dst: str, dport: int) -> str:
    """A UDP datagram of 1200 bytes, cut in ~400-byte fragments."""
    if family == 4:
        return (f"pkts = fragment(IP(src='{src}', dst='{dst}', id=0x4141) / UDP(sport=41000, dport={dport}) "
                f"/ Raw(b'F' * 1200), fragsize=400)")
    return (f"pkts = fragment6(IPv6(src='{src}', dst='{dst}') / IPv6ExtHdrFragment(id=0x4141) "
            f"/ UDP(sport=41000, dport={dport}) / Raw(b'F' * 1200), 500)")


@pytest.mark.parametrize("family", [4, 6])
def test_fragmented_udp_is_reassembled_then_denied_and_logged(env, family):
    dst = "192.0.2.181" if family == 4 else "2001:db8:ff::181"
    ctl = "192.0.2.182" if family == 4 else "2001:db8:ff::182"
    s1, s3 = (env.w1.ipv4, env.w3.ipv4) if family == 4 else (env.w1.ipv6, env.w3.ipv6)
    with Sniffer(env.lab, dst, ctl) as sn:
        assert scapy_send(env.lab, env.w1, _frag_code(family, s1, dst, 7)) >= 3
        scapy_send(env.lab, env.w3, _frag_code(family, s3, ctl, 7))
    assert sn.to(dst) == []
    assert len(sn.to(ctl)) >= 3 and any(f["more"] for f in sn.to(ctl)), "control: the fragments go through"
    r = wait_event(env, dst, 7, "udp")
    assert r["ip_event"]["source_ip"] == s1


def _overlap_code(family: int, src: str, dst: str) -> str:
    """Three UDP fragments to port 7 where the second overlaps the first by 8 bytes
    (it rewrites bytes 16..24 of the datagram)."""
    if family == 4:
        return textwrap.dedent(f"""
            raw = bytes(UDP(sport=41001, dport=7, len=8 + 40) / Raw(b'A' * 40))
            raw = raw[:6] + b'\\0\\0' + raw[8:]  # no checksum: fragments can be cut anywhere
            base = dict(src='{src}', dst='{dst}', id=0x4242, proto=17)
            pkts = [IP(flags='MF', frag=0, **base) / Raw(raw[:24]),
                    IP(flags='MF', frag=2, **base) / Raw(b'B' * 16),
                    IP(frag=4, **base) / Raw(raw[32:])]
        """)
    return textwrap.dedent(f"""
        ip = IPv6(src='{src}', dst='{dst}')
        raw = bytes(ip / UDP(sport=41001, dport=7) / Raw(b'A' * 40))[40:]  # checksum right for the 'A' version
        pkts = [ip / IPv6ExtHdrFragment(id=0x4242, offset=0, m=1, nh=17) / Raw(raw[:24]),
                ip / IPv6ExtHdrFragment(id=0x4242, offset=2, m=1, nh=17) / Raw(b'B' * 16),
                ip / IPv6ExtHdrFragment(id=0x4242, offset=4, m=0, nh=17) / Raw(raw[32:])]
    """)


@pytest.mark.parametrize("family", [4, 6])
def test_overlapping_fragments_are_discarded_by_reassembly(env, family):
    """Overlaps (RFC 5722; Linux does the same for IPv4 since 4.19) discard the whole datagram in
    nf_defrag, before any rule: nothing arrives, from any source, and there is nothing to log."""
    dst = "192.0.2.183" if family == 4 else "2001:db8:ff::183"
    ctl = "192.0.2.184" if family == 4 else "2001:db8:ff::184"
    s1, s3 = (env.w1.ipv4, env.w3.ipv4) if family == 4 else (env.w1.ipv6, env.w3.ipv6)
    before = node_netstat(env, "IpExtReasmOverlaps")["IpExtReasmOverlaps"]
    with Sniffer(env.lab, dst, ctl) as sn:
        scapy_send(env.lab, env.w1, _overlap_code(family, s1, dst))
        scapy_send(env.lab, env.w3, _overlap_code(family, s3, ctl))
    assert sn.to(dst) == []
    assert sn.to(ctl) == [], "full access too: the kernel's reassembly drops overlaps for everyone"
    if family == 4:  # (IPv6's netfilter reassembly counts nothing)
        assert node_netstat(env, "IpExtReasmOverlaps")["IpExtReasmOverlaps"] - before == 2
    sync_events(env, 21300 + family)
    assert events(env, dst) == []


def _tiny_first_code(family: int, src: str, dst: str, dport: int) -> str:
    """A first fragment that does not hold the whole L4 header: for IPv4, a TCP SYN whose first
    fragment carries only the ports and sequence number (RFC 1858's tiny fragment: the flags are in
    the second one); for IPv6, a first fragment holding only a Destination Options header, the
    UDP header in the second (RFC 7112's incomplete header chain)."""
    if family == 4:
        return textwrap.dedent(f"""
            raw = bytes(IP(src='{src}', dst='{dst}') / TCP(sport=41002, dport={dport}, flags='S', seq=1))[20:]
            base = dict(src='{src}', dst='{dst}', id=0x4343, proto=6)
            pkts = [IP(flags='MF', frag=0, **base) / Raw(raw[:8]), IP(frag=1, **base) / Raw(raw[8:])]
        """)
    return textwrap.dedent(f"""
        ip = IPv6(src='{src}', dst='{dst}')
        raw = bytes(ip / IPv6ExtHdrDestOpt(nh=17) / UDP(sport=41002, dport={dport}) / Raw(b'T' * 16))[40:]
        pkts = [ip / IPv6ExtHdrFragment(id=0x4343, offset=0, m=1, nh=60) / Raw(raw[:8]),
                ip / IPv6ExtHdrFragment(id=0x4343, offset=1, m=0, nh=60) / Raw(raw[8:])]
    """)


def test_tiny_first_fragment_ipv4_is_reassembled_then_denied_and_logged(env):
    dst, ctl = "192.0.2.185", "192.0.2.186"
    with Sniffer(env.lab, dst, ctl) as sn:
        scapy_send(env.lab, env.w1, _tiny_first_code(4, env.w1.ipv4, dst, 21400))
        scapy_send(env.lab, env.w3, _tiny_first_code(4, env.w3.ipv4, ctl, 21400))
    assert sn.to(dst) == []
    assert sn.to(ctl), "control: the reassembled SYN goes through for full access"
    wait_event(env, dst, 21400, "tcp")


def test_ipv6_first_fragment_without_the_upper_header_never_arrives(env):
    """RFC 7112 / RFC 8200 4.5: a first fragment without the whole header chain. nf_defrag does not
    reassemble it (kernel 6.x): the first fragment goes on alone, untracked, and the later ones wait
    in the reassembly queue until it expires. From w1 the lone first fragment meets the deny chain
    (rejected; not a new flow, so not logged); from anybody, the datagram is never completed."""
    dst, ctl = "2001:db8:ff::185", "2001:db8:ff::186"
    _tcp, other_before = deny_counters(env)
    with Sniffer(env.lab, dst, ctl) as sn:
        scapy_send(env.lab, env.w1, _tiny_first_code(6, env.w1.ipv6, dst, 21401))
        scapy_send(env.lab, env.w3, _tiny_first_code(6, env.w3.ipv6, ctl, 21401))
    assert sn.to(dst) == []
    assert deny_counters(env)[1] - other_before >= 1
    assert not [f for f in sn.to(ctl) if not f["more"]], "the last fragment never crosses the node"
    sync_events(env, 21402)
    assert events(env, dst) == []


@pytest.mark.parametrize("family", [4, 6])
def test_lone_non_first_fragment_is_never_forwarded(env, family):
    """A fragment whose first part never comes waits in the reassembly queue until it expires:
    no datagram, so no rule and no event; nothing leaves the node for anybody."""
    dst = "192.0.2.187" if family == 4 else "2001:db8:ff::187"
    ctl = "192.0.2.188" if family == 4 else "2001:db8:ff::188"
    s1, s3 = (env.w1.ipv4, env.w3.ipv4) if family == 4 else (env.w1.ipv6, env.w3.ipv6)
    fake_l4 = "bytes(TCP(sport=41003, dport=80, flags='S'))"
    code = (("pkts = [IP(src='{s}', dst='{d}', id=0x4444, proto=6, frag=3) / Raw(" + fake_l4 + ")]")
            if family == 4 else
            ("pkts = [IPv6(src='{s}', dst='{d}') / IPv6ExtHdrFragment(id=0x4444, offset=3, m=0, nh=6) / Raw(" + fake_l4 + ")]"))
    with Sniffer(env.lab, dst, ctl) as sn:
        scapy_send(env.lab, env.w1, code.format(s=s1, d=dst))
        scapy_send(env.lab, env.w3, code.format(s=s3, d=ctl))
    assert sn.to(dst) == [] and sn.to(ctl) == []
    sync_events(env, 21500 + family)
    assert events(env, dst) == []


def test_overlap_cannot_turn_an_allowed_port_into_dot(env):
    """To an allowed IP (pypi.org's), a SYN to port 80 in fragments plus an overlapping 8-byte
    fragment that says port 853, in both orders. The kernel filters the datagram it reassembled
    and forwards that very datagram, so the filter and the wire never disagree: port 853 never
    leaves the node."""
    assert env.lab.dig(env.w1, "pypi.org").status == "NOERROR"
    dst = "198.51.100.10"
    code = textwrap.dedent(f"""
        def syn(dport):
            return bytes(IP(src='{env.w1.ipv4}', dst='{dst}') / TCP(sport={{sport}}, dport=dport, flags='S', seq=1,
                         options=[('NOP', None)] * 4) / Raw(b'P' * 16))[20:]
        good, evil = syn(80), syn(853)
        base = dict(src='{env.w1.ipv4}', dst='{dst}', proto=6)
        head = lambda i, b: IP(flags='MF', frag=0, id=i, **base) / Raw(b)
        tail = lambda i, b: IP(frag=3, id=i, **base) / Raw(b[24:])
        pkts = [head(0x4545, good[:24]), head(0x4545, evil[:8]), tail(0x4545, good),   # 80 first: evil is a duplicate
                head(0x4646, evil[:8]), head(0x4646, good[:24]), tail(0x4646, good)]   # 853 first: partial overlap
    """)
    with Sniffer(env.lab, dst) as sn:
        scapy_send(env.lab, env.w1, code.replace("{sport}", "41004"))
    mine = sn.to(dst, env.w1.ipv4)
    assert not [f for f in mine if f["dport"] == 853], mine
    # One SYN arrives, on port 80: the duplicate was ignored (first wins), the overlap discarded
    # the second datagram. (The other frame to port 80 is w1's kernel resetting the SYN-ACK.)
    syns = [f for f in mine if f["tcp_flags"] is not None and f["tcp_flags"] & 0x02]
    assert [(f["dport"], f["more"]) for f in syns] == [(80, True)], mine


# --------------------------------------------------------------------------- spoofed sources

@pytest.mark.parametrize("family", [4, 6])
def test_spoofed_workload_source_is_dropped_and_counted(env, family):
    """w1 sends with w3's (FULL_ACCESS) source address. Without the anti-spoof chain the forward
    chain would dispatch it by source to w3's verdict (accept). It is dropped at prerouting
    priority raw (before conntrack: no entry is created) and counted in antispoof_drops, exposed as
    egressd_antispoof_drops_total. No event: the sender cannot be attributed reliably."""
    dst = "192.0.2.191" if family == 4 else "2001:db8:ff::191"
    ipl = "IP" if family == 4 else "IPv6"
    w3src = env.w3.ipv4 if family == 4 else env.w3.ipv6
    code = textwrap.dedent(f"""
        ip = {ipl}(src='{w3src}', dst='{dst}')
        pkts = [ip / UDP(sport=42000, dport=7) / Raw(b'spoof') for _ in range(3)]
        pkts += [ip / TCP(sport=42001, dport=80, flags='S')]
        pkts += [{ipl}(src='{w3src}', dst='{dst}') / UDP(sport=42002, dport=53) / DNS(rd=1, qd=DNSQR(qname='evil.example'))]
    """)
    before = metric(env, "egressd_antispoof_drops_total")
    with Sniffer(env.lab, dst) as sn:
        n = scapy_send(env.lab, env.w1, code)
    after = metric(env, "egressd_antispoof_drops_total")
    assert sn.to(dst) == [], sn.to(dst)
    assert after - before == n == 5
    ct = env.lab.run(env.lab.node_ns, ["conntrack", "-L", "-f", f"ipv{family}", "-s", w3src, "-d", dst])
    assert "src=" not in ct.stdout, ct.stdout
    sync_events(env, 21600 + family)
    assert events(env, dst) == []
    # The owner of the address itself is not affected.
    with Sniffer(env.lab, dst) as sn:
        scapy_send(env.lab, env.w3, code)
    got = sn.to(dst, v6(w3src))  # (w3's kernel also answers the echoes and the SYN-ACK: not counted)
    assert len([f for f in got if f["proto"] == 17 and f["dport"] == 7]) == 3
    assert len([f for f in got if f["tcp_flags"] == 0x02 and f["dport"] == 80]) == 1
    assert not [f for f in got if f["dport"] == 53], "DNS from a workload always goes to the shim"
    assert metric(env, "egressd_antispoof_drops_total") == after


def test_spoofed_source_cannot_ride_another_workloads_established_flow(env):
    """w3 holds an established TCP connection; w1 injects a segment with w3's addresses and
    ports. Conntrack would call it established and the forward chain would accept it: the
    anti-spoof chain drops it first."""
    dst = "192.0.2.192"
    holder = textwrap.dedent(f"""
        import socket, sys
        s = socket.create_connection(("{dst}", 80), timeout=3)
        print(s.getsockname()[1], flush=True)
        sys.stdin.readline()
        s.close()
    """)
    p = env.lab.popen(env.w3.netns, [sys.executable, "-c", holder], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)
    try:
        sport = int(p.stdout.readline())
        before = metric(env, "egressd_antispoof_drops_total")
        with Sniffer(env.lab, dst) as sn:
            scapy_send(env.lab, env.w1, f"pkts = [IP(src='{env.w3.ipv4}', dst='{dst}') / TCP(sport={sport}, dport=80, "
                                        f"flags='PA', seq=1, ack=1) / Raw(b'INJECTED')]")
        assert sn.to(dst) == []
        assert metric(env, "egressd_antispoof_drops_total") - before == 1
    finally:
        p.communicate("\n", timeout=10)


@pytest.mark.parametrize("family", [4, 6])
def test_spoofed_unregistered_source_is_left_to_the_runtime(env, family):
    """A source that is no workload's (10.77.200.9 from w1) is not egressd's: it is not in
    workload_src_*, so it is neither filtered nor counted, and it leaves the node. Preventing
    that is the container runtime's job (rp_filter or an anti-spoof rule per workload interface);
    for IPv4, strict rp_filter on w1's node-side interface does it, shown here."""
    dst = "192.0.2.193" if family == 4 else "2001:db8:ff::193"
    fake = "10.77.200.9" if family == 4 else "2001:db8:77:200::9"
    code = f"pkts = [{'IP' if family == 4 else 'IPv6'}(src='{fake}', dst='{dst}') / UDP(sport=42100, dport=9) / Raw(b'x')]"
    before = metric(env, "egressd_antispoof_drops_total")
    with Sniffer(env.lab, dst) as sn:
        scapy_send(env.lab, env.w1, code)
    assert len(sn.to(dst, fake)) == 1, "not a registered source: egressd leaves it alone"
    assert metric(env, "egressd_antispoof_drops_total") == before
    if family == 6:
        return  # IPv6 has no rp_filter sysctl; the runtime needs a per-interface fib rule
    key = f"net.ipv4.conf.{env.w1.node_ifname}.rp_filter"
    env.lab.run(env.lab.node_ns, ["sysctl", "-q", "-w", f"{key}=1"], check=True)
    try:
        with Sniffer(env.lab, dst) as sn:
            scapy_send(env.lab, env.w1, code)
        assert sn.to(dst) == [], "the runtime's guard (strict rp_filter) stops it"
    finally:
        env.lab.run(env.lab.node_ns, ["sysctl", "-q", "-w", f"{key}=0"], check=True)


# --------------------------------------------------------------------------- expiry

HOLD = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    print("connected", flush=True)
    sys.stdin.readline()
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: pypi.org\\r\\n\\r\\n")
    print(s.recv(200).split(b"\\r\\n")[0].decode(), flush=True)
    """
)


def test_established_flow_outlives_its_expired_entry_and_new_flows_are_denied():
    """Real expiry: dnsmasq answers with TTL 2, min_ttl is 1, so pypi.org's IP leaves the set 3-4 s
    after the answer (TTL + 1 s margin, then the next expiry round, which runs every second and
    deletes it: the kernel's own timeout would take it out GRACE = 5 s later). A connection opened
    before stays usable; a new one to the same IP is rejected and logged; resolving again reopens it."""
    with mock.patch.object(lab_dnsmasq, "LOCAL_TTL", 2):  # the Lab has no TTL option: its dnsmasq reads this at start
        lab = Lab(workloads=1, records=world.records(race=0), cnames=world.CNAMES).start()
    try:
        collector = CollectorProc(lab)
        collector.start()
        config = world.write_config(lab, collector_url=collector.url)
        config.write_text(re.sub(r"(?m)^min_ttl = \d+$", "min_ttl = 1", config.read_text()))
        daemon = DaemonProc(lab, config)
        daemon.start()
        try:
            _expiry_scenario(lab, collector)
            # The daemon's own delete took it out: counted, and none refused.
            status, text = call(str(config.parent / "api.sock"), "GET", "/metrics")
            assert status == 200, text
            m = dict(line.rpartition(" ")[::2] for line in str(text).splitlines() if line and not line.startswith("#"))
            assert float(m["egressd_expired_deleted_total"]) >= 1, m.get("egressd_expired_deleted_total")
            assert float(m["egressd_expired_delete_errors_total"]) == 0
        finally:
            daemon.stop()
            collector.stop()
    finally:
        lab.close()


def _expiry_scenario(lab: Lab, collector: CollectorProc) -> None:
    w1, ip = lab.workloads[0], "198.51.100.10"
    r = lab.dig(w1, "pypi.org")
    assert r.status == "NOERROR" and r.ttls == [2], r.output
    t_answer = time.monotonic()

    def in_set() -> bool:
        out = lab.run(lab.node_ns, ["nft", "list", "set", "inet", "egressd", "ws_1001_dyn4"], check=True).stdout
        return re.search(rf"\b{re.escape(ip)}\b", out) is not None

    assert in_set()
    p = lab.popen(w1.netns, [sys.executable, "-c", HOLD, ip], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "connected"
        deadline = time.monotonic() + 10
        while in_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        expired_after = time.monotonic() - t_answer
        assert not in_set(), "the entry did not expire"
        # Under 5 s: the daemon's delete, not the kernel's timeout (8 s).
        assert 2.0 <= expired_after <= 5.0, f"expired {expired_after:.2f}s after the answer"
        print(f"entry expired {expired_after:.2f}s after the answer")
        out, err = p.communicate("go\n", timeout=10)
        assert out.splitlines()[-1] == "HTTP/1.1 200 OK", out + err  # established: still passes
    finally:
        if p.poll() is None:
            p.kill()
    code, _out, elapsed = lab.curl(w1, f"http://{ip}/", timeout=3)
    assert code is None and elapsed < 1.0  # a new flow to the expired IP: rejected at once
    rows, _ = collector.wait_rows(
        f"select * from system.access.outbound_network where destination = '{ip}' and ip_event.destination_port = 80",
        lambda rows: len(rows) >= 1, timeout=5)
    assert rows and rows[0]["access_type"] == "DROP" and rows[0]["ip_event"]["protocol"] == "tcp"
    assert lab.dig(w1, "pypi.org").status == "NOERROR"
    assert lab.curl(w1, f"http://{ip}/")[0] == 200  # answered again: open again
