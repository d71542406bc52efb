"""The benchmark suite: every benchmark of issue 7 in the namespace lab, as root.

    sudo bench/run.sh [--quick] [--only a,b,…] [--profile]

a DNS throughput and latency (dnsperf: shim vs dnsmasq --nftset)   bench_dns.py
b the answer/set race (10,000 fresh names, each then a TCP connect)  bench_race.py
c policy apply, PUT to active                                       bench_apply.py
d datapath: iperf3 and new connections/s vs no egressd table        bench_datapath.py
e denial logs: sustained rate without loss, p99 to queryable        bench_denials.py
f daemon memory with 100,000 cached IPs and 10,000 workloads        bench_memory.py
--profile: py-spy on the shim under dnsperf load                    profile_shim.py

Writes bench/results/latest.json and latest.md (with the machine; partial.* when only some ran) and
prints the markdown. Each
figure is a median of repeated runs; comparisons alternate their sides within the run."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import structlog

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_apply
import bench_datapath
import bench_denials
import bench_dns
import bench_memory
import bench_race
import profile_shim
from report import markdown

FULL = {
    "a": {"seconds": 10, "rounds": 3},
    "b": {"names": 10_000},
    "c": {"repeat": 6},
    "d": {"seconds": 10, "conn_seconds": 5, "rounds": 3, "reference": True},
    "e": {"seconds": 10, "rounds": 3, "ladder": (10_000, 15_000, 20_000)},
    "f": {"names": 100_000},
    "profile": {"seconds": 10},
}
QUICK = {
    "a": {"seconds": 3, "rounds": 3},
    "b": {"names": 10_000},
    "c": {"repeat": 4},
    "d": {"seconds": 2, "conn_seconds": 1, "rounds": 3, "reference": False},
    "e": {"seconds": 3, "rounds": 3, "ladder": ()},
    "f": {"names": 20_000},
    "profile": {"seconds": 5},
}
NAMES = {"a": "DNS throughput and latency", "b": "answer/set race", "c": "policy apply",
         "d": "datapath", "e": "denial logs", "f": "memory", "profile": "shim profile"}


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    top = HERE.parent
    dirty = _out(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "nft": _out(["nft", "--version"]), "dnsmasq": _out(["dnsmasq", "--version"]).splitlines()[0:1],
        "dnsperf": next((ln for ln in _out(["dnsperf", "-h"]).splitlines() if ln.startswith("Version")), ""),
        "iperf3": _out(["iperf3", "--version"]).splitlines()[0:1],
        "git_commit": _out(["git", "-C", str(top), "rev-parse", "--short", "HEAD"]),
        "git_modified_files": len(dirty.splitlines()) if dirty else 0,
    }


def step(key: str, p: dict, log) -> object:
    if key == "a":
        return bench_dns.run(p["seconds"], p["rounds"], log=log)
    if key == "b":
        return bench_race.run(p["names"], log=log)
    if key == "c":
        return asyncio.run(bench_apply.run(p["repeat"], log=lambda s: log("  apply " + s)))
    if key == "d":
        return bench_datapath.run(p["seconds"], p["conn_seconds"], p["rounds"], reference=p["reference"], log=log)
    if key == "e":
        return bench_denials.suite(p["seconds"], p["rounds"], ladder=p["ladder"], log=log)
    if key == "f":
        return bench_memory.run(p["names"], log=log)
    if key == "profile":
        res = profile_shim.run(p["seconds"], HERE / "results", log=log)
        return {m: {"cpu_percent": r["cpu_percent"], "dnsperf_qps": round(r["dnsperf"]["qps_noerror"]),
                    "categories": r["summary"]["categories"], "self_top": r["summary"]["self"][:15]}
                for m, r in res.items()}
    raise KeyError(key)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (about 4 minutes)")
    ap.add_argument("--only", default="a,b,c,d,e,f", help="comma-separated benchmarks (a..f, profile)")
    ap.add_argument("--profile", action="store_true", help="also profile the shim with py-spy")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run.py: run as root (network namespaces, nftables)", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    if args.profile and "profile" not in keys:
        keys.append("profile")
    bad = [k for k in keys if k not in params]
    if bad:
        print(f"run.py: unknown benchmark(s) {bad}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"machine": machine(), "quick": args.quick, "params": {k: params[k] for k in keys},
                 "results": {}, "seconds": {}, "errors": {}}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # The apply benchmark runs the admin path in this process: keep its info logs off the report.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    t_all = time.monotonic()
    for k in keys:
        log(f"== {k}: {NAMES[k]}")
        t0 = time.monotonic()
        try:
            doc["results"][k] = step(k, params[k], log)
        except Exception:  # noqa: BLE001 - one failed benchmark must not lose the others
            doc["errors"][k] = traceback.format_exc()[-4000:]
            log(doc["errors"][k])
        doc["seconds"][k] = round(time.monotonic() - t0, 1)
        log(f"   ({doc['seconds'][k]} s)")
    doc["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    doc["total_seconds"] = round(time.monotonic() - t_all, 1)
    # latest.*: the last run of all six; a run of some of them goes to partial.*
    stem = "latest" if set("abcdef") <= set(keys) else "partial"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = markdown(doc)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
