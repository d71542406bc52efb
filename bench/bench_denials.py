"""Denial logs under load, in the namespace lab: DNS denials from a workload at a paced rate, the
daemon building events and shipping them, egress-collector storing them.

    sudo .venv/bin/python bench/bench_denials.py [--rates 2000,5000,10000] [--seconds 10] [--json out.json]

For each rate: how many denials were sent and answered, how many events the collector holds (loss =
sent - stored), and the time from each denial (its send time, carried in the name) until a poller
first sees it in the collector (p50/p99; the poller adds up to its 50 ms interval)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlab import BenchLab, median

SENDER = textwrap.dedent(
    """
    import socket, struct, sys, time
    rate, seconds, tag = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sent = answered = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate)
        while sent < due:
            labels = [f"q{int(time.time() * 1000)}-{sent}", tag, "evil", "example"]
            qname = b"".join(bytes([len(l)]) + l.encode() for l in labels) + b"\\0"
            s.sendto(struct.pack("!HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname + b"\\0\\1\\0\\1", ("203.0.113.2", 53))
            sent += 1
        try:
            while True:
                s.recv(4096)
                answered += 1
        except BlockingIOError:
            pass
        time.sleep(0.0005)
    stop = time.monotonic() + 2
    while time.monotonic() < stop and answered < sent:
        try:
            s.recv(4096)
            answered += 1
        except BlockingIOError:
            time.sleep(0.001)
    print(sent, answered)
    """
)


def run_rate(lab, collector, rate: int, seconds: float, drain: float = 30) -> dict:
    tag = f"b{uuid.uuid4().hex[:6]}"
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            rows = collector.sql(
                f"select destination from outbound_network where destination like '%.{tag}.evil.example' "
                f"and event_time >= current_timestamp() - interval 5 minute"
            )
            now = time.time()
            for r in rows:
                seen.setdefault(r["destination"], now)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    r = lab.run(lab.workloads[0].netns, [sys.executable, "-c", SENDER, str(rate), str(seconds), tag], timeout=seconds + 30)
    sent, answered = map(int, r.stdout.split())
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline and len(seen) < sent:
        time.sleep(0.1)
    stop.set()
    poller.join(5)
    (row,) = collector.sql(f"select count(*) as n, count(distinct event_id) as ids from outbound_network where destination like '%.{tag}.evil.example'")
    lat = sorted((t - int(d.split("-", 1)[0][1:]) / 1000) * 1000 for d, t in seen.items())
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None
    return {
        "rate_per_s": rate, "seconds": seconds, "sent": sent, "answered": answered, "stored": row["n"],
        "distinct_ids": row["ids"], "lost": sent - row["n"], "sustained_events_per_s": round(row["n"] / seconds),
        "latency_ms_p50": q(0.5), "latency_ms_p99": q(0.99), "latency_ms_max": q(1.0),
    }


def suite(seconds: float = 10, rounds: int = 3, p99_rate: int = 5000, ladder: tuple[int, ...] = (10_000, 20_000),
          log=print) -> dict:
    """p99 denial-to-queryable at ``p99_rate`` (median of ``rounds`` runs), then the ladder of higher
    rates once each: the highest rate whose events all arrived is the sustained rate without loss."""
    with BenchLab(collector=True) as bl:
        bl.start_daemon()
        at = []
        for _ in range(rounds):
            at.append(run_rate(bl.lab, bl.collector, p99_rate, seconds, drain=10))
            log(f"  denials {p99_rate}/s: lost={at[-1]['lost']} p50={at[-1]['latency_ms_p50']} ms p99={at[-1]['latency_ms_p99']} ms")
        higher = []
        for rate in ladder:
            higher.append(run_rate(bl.lab, bl.collector, rate, seconds, drain=10))
            log(f"  denials {rate}/s: sent={higher[-1]['sent']} lost={higher[-1]['lost']} p99={higher[-1]['latency_ms_p99']} ms")
    ok = [r for r in at + higher if r["lost"] == 0 and r["sent"] > 0]
    best = max(ok, key=lambda r: r["sent"] / r["seconds"], default=None)
    return {
        "p99_rate_per_s": p99_rate, "seconds": seconds, "rounds": rounds,
        "p99_ms_median": median(r["latency_ms_p99"] for r in at),
        "p50_ms_median": median(r["latency_ms_p50"] for r in at),
        "lost_total_at_p99_rate": sum(r["lost"] for r in at),
        "sustained_without_loss_per_s": round(best["sent"] / best["seconds"]) if best else 0,
        "runs": at, "ladder": higher,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,5000,10000")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    with BenchLab(collector=True) as bl:  # the lab, egress-collector, the daemon (DNS rate limit off)
        bl.start_daemon()
        for rate in map(int, args.rates.split(",")):
            res = run_rate(bl.lab, bl.collector, rate, args.seconds)
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
