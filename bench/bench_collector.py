#!/usr/bin/env python3
"""Sustained ingest rate of egress-collector over HTTP on loopback, and of its store alone.

Starts ``egress-collector`` (this interpreter, ``-m egressd.collector.cli``) on an ephemeral
loopback port with a throw-away database, posts pre-built batches of 100 and 1000 events for a
fixed time, and prints one JSON document:

    {"http": {"100": {"events_per_s": ..., "batches": ..., "p50_ms": ..., "p99_ms": ...}, ...},
     "store": {"100": {...}, "1000": {...}}, ...}

Usage: bench/bench_collector.py [--seconds 5] [--concurrency 1] [--batch 100 --batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import duckdb

from egressd.collector.store import Store
from egressd.core.events import event_from_json, format_time, new_event_id

PRODUCTS = ("DBSQL", "ML_SERVING", "GENERAL_COMPUTE")


def make_docs(n: int, start: datetime) -> list[dict]:
    """A realistic mix: 60 % DNS, 30 % IP, 10 % STORAGE events."""
    docs = []
    for i in range(n):
        t = format_time(start + timedelta(microseconds=i * 1000))
        base = {
            "account_id": "node-1", "workspace_id": str(1000 + i % 7), "event_id": new_event_id(),
            "destination_type": "DNS", "destination": f"host{i}.example.com",
            "dns_event": {"domain_name": f"host{i}.example.com", "rcode": 3},
            "storage_event": None, "event_time": t,
            "access_type": "DROP" if i % 4 else "LOG_ONLY_DENIAL",
            "network_source_type": PRODUCTS[i % 3], "ip_event": None,
            "workload_id": f"wl-{i % 50}", "network_policy_id": "restricted-etl", "node": "node-a",
        }
        if i % 10 in (6, 7, 8):
            base.update(destination_type="IP", destination=f"203.0.113.{i % 250}", dns_event=None,
                        ip_event={"source_ip": "10.77.1.2", "destination_ip": f"203.0.113.{i % 250}",
                                  "destination_port": 443, "protocol": "TCP"})
        elif i % 10 == 9:
            host = f"bucket{i}.s3.us-west-2.amazonaws.com"
            base.update(destination_type="STORAGE", destination=host,
                        dns_event={"domain_name": host, "rcode": 3},
                        storage_event={"hostname": host, "path": None,
                                       "rejection_reason": "bucket not allowed"})
        docs.append(base)
    return docs


def summarize(latencies: list[float], events: int, elapsed: float) -> dict:
    lat = sorted(latencies)
    return {
        "events_per_s": round(events / elapsed),
        "batches": len(lat),
        "events": events,
        "seconds": round(elapsed, 2),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
    }


def start_collector(db: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "egressd.collector.cli", "--listen", "127.0.0.1:0", "--db", str(db),
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # --log-level warning hides the "listening" line, so find the port from /proc instead.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port:
            return proc, port
        if proc.poll() is not None:
            raise SystemExit(f"collector exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("collector did not start")


def _listening_port(pid: int) -> int | None:
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
                  for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                    return int(parts[1].split(":")[1], 16)
    except OSError:
        return None
    return None


async def bench_http(port: int, batch: int, seconds: float, concurrency: int) -> dict:
    # Bodies are built before the clock starts: this measures the collector, not the client.
    start = datetime.now(timezone.utc)
    # Enough distinct events for ~60k events/s (capped at 300k events of memory); beyond that
    # bodies repeat, and their events count as duplicates ("inserted" shows how many were new).
    n_bodies = max(4, min(300_000 // batch, int(seconds * 60_000 / batch) + 1))
    bodies = [json.dumps(make_docs(batch, start)).encode() for _ in range(n_bodies)]
    latencies: list[float] = []
    events = inserted = 0
    url = f"http://127.0.0.1:{port}/v1/events"
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as session:
        t0 = time.perf_counter()
        end = t0 + seconds
        next_body = 0

        async def worker() -> None:
            nonlocal events, inserted, next_body
            while time.perf_counter() < end:
                body = bodies[next_body % len(bodies)]
                next_body += 1
                s = time.perf_counter()
                async with session.post(url, data=body) as r:
                    doc = await r.json()
                    if r.status != 200:
                        raise SystemExit(f"collector answered {r.status}: {doc}")
                latencies.append(time.perf_counter() - s)
                events += batch
                inserted += doc["inserted"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    out = summarize(latencies, events, elapsed)
    out["inserted"] = inserted
    return out


async def bench_store(db: Path, batch: int, seconds: float) -> dict:
    store = Store(db)
    try:
        start = datetime.now(timezone.utc)
        latencies: list[float] = []
        events = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            evs = [event_from_json(d) for d in make_docs(batch, start)]
            s = time.perf_counter()
            await store.insert(evs)
            latencies.append(time.perf_counter() - s)
            events += batch
        # Only insert time counts here: the store's own throughput.
        return summarize(latencies, events, sum(latencies))
    finally:
        store.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    ap.add_argument("--concurrency", type=int, default=1, help="parallel HTTP clients")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 100, 1000)")
    args = ap.parse_args()
    sizes = args.batch or [100, 1000]
    result: dict = {
        "host": {"python": platform.python_version(), "duckdb": duckdb.__version__,
                 "cpus": os.cpu_count(), "machine": platform.machine()},
        "seconds": args.seconds, "concurrency": args.concurrency, "http": {}, "store": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp:
        for size in sizes:
            result["store"][str(size)] = await bench_store(Path(tmp) / f"store{size}.duckdb", size,
                                                           args.seconds)
        for size in sizes:
            proc, port = start_collector(Path(tmp) / f"http{size}.duckdb")
            try:
                result["http"][str(size)] = await bench_http(port, size, args.seconds,
                                                             args.concurrency)
            finally:
                proc.terminate()
                proc.wait(30)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
