"""structlog set-up.

- Under systemd with the journal (``$JOURNAL_STREAM`` set): each record goes to journald over its
  native protocol, so its fields are searchable (``journalctl GENERATION=7``, ``POLICY_ID=…``).
- On a terminal: human console output.
- Otherwise: JSON lines on stderr.
The level comes from ``[log] level``, or ``$EGRESSD_LOG_LEVEL``."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELD_BAD = re.compile(r"[^A-Z0-9_]")


def journal_fields(event_dict: dict[str, Any], identifier: str = "egressd") -> bytes:
    """One journald native-protocol datagram for a structlog event dict."""
    ev = dict(event_dict)
    event = str(ev.pop("event", ""))
    level = str(ev.pop("level", "info"))
    ev.pop("timestamp", None)
    text = " ".join([event] + [f"{k}={v}" for k, v in ev.items()])
    fields: list[tuple[str, str]] = [
        ("MESSAGE", text), ("PRIORITY", str(_PRIORITY.get(level, 6))),
        ("SYSLOG_IDENTIFIER", identifier), ("EVENT", event),
    ]
    for k, v in ev.items():
        name = _FIELD_BAD.sub("_", k.upper()).lstrip("_")[:64] or "FIELD"
        if name in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT"):
            name = "EGRESSD_" + name
        fields.append((name, v if isinstance(v, str) else json.dumps(v, default=str)))
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """A structlog logger that sends pre-rendered datagrams to journald (dropped if it is gone)."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._path = path

    def msg(self, message: bytes) -> None:
        try:
            self._sock.sendto(message, self._path)
        except OSError:
            sys.stderr.write(message.decode("utf-8", "replace").split("\n", 1)[0] + "\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _journal_renderer(_logger, _name, event_dict):
    return journal_fields(event_dict)


def setup(level: str = "info", *, json: bool | None = None) -> None:
    level = os.environ.get("EGRESSD_LOG_LEVEL", level).lower()
    journal = os.environ.get("EGRESSD_JOURNAL_SOCKET") or (JOURNAL_SOCKET if os.environ.get("JOURNAL_STREAM") else "")
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if journal and os.path.exists(journal):
        processors += [structlog.processors.format_exc_info, _journal_renderer]
        factory: Any = lambda *_a: JournalLogger(journal)  # noqa: E731
    else:
        if json is None:
            json = not sys.stderr.isatty()
        if json:
            processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        else:
            processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
