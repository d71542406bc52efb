"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET. A no-op outside systemd."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + path[1:]) if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self.sent = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, **fields: str | int) -> None:
        if not self._addr:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        # Non-blocking: a manager that does not drain its socket (a full receive queue) must never
        # stall the event loop; a lost STATUS or WATCHDOG datagram is the manager's problem, and a
        # stalled loop would be ours (no DNS answers).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            try:
                s.sendto(msg, self._addr)
                self.sent += 1
            except OSError:
                self.dropped += 1  # the manager went away or its queue is full: nothing to tell
