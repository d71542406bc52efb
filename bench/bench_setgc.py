"""Does the kernel free expired set elements while set changes keep coming?

    sudo .venv/bin/python bench/bench_setgc.py [--elements 100000] [--seconds 35] \
        [--intervals 10s,1s] [--rates 0,20,50,100,1000]

For each gc-interval and commit rate, in a throw-away network namespace (removed at the end): a
timeout set like a workspace's answer set gets ``--elements`` elements that expire after 4 s
(each with a 20-character comment), then the raw writer (egressd.nftset, as the daemon programs
answers) commits one element into another set ``rate`` times a second, evenly spaced, for
``--seconds``. The kernel's Slab memory (/proc/meminfo) is read every 5 s: it falls by some 13 MB
(100,000 elements) once the collector has freed the expired elements. From Linux 6.5 the
collector gives a walk up as soon as any ruleset change commits in the namespace, so changes
spaced closer than a walk of the set can keep it from ever finishing. Slab is machine-wide:
run it on a quiet machine."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from egressd.core.nfmsg import Element  # noqa: E402
from egressd.netns import entered  # noqa: E402
from egressd.nftset import NftSetWriter  # noqa: E402


def slab_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Slab:")) / 1024


def run_one(gc_interval: str, rate: float, elements: int, seconds: float) -> dict:
    ns = f"egb{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        lines = ["add table inet egressd",
                 f"add set inet egressd ws_a_dyn4 {{ type ipv4_addr; flags timeout; gc-interval {gc_interval}; }}",
                 "add set inet egressd ws_b_dyn4 { type ipv4_addr; flags timeout; }"]
        for s in range(0, elements, 5000):
            lines.append("add element inet egressd ws_a_dyn4 { " + ", ".join(
                f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255} timeout 4s comment \"n{i:06d}.example.com\""
                for i in range(s, min(s + 5000, elements))) + " }")
        before = slab_mb()
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input="\n".join(lines) + "\n",
                       text=True, check=True, timeout=120)
        filled = slab_mb() - before
        with entered(ns):
            writer = NftSetWriter()
        try:
            t0 = time.monotonic()
            due, commits, marks = t0, 0, []
            while (now := time.monotonic()) - t0 <= seconds:
                if not marks or now - t0 >= 5 * len(marks):
                    marks.append((round(now - t0), round(slab_mb() - before, 1)))
                if rate > 0:
                    writer.add({"ws_b_dyn4": [Element(f"192.0.2.{commits % 250 + 1}", 60, "c")]})
                    commits += 1
                    due += 1 / rate
                    time.sleep(max(0.0, due - time.monotonic()))
                else:
                    time.sleep(0.05)
        finally:
            writer.close()
        end = round(slab_mb() - before, 1)
        freed_at = next((t for t, mb in marks if mb < filled / 4), None)
        return {"gc_interval": gc_interval, "rate_per_s": rate, "commits": commits,
                "slab_mb_after_fill": round(filled, 1), "slab_mb_every_5s": marks, "slab_mb_end": end,
                "freed_by_s": freed_at}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=35)
    ap.add_argument("--intervals", default="10s,1s")
    ap.add_argument("--rates", default="0,20,50,100,1000")
    a = ap.parse_args()
    for rate in (float(r) for r in a.rates.split(",")):
        for gci in a.intervals.split(","):
            r = run_one(gci, rate, a.elements, a.seconds)
            freed = f"freed by {r['freed_by_s']} s" if r["freed_by_s"] is not None else f"not freed in {a.seconds:g} s"
            print(f"gc-interval {gci:>4}  {rate:6g} commits/s: {freed:18s} slab MB every 5 s "
                  f"{[mb for _, mb in r['slab_mb_every_5s']]}", flush=True)


if __name__ == "__main__":
    main()
