"""(f) Memory: the daemon's resident set (VmRSS from /proc) with 10,000 workloads registered and
100,000 resolved IPs cached.

    sudo .venv/bin/python bench/bench_memory.py [--names 100000] [--workloads 10000] [--json out.json]

Steps: the daemon with the lab's 3 workloads (baseline RSS); ``names`` never-seen names resolved
from w1 through the shim with dnsperf (every answer a new IP in workspace 1001's set): time and
RSS; then 10,000 more ``[[workloads]]`` (spread over 100 workspaces bound to the restricted
policy) appended to the config and applied by SIGHUP: time and RSS (the figure); one more
workload over the API (time); a short unique-names dnsperf with the workloads registered; and a
restart that adopts it all (time to READY, RSS).

bench/run.sh runs the daemon from bench/.venv-daemon (runtime dependencies only, as
scripts/install.sh installs them) through EGRESSD_BENCH_PYTHON; run directly without it, the daemon
runs on this interpreter, whose test extras add about 4 MB."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from benchlab import (
    BENCH_UPSTREAM,
    BenchLab,
    dnsperf,
    unique_name,
    vm_status,
    write_queries,
)


def workloads_toml(n: int, workspaces: int = 100) -> list[str]:
    lines = []
    for w in range(workspaces):
        lines += ["[[workspaces]]", f'id = "{2000 + w}"', 'network_policy_id = "restricted-etl"']
    for i in range(n):
        lines += ["[[workloads]]", f'id = "bench-wl-{i}"', f'workspace_id = "{2000 + i % workspaces}"',
                  'product = "GENERAL_COMPUTE"', f'sources = ["10.100.{i >> 8}.{i & 255}/32"]']
    return lines


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _wait_workloads(bl: BenchLab, want: int, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = bl.api("GET", "/api/2.0/status", timeout=timeout)[1]
        if isinstance(st, dict) and st.get("workloads", 0) >= want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"daemon did not reach {want} workloads in {timeout}s:\n{bl.daemon.log()[-2000:]}")


def _status(bl: BenchLab) -> dict:
    st = bl.api("GET", "/api/2.0/status")[1]
    return st if isinstance(st, dict) else {}


def run(names: int = 100_000, workloads: int = 10_000, probe_seconds: float = 5, log=print) -> dict:
    """IPs first (with the lab's 3 workloads, where an answer costs ~0.3 ms to program), then the
    10,000 workloads by SIGHUP (the config file), then a restart that adopts it all."""
    out: dict = {"names": names, "workloads": workloads}
    with BenchLab() as bl:
        bl.start_daemon()
        time.sleep(1)
        out["baseline_rss_mb"] = _mb(vm_status(bl.daemon_pid)["VmRSS"])
        f = write_queries(bl.tmpfile("mem.txt"), map(unique_name, bl.unique.take(names)))
        t0 = time.monotonic()
        res = dnsperf(bl.lab, bl.w1.netns, BENCH_UPSTREAM, 53, f, max(60.0, names / 500), once=True)
        f.unlink()
        out["resolve_seconds"] = round(time.monotonic() - t0, 1)
        out["resolve_qps"] = round(res["qps_noerror"])
        out["resolve_rcodes"] = res["rcodes"]
        out["resolve_lost"] = int(res["lost"])
        out["allowed_ips_after_resolve"] = _status(bl).get("allowed_ips")
        out["rss_mb_after_ips"] = _mb(vm_status(bl.daemon_pid)["VmRSS"])
        # 10,000 workloads from the config file, applied by SIGHUP (with the 100,000 IPs re-rendered)
        before = _status(bl).get("workloads", 0)
        with bl.config.open("a") as fh:
            fh.write("\n".join(workloads_toml(workloads)) + "\n")
        bl.daemon.signal(signal.SIGHUP)
        out["sighup_apply_seconds"] = round(_wait_workloads(bl, workloads + before), 2)
        time.sleep(1)
        pid = bl.daemon_pid
        st = _status(bl)
        vs = vm_status(pid)
        out.update(allowed_ips=st.get("allowed_ips"), status_workloads=st.get("workloads"),
                   rss_mb=_mb(vs["VmRSS"]), rss_peak_mb=_mb(vs["VmHWM"]), rss_anon_mb=_mb(vs.get("RssAnon", 0)))
        t0 = time.perf_counter()
        code, body = bl.api("PUT", "/api/2.0/workloads/bench-extra", {
            "workspace_id": "1001", "product": "APPS", "sources": ["10.101.0.1/32"]})
        out["put_one_workload_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if code != 200:
            raise RuntimeError(f"PUT workload: {code} {body}")
        # DNS with 10,000 workloads registered: every answer programmed
        f = write_queries(bl.tmpfile("mem-probe.txt"), map(unique_name, bl.unique.take(50_000)))
        res = dnsperf(bl.lab, bl.w1.netns, BENCH_UPSTREAM, 53, f, probe_seconds, once=True)
        out["unique_qps_with_workloads"] = round(res["qps_noerror"], 1)
        out["unique_latency_ms_with_workloads"] = round(res["latency_mean_ms"] or 0, 1)
        out["unique_rcodes_with_workloads"] = res["rcodes"]
        # restart: READY time and RSS when adopting the IPs with the workloads from the config
        bl.stop_daemon()
        out["restart_ready_seconds"] = round(bl.start_daemon(timeout=180), 2)
        time.sleep(1)
        out["restart_rss_mb"] = _mb(vm_status(bl.daemon_pid)["VmRSS"])
        out["restart_allowed_ips"] = _status(bl).get("allowed_ips")
    log(f"  memory: RSS {out['rss_mb']} MB (peak {out['rss_peak_mb']}) with {out['allowed_ips']} IPs and "
        f"{out['status_workloads']} workloads; baseline {out['baseline_rss_mb']} MB, "
        f"{out['rss_mb_after_ips']} MB with the IPs alone; after a restart {out['restart_rss_mb']} MB "
        f"(READY in {out['restart_ready_seconds']} s); DNS with the workloads: "
        f"{out['unique_qps_with_workloads']} qps unique")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = run(args.names, args.workloads)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
