"""Where a cache hit's time goes: the shim and the floor, each reached through a NAT redirect
and directly, beside dnsmasq's cache, in the hot-set mix of benchmark a.

    sudo .venv/bin/python bench/bench_hotpath.py [--seconds 5] [--rounds 5] [--shim-nice -10] [--out FILE.json]

Sides (dnsperf from the workload namespace, the 1,000-name hot set, alternated every round):
- ``shim_redirect``: the product path. Queries to the bench upstream's port 53 are redirected by
  egressd's ``dns_redirect`` chain to the shim.
- ``shim_direct``: the same shim reached on its own port. The bench inserts one accept rule for
  the workload's source into ``shim_guard`` (which otherwise drops direct queries).
- ``floor_direct``, ``floor_redirect``: ``bench/floor_server.py`` reached directly, and through a
  redirect rule of the bench's own nat table (port 5356 of the bench upstream's address).
- ``dnsmasq``: dnsmasq's cache, reached directly (as in benchmark a).
- ``shim_redirect_niceN`` (with ``--shim-nice N``, not 0): the product path with the daemon at
  nice N for that side only, an experiment: every other process, dnsperf included, is at 0.

For each side: the highest rate (no ``-Q``), then a fixed rate (80% of the lower of the shim's
redirected rate and dnsmasq's, benchmark a's "equal load"), with dnsperf's mean latency, the
server process's user and system CPU per answer (``/proc/PID/stat``, over the run), and its
involuntary context switches per answer (``nonvoluntary_ctxt_switches``: preemptions). The
daemon's figures include its other threads, which are idle here. Bench-only; every address is
the lab's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dns import FLOOR_PORT, PLAIN_PORT, _dnsmasq, _floor  # noqa: E402
from benchlab import (  # noqa: E402
    BENCH_UPSTREAM,
    BenchLab,
    alternate,
    cpu_seconds,
    dnsperf,
    median,
    renice,
    rnd,
    unique_name,
    write_queries,
)

SHIM_PORT = 10053  # egressd.lab.world's listen_port
FLOOR_NAT_PORT = 5356
HOT_NAMES = 1000


def _counters(pid: int) -> tuple[float, float, int]:
    """(user, system) CPU seconds and involuntary context switches of process ``pid``, all threads."""
    invol = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        for line in (t / "status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return (*cpu_seconds(pid), invol)


def run(seconds: float = 5, rounds: int = 5, fraction: float = 0.8, shim_nice: int = 0, log=print) -> dict:
    with BenchLab() as bl:
        bl.start_daemon()
        lab, w1, gw = bl.lab, bl.w1, bl.w1.gw4
        dnsmasq = _dnsmasq(bl, PLAIN_PORT, nftset=False)
        floor = _floor(bl, FLOOR_PORT)
        bl.nft_node(
            "table ip benchnat {\n chain pre {\n  type nat hook prerouting priority dstnat - 10; policy accept;\n"
            f"  ip daddr {BENCH_UPSTREAM} udp dport {FLOOR_NAT_PORT} redirect to :{FLOOR_PORT}\n }}\n}}\n")
        bl.nft_node(f"insert rule inet egressd shim_guard ip saddr {w1.ipv4} udp dport {SHIM_PORT} accept\n")
        pids = {"shim": bl.daemon_pid, "floor": floor.pid, "dnsmasq": dnsmasq.pid}
        # side: (process, its nice, host, port)
        sides = {
            "shim_redirect": ("shim", 0, BENCH_UPSTREAM, 53),
            "shim_direct": ("shim", 0, gw, SHIM_PORT),
            "floor_redirect": ("floor", 0, BENCH_UPSTREAM, FLOOR_NAT_PORT),
            "floor_direct": ("floor", 0, gw, FLOOR_PORT),
            "dnsmasq": ("dnsmasq", 0, gw, PLAIN_PORT),
        }
        if shim_nice:
            sides[f"shim_redirect_nice{shim_nice}"] = ("shim", shim_nice, BENCH_UPSTREAM, 53)
        hot = write_queries(bl.tmpfile("hot.txt"), map(unique_name, bl.unique.take(HOT_NAMES)))
        for name, (_, _, host, port) in sides.items():  # warm every cache, and check each side answers
            res = dnsperf(lab, w1.netns, host, port, hot, 10, once=True)
            if res["completed"] < HOT_NAMES * 0.99 or res["rcodes"].get("NOERROR", 0) < HOT_NAMES * 0.99:
                raise RuntimeError(f"{name} on {host}:{port} did not answer the hot set: {res}")

        def side(name: str, qps: float | None):
            proc, nice, host, port = sides[name]

            def go(_r: int) -> dict:
                renice(pids[proc], nice)
                try:
                    u0, s0, i0 = _counters(pids[proc])
                    res = dnsperf(lab, w1.netns, host, port, hot, seconds, once=False, qps=qps)
                    u1, s1, i1 = _counters(pids[proc])
                finally:
                    renice(pids[proc], 0)
                n = max(1, int(res["completed"]))
                res["user_us_per_answer"] = (u1 - u0) / n * 1e6
                res["sys_us_per_answer"] = (s1 - s0) / n * 1e6
                res["preemptions_per_answer"] = (i1 - i0) / n
                log(f"  {name:20s} qps={res['qps_noerror']:9.0f} lat={res['latency_mean_ms']:.3f}ms"
                    f" user={res['user_us_per_answer']:.2f}us sys={res['sys_us_per_answer']:.2f}us"
                    f" preempted={res['preemptions_per_answer']:.4f}/answer" + (f" limit={int(qps)}" if qps else ""))
                return res
            return go

        def summary(runs: list[dict]) -> dict:
            keys = ("qps_noerror", "latency_mean_ms", "user_us_per_answer", "sys_us_per_answer",
                    "preemptions_per_answer", "lost", "qps_limit", "loadavg1")
            lat = [r["latency_mean_ms"] for r in runs]
            return {
                "qps_median": rnd(median(r["qps_noerror"] for r in runs)),
                "latency_mean_ms_median": rnd(median(lat), 3),
                "latency_mean_ms_range": [rnd(min(lat), 3), rnd(max(lat), 3)],
                "user_us_per_answer_median": rnd(median(r["user_us_per_answer"] for r in runs), 2),
                "sys_us_per_answer_median": rnd(median(r["sys_us_per_answer"] for r in runs), 2),
                "preemptions_per_answer_median": rnd(median(r["preemptions_per_answer"] for r in runs), 4),
                "runs": [{k: r.get(k) for k in keys} for r in runs],
            }

        out: dict = {"seconds": seconds, "rounds": rounds, "fraction": fraction}
        top = alternate({s: side(s, None) for s in sides}, rounds)
        out["max"] = {s: summary(v) for s, v in top.items()}
        rate = fraction * min(out["max"]["shim_redirect"]["qps_median"], out["max"]["dnsmasq"]["qps_median"])
        fixed = alternate({s: side(s, rate) for s in sides}, rounds)
        out["fixed"] = {"qps_limit": int(rate), **{s: summary(v) for s, v in fixed.items()}}
    return out


def markdown(out: dict) -> str:
    head = ["| side | answers/s | mean latency, ms (range) | user + system CPU per answer, µs | preemptions per answer |",
            "|---|---:|---|---|---:|"]

    def row(name: str, r: dict) -> str:
        lo, hi = r["latency_mean_ms_range"]
        return (f"| {name} | {r['qps_median']:,.0f} | {r['latency_mean_ms_median']:.3f} ({lo:.3f}–{hi:.3f}) | "
                f"{r['user_us_per_answer_median']:.2f} + {r['sys_us_per_answer_median']:.2f} | "
                f"{r['preemptions_per_answer_median']:.4f} |")

    fixed = {k: v for k, v in out["fixed"].items() if k != "qps_limit"}
    return "\n".join([
        f"Medians of {out['rounds']} runs of {out['seconds']:g} s each.", "", "Highest rate:", "", *head,
        *(row(s, r) for s, r in out["max"].items()), "",
        f"At {out['fixed']['qps_limit']:,} queries/s (equal load):", "", *head,
        *(row(s, r) for s, r in fixed.items())]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shim-nice", type=int, default=-10, help="add a side with the daemon at this nice (0: none)")
    ap.add_argument("--out", type=Path, help="write the runs here (JSON)")
    a = ap.parse_args()
    out = run(a.seconds, a.rounds, shim_nice=a.shim_nice)
    print(markdown(out))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
