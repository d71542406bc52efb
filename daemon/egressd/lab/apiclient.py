"""A tiny synchronous client for the daemon API on its unix socket (tests, demo, benchmarks)."""

from __future__ import annotations

import http.client
import json
import socket


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(sock: str, method: str, path: str, body=None, timeout: float = 10) -> tuple[int, object]:
    """(status, parsed JSON — or text for /metrics)."""
    c = UnixHTTP(str(sock), timeout)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return r.status, raw.decode(errors="replace")
    finally:
        c.close()
