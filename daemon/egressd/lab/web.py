"""Tiny "internet" web/echo server for the egressd lab (stdlib asyncio only).

Run inside the lab's ``inet`` namespace::

    python -m egressd.lab.web --port 80 --port 853 --udp-echo 7

It listens on ``0.0.0.0`` and ``[::]`` (IPV6_V6ONLY) so that, together with the
AnyIP ``local`` routes of the inet namespace, it answers on *every* lab address:

* TCP ports (``--port``): a minimal HTTP/1.1 server.  Every request gets
  ``200 OK`` with body ``ok host=<Host header> addr=<local address>\\n`` and
  ``Connection: close``.  A client that connects and sends nothing (or garbage)
  is simply closed after a short timeout, so the port also works as a plain
  "does TCP connect" target.
* UDP ports (``--udp-echo``): echo every datagram back.  The reply is sent
  *from the address the datagram was sent to* (IP_PKTINFO / IPV6_PKTINFO),
  which a wildcard socket would otherwise not do for AnyIP addresses.

When every socket is bound it prints ``READY`` on stdout (and touches
``--ready-file`` if given).  SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import struct
import sys
from pathlib import Path

# Linux constants that the socket module does not always export.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)

MAX_HEADER_BYTES = 64 * 1024
READ_TIMEOUT = 10.0
UDP_BUFSIZE = 65535


def _format_addr(addr: str) -> str:
    # Strip a zone id ("fe80::1%eth0") and v4-mapped prefixes for readability.
    addr = addr.split("%", 1)[0]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(addr)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)
    return addr


def http_body(host: str, local_addr: str) -> bytes:
    return f"ok host={host} addr={_format_addr(local_addr)}\n".encode()


async def _handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        local = writer.get_extra_info("sockname")
        local_addr = local[0] if local else "?"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        method = parts[0].upper()
        host = ""
        length = 0
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == "host":
                host = value.strip()
            elif name == "content-length":
                with contextlib.suppress(ValueError):
                    length = max(0, min(int(value.strip()), MAX_HEADER_BYTES))
        if length:
            # Drain a small request body so the client does not see a reset.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
        body = http_body(host, local_addr)
        hdr = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
            "\r\n"
        ).encode()
        writer.write(hdr if method == "HEAD" else hdr + body)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
    except Exception as exc:  # pragma: no cover - never let one client kill the server
        print(f"web: client error: {exc!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)


def _tcp_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _udp_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    # Allows replying *from* an AnyIP address that is not on any interface (IPv6 checks this).
    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _udp_echo_once(sock: socket.socket) -> None:
    for _ in range(64):  # bounded drain per wake-up
        try:
            data, ancdata, _flags, peer = sock.recvmsg(UDP_BUFSIZE, socket.CMSG_SPACE(64))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            print(f"web: udp recv error: {exc!r}", file=sys.stderr, flush=True)
            return
        cmsgs = []
        for level, ctype, cdata in ancdata:
            if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= 12:
                _ifindex, _spec_dst, dst = struct.unpack("=i4s4s", cdata[:12])
                cmsgs = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst, b"\0" * 4))]
            elif level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO and len(cdata) >= 20:
                dst6, _ifindex = struct.unpack("=16si", cdata[:20])
                cmsgs = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", dst6, 0))]
        try:
            sock.sendmsg([data], cmsgs, 0, peer)
        except OSError as exc:
            print(f"web: udp send error to {peer}: {exc!r}", file=sys.stderr, flush=True)


async def serve(tcp_ports: list[int], udp_ports: list[int], host4: str, host6: str,
                ready_file: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    servers: list[asyncio.base_events.Server] = []
    udp_socks: list[socket.socket] = []
    try:
        for port in tcp_ports:
            for family, host in ((socket.AF_INET, host4), (socket.AF_INET6, host6)):
                if not host:
                    continue
                sock = _tcp_socket(family, host, port)
                servers.append(await asyncio.start_server(_handle_http, sock=sock,
                                                          limit=MAX_HEADER_BYTES))
        for port in udp_ports:
            for family, host in ((socket.AF_INET, host4), (socket.AF_INET6, host6)):
                if not host:
                    continue
                sock = _udp_socket(family, host, port)
                udp_socks.append(sock)
                loop.add_reader(sock.fileno(), _udp_echo_once, sock)
        if ready_file:
            Path(ready_file).write_text("READY\n")
        print("READY", flush=True)
        await stop.wait()
    finally:
        for sock in udp_socks:
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()
        for srv in servers:
            srv.close()
        for srv in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m egressd.lab.web", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, action="append", default=[], help="TCP (HTTP) port; repeatable")
    ap.add_argument("--udp-echo", type=int, action="append", default=[], help="UDP echo port; repeatable")
    ap.add_argument("--host4", default="0.0.0.0", help="IPv4 bind address ('' to disable)")
    ap.add_argument("--host6", default="::", help="IPv6 bind address ('' to disable)")
    ap.add_argument("--ready-file", default=None)
    args = ap.parse_args(argv)
    if not args.port and not args.udp_echo:
        args.port = [80]
    try:
        asyncio.run(serve(args.port, args.udp_echo, args.host4, args.host6, args.ready_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
