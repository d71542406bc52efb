"""NflogReader against the real kernel: the traffic of tests/data/nflog/capture.py is sent in a
scratch namespace whose nft table logs it to group 7, and must come back decoded. Also: one
binder per group and namespace, overruns counted as lost, a failing callback is contained."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from pathlib import Path

import pytest

from egressd.core.nflog import LoggedPacket
from egressd.nflogsock import NflogGroupBusy, NflogReader

_PATH = Path(__file__).resolve().parent.parent / "data" / "nflog" / "capture.py"
_spec = importlib.util.spec_from_file_location("nflog_capture", _PATH)
capture = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nflog_capture", capture)  # dataclasses look the module up
_spec.loader.exec_module(capture)

GROUP = capture.GROUP
SO_TIMESTAMP = 29  # asm-generic/socket.h (x86, arm); the socket module does not name it


@pytest.fixture(scope="module")
def ns():
    with capture.Netns("egnfl") as n:
        yield n


@pytest.fixture
def reader_in(ns):
    opened: list[NflogReader] = []

    def make(netns: str = ns.path, **kw) -> NflogReader:
        r = NflogReader(GROUP, netns=netns, **kw)
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.close()


async def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


def as_dict(p: LoggedPacket) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


@pytest.fixture(scope="module")
def stamped():
    """A socket that asks for receive timestamps. While one is open anywhere on the machine, the
    kernel stamps every packet it receives (the global netstamp_needed switch), and the input
    hook's NFULA_TIMESTAMP carries that stamp. Without one, packets carry none: on this project's
    VM some process always has one open, on Debian 12's kernel in scripts/kernel-vm.sh none does."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
    time.sleep(0.1)  # the switch may be flipped from a work queue
    yield s
    s.close()


@pytest.mark.parametrize("case", capture.CASES, ids=[c.name for c in capture.CASES])
async def test_reader_decodes_real_traffic(ns, reader_in, stamped, case):
    reader = reader_in()
    got: list[LoggedPacket] = []
    await reader.start(None, got.extend)
    await asyncio.to_thread(ns.python, case.send)
    assert await wait_for(lambda: len(got) >= len(case.expect)), f"only {got}"
    await asyncio.sleep(0.2)  # nothing more should come
    assert capture.matches(case.expect, [as_dict(p) for p in got], time.time()), got
    assert reader.stats() == {"received": len(case.expect), "garbled": 0, "lost": 0, "errors": 0,
                              "callback_errors": 0}


async def test_one_binder_per_group_and_namespace(ns, reader_in):
    first = reader_in()
    with pytest.raises(NflogGroupBusy, match=rf"NFLOG group {GROUP}\b"):
        reader_in()
    # Another namespace has its own group 7; its socket sees only its own traffic.
    with capture.Netns("egnfl") as other:
        second = reader_in(other.path)
        a: list[LoggedPacket] = []
        b: list[LoggedPacket] = []
        await first.start(None, a.extend)
        await second.start(None, b.extend)
        await asyncio.to_thread(other.python, "udp(socket.AF_INET, ('10.99.0.1', 41000), ('192.0.2.99', 9))")
        assert await wait_for(lambda: len(b) == 1)
        await asyncio.sleep(0.2)
        assert a == [] and b[0].dst == "192.0.2.99" and b[0].sport == 41000
        second.close()
    # Closing releases the group.
    first.close()
    again = reader_in()
    c: list[LoggedPacket] = []
    await again.start(None, c.extend)
    await asyncio.to_thread(ns.python, "udp(socket.AF_INET, ('10.99.0.1', 41001), ('192.0.2.98', 9))")
    assert await wait_for(lambda: len(c) == 1)


async def test_packets_during_setup_are_kept_and_overruns_counted_as_lost(ns, reader_in):
    # A tiny receive buffer, one datagram per packet, and nobody reading while a burst arrives.
    reader = reader_in(rcvbuf=1024, qthresh=1)
    sent = 300
    await asyncio.to_thread(
        ns.python,
        f"for p in range(42000, 42000 + {sent}):\n    udp(socket.AF_INET, ('10.99.0.1', p), ('198.51.100.50', 9))\n",
    )
    got: list[LoggedPacket] = []
    await reader.start(None, got.extend)
    assert await wait_for(lambda: reader.lost >= 1 and len(got) > 0)
    await asyncio.sleep(0.2)
    assert 0 < len(got) < sent
    assert reader.received == len(got) and reader.garbled == 0
    assert all(p.dst == "198.51.100.50" and p.dport == 9 for p in got)


async def test_a_failing_callback_does_not_stop_the_reader(ns, reader_in):
    reader = reader_in()
    seen: list[LoggedPacket] = []

    def on_packets(packets: list[LoggedPacket]) -> None:
        seen.extend(packets)
        if len(seen) == 1:
            raise RuntimeError("boom")

    await reader.start(None, on_packets)
    for port in (43000, 43001):
        await asyncio.to_thread(ns.python, f"udp(socket.AF_INET, ('10.99.0.1', {port}), ('192.0.2.77', 9))")
        await asyncio.sleep(0.1)
    assert await wait_for(lambda: len(seen) == 2)
    assert reader.callback_errors == 1 and reader.received == 2
    reader.close()
    reader.close()  # idempotent
    await asyncio.to_thread(ns.python, "udp(socket.AF_INET, ('10.99.0.1', 43002), ('192.0.2.77', 9))")
    await asyncio.sleep(0.2)
    assert len(seen) == 2
