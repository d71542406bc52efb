"""The kernel's memory in nftables set elements, for tests and benchmarks (root: /proc/slabinfo)."""

from __future__ import annotations


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
