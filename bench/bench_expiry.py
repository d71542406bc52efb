"""Does the kernel memory of expired answers stay bounded while answers keep coming?

    sudo .venv/bin/python bench/bench_expiry.py [--seconds 60] [--rates 20,100,500] [--ttl 2] \
        [--background 100000]

For each rate, twice: with the engine as it is (an expiry round every second deletes from the
kernel what it drops, while the element is still live), and with those deletes switched off (the
kernel's timeout and collector alone, as before they existed). In a throw-away network namespace
(removed at the end) the engine applies a table with one restricted workspace, programs
``--background`` IPs with a TTL of an hour (a node's cache: they make each collector walk of the
set as long as on a busy node), then ``rate`` answers a second, each of one new IP with a TTL of
``--ttl`` s (min_ttl 1), through the raw writer: one transaction each, as on a node whose
workloads resolve names all the time. The
kernel's memory in set elements is read every 5 s: the objects in use of the memory-accounted
kmalloc caches (/proc/slabinfo), where elements live. From Linux 6.5 the collector gives a walk
up whenever a change commits in the namespace, so at a steady stream of commits it may never
free expired elements. Machine-wide figures: run it on a quiet machine."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from egressd.core.config import config_from_dict  # noqa: E402
from egressd.core.policy import default_policy, parse_policy  # noqa: E402
from egressd.core.workloads import Workload  # noqa: E402
from egressd.engine import Engine, State, Target  # noqa: E402
from egressd.lab import world  # noqa: E402
from egressd.lab.kmem import element_kb  # noqa: E402
from egressd.libnft import Nft  # noqa: E402
from egressd.netns import entered  # noqa: E402
from egressd.nftset import NftSetWriter  # noqa: E402


def _state() -> State:
    policies = {"default-policy": default_policy(), "restricted-etl": parse_policy(world.policy("restricted-etl"))}
    wl = Workload("w1", "1001", "GENERAL_COMPUTE", (ipaddress.ip_network("10.77.1.2/32"),))
    return State(policies, {"1001": "restricted-etl"}, (wl,))


async def _background(engine: Engine, n: int) -> None:
    """n IPs in 172.16.0.0/12 with a TTL of an hour, 50 an answer, 100 answers a batch."""
    ips = [str(ipaddress.IPv4Address(0xAC100000 + i)) for i in range(n)]
    for i in range(0, n, 5_000):
        await asyncio.gather(*(engine.program(Target("1001", "pypi.org"), tuple((ip, 3600) for ip in ips[j : j + 50]))
                               for j in range(i, min(i + 5_000, n), 50)))


async def _churn(engine: Engine, rate: int, ttl: int, seconds: float, background: int) -> dict:
    await _background(engine, background)
    await asyncio.sleep(1)
    t0 = time.monotonic()
    base = element_kb()
    marks: list[tuple[int, int]] = []
    answered = 0

    async def housekeeping() -> None:  # as the daemon's: a round every second, in steps
        while True:
            await asyncio.sleep(1.0)
            for _ in engine.expire_steps():
                await asyncio.sleep(0)

    hk = asyncio.create_task(housekeeping())
    try:
        while (now := time.monotonic()) - t0 <= seconds:
            if now - t0 >= 5 * len(marks):
                marks.append((round(now - t0), element_kb() - base))
            i = answered + 1
            ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            await engine.program(Target("1001", f"n{i:07d}.pypi.org"), ((ip, ttl),))
            answered += 1
            await asyncio.sleep(max(t0 + answered / rate - time.monotonic(), 0))
    finally:
        hk.cancel()
    marks.append((round(time.monotonic() - t0), element_kb() - base))
    return {"answers": answered, "kb": marks, "live_elements": len(engine.nftset.dump("ws_1001_dyn4")) - background,
            "deleted": engine.counters["expired_deleted"], "transactions": engine.counters["set_transactions"]}


def run_one(rate: int, deletes: bool, ttl: int, seconds: float, background: int) -> dict:
    ns = f"egx{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with entered(ns):
            nft, writer = Nft(), NftSetWriter()
        cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"], "min_ttl": 1}})
        engine = Engine(cfg, nft, nftset=writer)
        if not deletes:
            engine._delete_expired = lambda gone: None  # type: ignore[method-assign]
        engine.apply(_state(), reason="bench")
        try:
            out = asyncio.run(_churn(engine, rate, ttl, seconds, background))
        finally:
            writer.close()
        return {"rate": rate, "deletes": deletes, "background": background, **out}
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rates", default="20,100,500")
    ap.add_argument("--ttl", type=int, default=2)
    ap.add_argument("--background", type=int, default=100_000)
    args = ap.parse_args()
    print(f"kernel {subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}", flush=True)
    for rate in (int(r) for r in args.rates.split(",")):
        for deletes in (True, False):
            r = run_one(rate, deletes, args.ttl, args.seconds, args.background)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
