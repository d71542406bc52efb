"""sd_notify: datagrams reach $NOTIFY_SOCKET, and a manager that never drains it cannot stall us."""

from __future__ import annotations

import socket
import time

from egressd.sdnotify import Notifier


def test_notify_sends_fields_and_parses_the_watchdog(tmp_path):
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval == 2.0
        n.notify(ready=1, status="serving")
        assert srv.recv(100) == b"READY=1\nSTATUS=serving"
    finally:
        srv.close()


def test_an_undrained_notify_socket_never_blocks(tmp_path):
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    try:
        n = Notifier({"NOTIFY_SOCKET": path})
        t0 = time.monotonic()
        for _ in range(2000):  # far beyond a unix datagram queue (net.unix.max_dgram_qlen)
            n.notify(watchdog=1)
        assert time.monotonic() - t0 < 2.0
        assert n.dropped > 0 and n.sent > 0 and n.sent + n.dropped == 2000
    finally:
        srv.close()


def test_outside_systemd_it_does_nothing():
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.notify(ready=1)
    assert n.sent == 0 and n.dropped == 0
