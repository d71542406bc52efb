"""Runs egress-collector in the lab's node namespace (where the daemon ships to 127.0.0.1:9180)
and queries it from the test process through sockets opened in that namespace."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..netns import entered


class _NsHTTP(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        with entered(self.netns):
            self.sock = socket.create_connection((self.host, self.port), self.timeout)


class CollectorProc:
    def __init__(self, lab, *, port: int = 9180, name: str = "collector") -> None:
        self.lab = lab
        self.port = port
        self.db = Path(lab.tmpdir) / f"{name}.duckdb"
        self.log_path = Path(lab.tmpdir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = self.lab.popen(
            self.lab.node_ns,
            [sys.executable, "-m", "egressd.collector.cli", "--listen", f"127.0.0.1:{self.port}", "--db", str(self.db)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"egress-collector exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"egress-collector not healthy after {timeout}s:\n{self.log()}")

    def request(self, method: str, path: str, body=None, timeout: float = 10) -> tuple[int, object]:
        c = _NsHTTP(self.lab.node_ns, "127.0.0.1", self.port, timeout)
        try:
            data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
            c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw or b"null")
            except json.JSONDecodeError:
                return r.status, raw.decode(errors="replace")
        finally:
            c.close()

    def sql(self, query: str) -> list[dict]:
        status, body = self.request("POST", "/v1/sql", {"query": query})
        if status != 200:
            raise RuntimeError(f"SQL refused ({status}): {body}")
        return [dict(zip(body["columns"], row)) for row in body["rows"]]

    def wait_rows(self, query: str, predicate, timeout: float = 10.0, interval: float = 0.05) -> tuple[list[dict], float]:
        """Poll a query until predicate(rows) holds; return (rows, seconds waited)."""
        t0 = time.monotonic()
        rows: list[dict] = []
        while time.monotonic() - t0 < timeout:
            rows = self.sql(query)
            if predicate(rows):
                return rows, time.monotonic() - t0
            time.sleep(interval)
        return rows, time.monotonic() - t0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)
