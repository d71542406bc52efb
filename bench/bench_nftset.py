"""Set-element adds: the raw nfnetlink writer (egressd.nftset) against libnftables ``add element``.

    sudo .venv/bin/python bench/bench_nftset.py [--rounds 15] [--reps 200]

In a throw-away network namespace (removed at the end), with a timeout set like a workspace's.
Each round times both sides, alternating which goes first, on the same work: ``--reps`` adds of 1
element, then ``--reps`` batches of 64 elements (distinct documentation-range IPs, each with a
timeout and a comment, as add/delete/add like Engine.program). Prints the median over rounds of µs
per 1-element add and µs per element in a 64-element batch, and the ratio."""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from egressd.core.nfmsg import Element  # noqa: E402
from egressd.libnft import Nft  # noqa: E402
from egressd.netns import entered  # noqa: E402
from egressd.nftset import NftSetWriter  # noqa: E402

SET = "ws_bench_dyn4"
SETUP = ("add table inet egressd\n"
         f"add set inet egressd {SET} {{ type ipv4_addr; flags timeout; }}\n")


def ips(base: int, n: int) -> list[str]:
    # 198.18.0.0/15 (benchmarking range): room for all distinct IPs of a run.
    return [str(ipaddress.IPv4Address(0xC6120000 + (base + i) % 131072)) for i in range(n)]


def text(batch: list[str]) -> str:
    lines = []
    for ip in batch:
        el = f'{ip} timeout 300s comment "bench.example"'
        lines += [f"add element inet egressd {SET} {{ {el} }}",
                  f"delete element inet egressd {SET} {{ {ip} }}",
                  f"add element inet egressd {SET} {{ {el} }}"]
    return "\n".join(lines)


def run_side(side: str, nft: Nft, w: NftSetWriter, batches: list[list[str]]) -> float:
    """Seconds for all batches on one side."""
    if side == "nftset":
        work = [{SET: [Element(ip, 300, "bench.example") for ip in b]} for b in batches]
        t0 = time.perf_counter()
        for sets in work:
            w.add(sets)
        return time.perf_counter() - t0
    work_t = [text(b) for b in batches]
    t0 = time.perf_counter()
    for t in work_t:
        nft.run(t)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    ns = f"egbn{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    res: dict[str, dict[str, list[float]]] = {s: {"single": [], "batch64": []} for s in ("nftset", "libnftables")}
    try:
        with entered(ns):
            nft = Nft()
            w = NftSetWriter()
        nft.run(SETUP)
        base = 0
        for r in range(a.rounds):
            order = ("nftset", "libnftables") if r % 2 == 0 else ("libnftables", "nftset")
            for kind, size in (("single", 1), ("batch64", 64)):
                for side in order:
                    batches = []
                    for _ in range(a.reps):
                        batches.append(ips(base, size))
                        base += size
                    secs = run_side(side, nft, w, batches)
                    res[side][kind].append(secs * 1e6 / (a.reps * size))
            nft.run(f"flush set inet egressd {SET}")
        w.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in res.items()}
    print(f"rounds={a.rounds} reps={a.reps} (median of rounds, sides alternating)")
    for kind, label in (("single", "µs per 1-element add"), ("batch64", "µs per element, 64-element batches")):
        n, l = med["nftset"][kind], med["libnftables"][kind]
        print(f"{label:38s} nftset {n:8.2f}   libnftables {l:8.2f}   = {l / n:5.1f}x faster")
    if a.json:
        Path(a.json).write_text(json.dumps({"median": med, "rounds": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
