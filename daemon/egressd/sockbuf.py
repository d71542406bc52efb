"""Socket buffer sizes past net.core.wmem_max and rmem_max.

A plain SO_SNDBUF or SO_RCVBUF is capped by those sysctls (Debian's default 212,992 gives a buffer
of 425,984 bytes, whatever was asked). The daemon holds CAP_NET_ADMIN, which SO_SNDBUFFORCE and
SO_RCVBUFFORCE need, so it asks with those first and falls back to the plain options without it.
"""

from __future__ import annotations

import socket

# Not exported by Python's socket module; these are Linux's values (asm-generic).
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def set_buffer(sock: socket.socket, size: int, *, send: bool = False) -> None:
    """Ask for a receive (or, with ``send``, a send) buffer of ``size`` bytes: forced when the
    process may (CAP_NET_ADMIN), else capped by the sysctl maximum. Raises OSError only when the
    plain option fails too."""
    force, plain = (SO_SNDBUFFORCE, socket.SO_SNDBUF) if send else (SO_RCVBUFFORCE, socket.SO_RCVBUF)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)
