"""(a) DNS throughput and latency: dnsperf from workload w1 against egressd's shim (w1 → any :53,
redirected by the ruleset) and against dnsmasq with ``--nftset=`` on the same node namespace,
same upstream, same allowed names.

    sudo .venv/bin/python bench/bench_dns.py [--seconds 10] [--rounds 3] [--json out.json]

Sides (alternated within the run, the order flipping every round):

* ``egressd``: the shim, every answer's IPs put into workspace 1001's timeout set before release.
* ``dnsmasq_nftset``: dnsmasq 2.9x forwarding to the bench upstream, ``--nftset=/bench.test/
  4#inet#benchcmp#allow4`` into a throw-away timeout set (default timeout 300 s) of the node.
* ``dnsmasq`` (reference, unique mix only): the same forwarder without ``--nftset``.
* ``floor`` (reference, hot mix only): ``floor_server.py``, a bare uvloop UDP server on the
  daemon's interpreter that answers every name from a dict (no policy, rate limit or set refresh):
  what any Python design on this runtime pays for a cache hit.

Mixes: ``unique`` (every query a never-seen name with its own IP: every answer programmed) and
``hot`` (1,000 names looped: dnsmasq answers from its cache and never refreshes the set entries;
the shim forwards each one and refreshes the set entry when the answer outlives it).
Each mix is measured at full speed (dnsperf, 100 queries outstanding) and then at equal load:
``-Q`` = ``equal_fraction`` × the lower side's median NOERROR QPS, where mean latency is compared.
The hot mix is also compared at ``LIGHTER_LOADS`` (``hot_latency_curve``), away from the steep
part of the queueing curve."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchlab import (
    BENCH_UPSTREAM,
    BenchLab,
    alternate,
    dnsperf,
    median,
    rnd,
    unique_name,
    write_queries,
)

NFT_PORT = 5353
PLAIN_PORT = 5354
FLOOR_PORT = 5355
UNIQUE_CAP_QPS = 25_000  # names written per second of a unique run (dnsperf stops at the end of the file)
HOT_NAMES = 1000
LIGHTER_LOADS = (0.1, 0.5)  # fractions of the lower side's hot-set QPS, beside equal_fraction


def _dnsmasq(bl: BenchLab, port: int, nftset: bool) -> subprocess.Popen:
    lab = bl.lab
    argv = ["/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={bl.w1.gw4}",
            f"--port={port}", f"--server={BENCH_UPSTREAM}", "--cache-size=10000",
            "--dns-forward-max=1000", "--pid-file=", "--user=root", "--group=root"]
    if nftset:
        argv.append("--nftset=/bench.test/4#inet#benchcmp#allow4")
    return lab.popen(lab.node_ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def _floor(bl: BenchLab, port: int) -> subprocess.Popen:
    python = os.environ.get("EGRESSD_BENCH_PYTHON") or sys.executable
    return bl.lab.popen(bl.lab.node_ns, [python, str(Path(__file__).with_name("floor_server.py")), bl.w1.gw4, str(port)],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", str(text), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _set_size(bl: BenchLab, table: str, set_name: str) -> int:
    cp = bl.lab.run(bl.lab.node_ns, ["nft", "-j", "list", "set", "inet", table, set_name], timeout=60)
    doc = json.loads(cp.stdout or "{}")
    for o in doc.get("nftables", []):
        if "set" in o:
            return len(o["set"].get("elem", []))
    return 0


def _summary(runs: list[dict]) -> dict:
    return {
        "qps_median": rnd(median(r["qps_noerror"] for r in runs)),
        "latency_mean_ms_median": rnd(median(r["latency_mean_ms"] for r in runs), 3),
        "runs": [{k: r[k] for k in ("qps_noerror", "qps", "latency_mean_ms", "sent", "completed", "lost",
                                    "runtime_s", "rcodes", "qps_limit", "loadavg1")} | {"programmed": r.get("programmed")}
                 for r in runs],
    }


def run(seconds: float = 10, rounds: int = 3, equal_fraction: float = 0.8, log=print) -> dict:
    eq_seconds = max(3.0, seconds / 2)
    with BenchLab() as bl:
        bl.start_daemon()
        bl.nft_node("table inet benchcmp {\n set allow4 { type ipv4_addr; flags timeout; timeout 300s; }\n}\n")
        _dnsmasq(bl, NFT_PORT, nftset=True)
        _dnsmasq(bl, PLAIN_PORT, nftset=False)
        _floor(bl, FLOOR_PORT)
        lab, w1, gw = bl.lab, bl.w1.netns, bl.w1.gw4
        for port in (NFT_PORT, PLAIN_PORT, FLOOR_PORT):  # wait until all three answer
            for _ in range(50):
                if lab.dig(bl.w1, unique_name(bl.unique.take(1)[0]), server=gw, timeout=1,
                           extra=["-p", str(port)]).status == "NOERROR":
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"the reference server on {gw}:{port} does not answer")
        servers = {"egressd": (BENCH_UPSTREAM, 53), "dnsmasq_nftset": (gw, NFT_PORT), "dnsmasq": (gw, PLAIN_PORT)}
        unique_sides = list(servers)
        servers["floor"] = (gw, FLOOR_PORT)
        hot_sides = ("egressd", "dnsmasq_nftset", "floor")

        def allowed_ips() -> int:
            # /api/2.0/status is cheap; /metrics lists the kernel table (slow with big sets)
            st = bl.api("GET", "/api/2.0/status", timeout=120)[1]
            return int(st.get("allowed_ips", 0)) if isinstance(st, dict) else 0

        def unique_side(side: str, qps: float | None = None, secs: float = seconds):
            def go(_r: int) -> dict:
                n = int(UNIQUE_CAP_QPS * secs if qps is None else qps * secs * 1.2 + 100)
                f = write_queries(bl.tmpfile(f"u-{side}.txt"), map(unique_name, bl.unique.take(n)))
                before = allowed_ips() if side == "egressd" else None
                res = dnsperf(lab, w1, *servers[side], f, secs, once=True, qps=qps)
                if before is not None:
                    res["programmed"] = allowed_ips() - before  # new IPs in the cache (and the set)
                f.unlink()
                log(f"  dns unique {side:15s} qps={res['qps_noerror']:9.0f} lat={res['latency_mean_ms']:.3f}ms"
                    f" lost={int(res['lost'])} rcodes={res['rcodes']}" + (f" limit={int(qps)}" if qps else ""))
                return res
            return go

        hot = write_queries(bl.tmpfile("hot.txt"), map(unique_name, bl.unique.take(HOT_NAMES)))

        def hot_side(side: str, qps: float | None = None, secs: float = seconds):
            def go(_r: int) -> dict:
                res = dnsperf(lab, w1, *servers[side], hot, secs, once=False, qps=qps)
                log(f"  dns hot    {side:15s} qps={res['qps_noerror']:9.0f} lat={res['latency_mean_ms']:.3f}ms"
                    f" lost={int(res['lost'])} rcodes={res['rcodes']}" + (f" limit={int(qps)}" if qps else ""))
                return res
            return go

        out: dict = {"seconds": seconds, "rounds": rounds, "equal_fraction": equal_fraction}
        # --- unique names
        u = alternate({s: unique_side(s) for s in unique_sides}, rounds)
        out["unique"] = {s: _summary(v) for s, v in u.items()}
        low = min(out["unique"]["egressd"]["qps_median"], out["unique"]["dnsmasq_nftset"]["qps_median"])
        rate = max(100.0, equal_fraction * low)
        ue = alternate({s: unique_side(s, rate, eq_seconds) for s in ("egressd", "dnsmasq_nftset")}, rounds)
        out["unique_equal_load"] = {"qps_limit": int(rate), **{s: _summary(v) for s, v in ue.items()}}
        # --- hot set: one warm-up pass per side, then the runs
        for s in hot_sides:
            dnsperf(lab, w1, *servers[s], hot, 10, once=True)
        h = alternate({s: hot_side(s) for s in hot_sides}, rounds)
        out["hot"] = {s: _summary(v) for s, v in h.items()}
        low = min(out["hot"]["egressd"]["qps_median"], out["hot"]["dnsmasq_nftset"]["qps_median"])
        rate = max(100.0, equal_fraction * low)
        he = alternate({s: hot_side(s, rate, eq_seconds) for s in hot_sides}, rounds)
        out["hot_equal_load"] = {"qps_limit": int(rate), **{s: _summary(v) for s, v in he.items()}}
        # The same comparison at lighter loads (reported beside the target row, which stays at
        # equal_fraction).
        out["hot_latency_curve"] = {}
        for frac in LIGHTER_LOADS:
            r = max(100.0, frac * low)
            hc = alternate({s: hot_side(s, r, eq_seconds) for s in hot_sides}, rounds)
            out["hot_latency_curve"][str(frac)] = {"qps_limit": int(r), **{s: _summary(v) for s, v in hc.items()}}
        out["set_sizes"] = {"egressd_ws_1001_dyn4": _set_size(bl, "egressd", "ws_1001_dyn4"),
                            "benchcmp_allow4": _set_size(bl, "benchcmp", "allow4")}
        t0 = time.monotonic()
        m = str(bl.api("GET", "/metrics", timeout=120)[1])
        out["metrics_scrape_seconds"] = round(time.monotonic() - t0, 3)
        out["egressd_counters"] = {k: int(_metric(m, k)) for k in (
            "egressd_programmed_ips_total", "egressd_program_errors_total", "egressd_dns_queries_total")}
    # ratios against the targets
    U, H = out["unique"], out["hot"]
    out["ratios"] = {
        "unique_qps_vs_dnsmasq_nftset": _ratio(U["egressd"]["qps_median"], U["dnsmasq_nftset"]["qps_median"]),
        "unique_qps_vs_dnsmasq_plain": _ratio(U["egressd"]["qps_median"], U["dnsmasq"]["qps_median"]),
        "hot_qps_vs_dnsmasq_cache": _ratio(H["egressd"]["qps_median"], H["dnsmasq_nftset"]["qps_median"]),
        "unique_latency_vs_dnsmasq_nftset_equal_load": _ratio(
            out["unique_equal_load"]["egressd"]["latency_mean_ms_median"],
            out["unique_equal_load"]["dnsmasq_nftset"]["latency_mean_ms_median"]),
        "hot_latency_vs_dnsmasq_equal_load": _ratio(
            out["hot_equal_load"]["egressd"]["latency_mean_ms_median"],
            out["hot_equal_load"]["dnsmasq_nftset"]["latency_mean_ms_median"]),
        "hot_qps_floor_vs_dnsmasq_cache": _ratio(H["floor"]["qps_median"], H["dnsmasq_nftset"]["qps_median"]),
        "hot_latency_floor_vs_dnsmasq_equal_load": _ratio(
            out["hot_equal_load"]["floor"]["latency_mean_ms_median"],
            out["hot_equal_load"]["dnsmasq_nftset"]["latency_mean_ms_median"]),
    }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--equal-fraction", type=float, default=0.8)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = run(args.seconds, args.rounds, args.equal_fraction)
    print(json.dumps({k: v for k, v in res.items() if k not in ("unique", "hot", "unique_equal_load", "hot_equal_load", "hot_latency_curve")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
