"""Where the shim's time goes: py-spy on the daemon under dnsperf load (unique names: every answer
programmed; hot set: 1,000 names looped), from workload w1 through the redirect.

    sudo .venv/bin/python bench/profile_shim.py [--seconds 10] [--out bench/results]

For each mix, while dnsperf runs, ``py-spy record -f raw`` (collapsed stacks, summarised into
``profile-<mix>.md``: categories, self and inclusive time of the top functions of the event-loop
thread), then ``py-spy record -f flamegraph`` into ``profile-<mix>.svg``. Also the daemon's CPU use
during the first recording (utime + stime): py-spy leaves out idle samples, so the shares are of
the busy time."""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from benchlab import BENCH_UPSTREAM, BenchLab, cpu_seconds, parse_dnsperf, unique_name, write_queries

PYSPY = str(Path(sys.executable).parent / "py-spy")

# Categories: the first whose pattern matches any frame of a sample's stack (most specific first).
CATEGORIES = [
    ("nft: libnftables command per answer (Nft.run)", re.compile(r"^Nft\.run \(")),
    ("upstream: new UDP socket per query (create_datagram_endpoint)", re.compile(r"create_datagram_endpoint")),
    ("upstream: socket teardown (transport close / connection_lost)", re.compile(r"Transport\.(close|_call_connection_lost) \(")),
    ("set elements over nfnetlink (Engine._flush)", re.compile(r"^Engine\._flush \(")),
    ("answer cache (hits and inserts)", re.compile(r"^(DnsShim\._cached|AnswerCache\.)")),
    ("upstream exchange (pooled sockets, waiting for the answer)", re.compile(r"^_UpstreamPool\.exchange \(")),
    ("classify (workload lookup, policy decision)", re.compile(r"^Engine\.classify \(")),
    ("ip cache (IpCache.record)", re.compile(r"^IpCache\.record \(")),
    ("render element commands (program_elements)", re.compile(r"^program_elements \(")),
    ("DNS parsing (parse_query / parse_answer)", re.compile(r"^(parse_query|parse_answer) \(")),
    ("socket sendto (answers and upstream queries)", re.compile(r"Transport\.sendto \(")),
    ("socket receive (_read_ready)", re.compile(r"_read_ready")),
    ("asyncio machinery (tasks, futures, handles, timers)", re.compile(r"\((asyncio|<frozen|selectors)")),
]


def summarize(raw: Path, top: int = 25) -> dict:
    """Self and inclusive shares of the event-loop thread's samples, from py-spy's collapsed stacks."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    cat_c: collections.Counter[str] = collections.Counter()
    total = other_threads = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        # The event-loop thread: run_forever on the asyncio loop; uvloop's loop is C, so its
        # stacks go straight from Runner.run to the callbacks.
        if not any("egressd/daemon.py" in f for f in frames) or not any(
                "run_forever" in f or f.startswith("Runner.run (") for f in frames):
            other_threads += count
            continue
        total += count
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        self_c[frames[-1]] += count
        for f in set(frames):
            incl_c[f] += count
        # Categories look below the loop's own frame (Runner.run / run_forever).
        base = max(i for i, f in enumerate(frames) if "run_forever" in f or f.startswith("Runner.run ("))
        cat = next((name for name, rx in CATEGORIES if any(rx.search(f) for f in frames[base + 1:])), "other")
        cat_c[cat] += count

    def pct(c: collections.Counter[str]) -> list[tuple[str, float, int]]:
        return [(k, round(100 * v / total, 1), v) for k, v in c.most_common(top)] if total else []

    return {"samples_event_loop": total, "samples_other_threads": other_threads,
            "self": pct(self_c), "inclusive": pct(incl_c), "categories": pct(cat_c)}


def _md(mix: str, res: dict) -> str:
    s = res["summary"]
    lines = [f"# Shim profile: {mix} names", "",
             (f"dnsperf: {res['dnsperf']['qps_noerror']:.0f} NOERROR qps, mean latency {res['dnsperf']['latency_mean_ms']:.2f} ms, "
             f"rcodes {res['dnsperf']['rcodes']}; daemon CPU during the recording: {res['cpu_percent']:.0f} % of one core; "
             f"{s['samples_event_loop']} event-loop samples ({s['samples_other_threads']} in other threads)."), "",
             "## Categories (first match in this order; % of event-loop samples)", "", "| category | % | samples |", "|---|---:|---:|"]
    lines += [f"| {k} | {p} | {n} |" for k, p, n in s["categories"]]
    for title, key in (("Self time (leaf frame)", "self"), ("Inclusive time", "inclusive")):
        lines += ["", f"## {title}", "", "| function | % | samples |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {p} | {n} |" for k, p, n in s[key]]
    return "\n".join(lines) + "\n"


def profile(bl: BenchLab, mix: str, datafile: Path, seconds: float, out: Path, log=print) -> dict:
    pid = bl.daemon_pid
    total = 2 * seconds + 5
    dp = bl.lab.popen(bl.w1, ["dnsperf", "-s", BENCH_UPSTREAM, "-p", "53", "-d", str(datafile), "-l", f"{total:g}",
                              "-q", "100", "-t", "2"] + (["-n", "1"] if mix == "unique" else []),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    raw = out / f"profile-{mix}.txt"
    cpu0, t0 = sum(cpu_seconds(pid)), time.monotonic()
    # Blocking sampling (py-spy pauses the daemon 100 times a second for a consistent stack; it costs
    # the daemon ~10 % of its throughput). --nonblocking skews the shares towards long C calls.
    for fmt, path in (("raw", raw), ("flamegraph", out / f"profile-{mix}.svg")):
        subprocess.run([PYSPY, "record", "-r", "100", "-d", f"{seconds:g}", "-f", fmt, "-o", str(path),
                        "--pid", str(pid)], check=True, capture_output=True, timeout=seconds + 60)
        if fmt == "raw":
            cpu = 100 * (sum(cpu_seconds(pid)) - cpu0) / (time.monotonic() - t0)
    text, _ = dp.communicate(timeout=total + 30)
    res = {"mix": mix, "seconds": seconds, "cpu_percent": round(cpu, 1), "dnsperf": parse_dnsperf(text),
           "summary": summarize(raw)}
    (out / f"profile-{mix}.md").write_text(_md(mix, res))
    log(f"  profile {mix}: {res['dnsperf']['qps_noerror']:.0f} qps, daemon CPU {cpu:.0f} %; top categories: "
        + ", ".join(f"{k} {p}%" for k, p, _ in res["summary"]["categories"][:4]))
    return res


RESULTS = Path(__file__).resolve().parent / "results"


def run(seconds: float = 10, out: Path = RESULTS, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with BenchLab() as bl:
        bl.start_daemon()
        n = int(25_000 * (2 * seconds + 5))
        uniq = write_queries(bl.tmpfile("prof-u.txt"), map(unique_name, bl.unique.take(n)))
        results["unique"] = profile(bl, "unique", uniq, seconds, out, log)
        hot = write_queries(bl.tmpfile("prof-h.txt"), map(unique_name, bl.unique.take(1000)))
        results["hot"] = profile(bl, "hot", hot, seconds, out, log)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    res = run(args.seconds, args.out)
    print(json.dumps({m: {"cpu_percent": r["cpu_percent"], "qps": r["dnsperf"]["qps_noerror"],
                          "categories": r["summary"]["categories"]} for m, r in res.items()}, indent=2))


if __name__ == "__main__":
    main()
