"""The kernel's memory for tests and benchmarks (root): what nftables set elements hold, and the
socket buffer maxima of a stock node."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_MAXIMA = (Path("/proc/sys/net/core/wmem_max"), Path("/proc/sys/net/core/rmem_max"))
#: Debian's (and the kernel's) default net.core.wmem_max and rmem_max.
STOCK_MAX = 212_992


@contextmanager
def stock_socket_maxima() -> Iterator[None]:
    """net.core.wmem_max and rmem_max at their defaults while the block runs (sockets opened in it
    keep what they got), then as they were: this project's VM raises both to 4 MiB, which hid
    buffers capped at the default on a stock node."""
    saved = [p.read_text() for p in _MAXIMA]
    try:
        for p in _MAXIMA:
            p.write_text(f"{STOCK_MAX}\n")
        yield
    finally:
        for p, v in zip(_MAXIMA, saved, strict=True):
            p.write_text(v)


def element_kb() -> int:
    """kB in the objects in use of the kernel's memory-accounted kmalloc caches (kmalloc-cg-*),
    where set elements live (GFP_KERNEL_ACCOUNT). Objects, not slabs: a slab half freed earlier
    and filled again does not hide new elements, as it does in /proc/meminfo's Slab. Machine-wide:
    other kernel users add noise of some tens of kB."""
    total = 0
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith("kmalloc-cg-"):
                fields = line.split()
                total += int(fields[1]) * int(fields[3])
    return total // 1024
