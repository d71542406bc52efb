"""The floor of any Python shim: a bare uvloop UDP server that answers every query from a dict.

    python bench/floor_server.py HOST PORT

No policy, no rate limit, no set refresh, no statistics: the first query for a name makes up one
A record (10.255.0.1, TTL 300) and stores the answer; every later one is a dict lookup and a
``sendto``. Benchmark a runs it beside egressd's shim and dnsmasq in the hot-set mix, on the same
interpreter and event loop as the daemon, so the results show how much of the shim's cache-hit
cost is its own work and how much any design on this runtime pays. Bench-only: it answers
anything it is sent and must never listen outside a lab namespace.
"""

from __future__ import annotations

import asyncio
import sys

_ANSWER = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x0a\xff\x00\x01"  # name ptr, A, IN, 300 s


def _question_end(wire: bytes) -> int:
    """Offset just past the single question (name, type, class), or 0 if malformed."""
    i = 12
    while i < len(wire):
        n = wire[i]
        if n == 0:
            end = i + 5
            return end if end <= len(wire) else 0
        if n & 0xC0:
            return 0
        i += n + 1
    return 0


class FloorServer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: dict[bytes, bytes] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        out = self.answers.get(data[2:])
        if out is None:
            end = _question_end(data)
            if not end or data[4:6] != b"\x00\x01":
                return
            # QR, RD, RA, NOERROR; one question, one answer; no EDNS in the answer.
            out = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + data[12:end] + _ANSWER
            if len(self.answers) < 100_000:
                self.answers[data[2:]] = out
        self.transport.sendto(data[:2] + out, addr)  # type: ignore[union-attr]


async def _main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(FloorServer, local_addr=(host, port))
    print("listening", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(host, port))
    else:
        uvloop.run(_main(host, port))


if __name__ == "__main__":
    main()
