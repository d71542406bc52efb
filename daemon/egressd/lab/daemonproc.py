"""Runs `egressd run` inside the lab's node namespace and waits for its READY=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class DaemonStartError(RuntimeError):
    pass


class DaemonProc:
    def __init__(self, lab, config: Path, *, name: str = "egressd", python: str | None = None) -> None:
        self.lab = lab
        #: The interpreter to run egressd with (default: this one). The benchmarks pass a venv
        #: holding egressd's runtime dependencies only, as scripts/install.sh installs it.
        self.python = python or sys.executable
        self.config = Path(config)
        self.log_path = Path(lab.tmpdir) / f"{name}.log"
        self.notify_path = Path(lab.tmpdir) / f"{name}.notify"
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self.messages: list[str] = []

    def start(self, timeout: float = 15.0, extra_env: dict[str, str] | None = None) -> float:
        """Start the daemon; return seconds until READY=1. Raises DaemonStartError with its log."""
        self.notify_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.notify_path))
        self._sock.settimeout(0.1)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1", **(extra_env or {}))
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = self.lab.popen(
            self.lab.node_ns,
            [self.python, "-m", "egressd.cli", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.wait_message("READY=1", 0.1):
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise DaemonStartError(f"egressd exited with {self.proc.returncode}:\n{self.log()}")
        self.kill()
        raise DaemonStartError(f"egressd not ready after {timeout}s:\n{self.log()}")

    def wait_message(self, needle: str, timeout: float) -> bool:
        """Wait for a notify datagram containing needle (READY=1, WATCHDOG=1, RELOADING=1 …)."""
        end = time.monotonic() + timeout
        while True:
            if any(needle in m for m in self.messages):
                self.messages = [m for m in self.messages if needle not in m]
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._sock.settimeout(min(left, 0.1))
            try:
                self.messages.append(self._sock.recv(4096).decode(errors="replace"))
            except (TimeoutError, socket.timeout):
                pass

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close()

    def _close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None
        self.notify_path.unlink(missing_ok=True)
