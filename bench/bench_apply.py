"""Policy apply time, from PUT to active: the admin path (validate, plan, render, one libnftables
transaction, state file) against a real kernel in a scratch network namespace.

    sudo .venv/bin/python bench/bench_apply.py [--repeat 5] [--json out.json]

Cases: a policy of 10, 2,000 and 100,000 destinations (half DNS_NAME, half disjoint IP_RANGE /32s,
so the kernel gets 50,000 interval elements) bound to a workspace with one workload; and a
10-destination policy with 10,000 workloads registered. Each timed PUT is a new version of the
bound policy: its DNS names all change ("names"), or every destination does, names and IP
ranges ("all", 100,000 only: the worst case of the delta that a policy edit goes in as)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from egressd.admin import Admin
from egressd.baked import Baked
from egressd.core.config import config_from_dict
from egressd.core.policy import default_policy
from egressd.engine import Engine
from egressd.libnft import Nft
from egressd.netns import entered
from egressd.statestore import StateStore


def nft_in(ns: str) -> Nft:
    with entered(ns):
        return Nft()


def policy(pid: str, n: int, flip: int, change: str = "names") -> dict:
    dests = []
    shift = flip % 2 if change == "all" else 0
    for i in range(n):
        if i % 2:
            dests.append({"destination": f"h{i}-{flip}.example.com", "internet_destination_type": "DNS_NAME"})
        else:
            # every other address: the ranges stay disjoint (no merging helps the renderer); "all"
            # takes the odd addresses in every other version, so that every range changes
            j = i + shift
            dests.append({"destination": f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}/32", "internet_destination_type": "IP_RANGE"})
    return {"network_policy_id": pid, "egress": {"network_access": {
        "restriction_mode": "RESTRICTED_ACCESS", "allowed_internet_destinations": dests}}}


async def case(nft: Nft, tmp: Path, destinations: int, workloads: int, repeat: int, change: str = "names") -> dict:
    cfg = config_from_dict({
        "dns": {"upstreams": ["203.0.113.2:53"]},
        "state": {"dir": str(tmp / f"state-{destinations}-{workloads}-{change}")},
        "limits": {"max_destinations": max(destinations, 2000)},
    })
    admin = Admin(Engine(cfg, nft), StateStore(cfg.state.dir), Baked(cfg, {"default-policy": default_policy()}, {}, ()))
    admin.start()
    if workloads > 1:
        # register the workloads in one pushed state (the bench measures the apply that follows)
        admin.pushed.workloads.update({
            f"w{i}": {"workload_id": f"w{i}", "workspace_id": str(1000 + i % 100), "product": "APPS",
                      "sources": [f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32"]}
            for i in range(workloads)
        })
        admin.effective = admin._merge(admin.pushed)
        admin.start()
    else:
        await admin.put_workload("w0", {"workspace_id": "1000", "product": "APPS", "sources": ["10.100.0.1/32"]}, caller="bench")
    await admin.put_binding("1000", {"network_policy_id": "default-policy"}, caller="bench")
    times, scopes = [], set()
    for r in range(repeat):
        doc = policy("p", destinations, r, change)
        t0 = time.perf_counter()
        await admin.put_policy(doc, caller="bench", path_id="p")
        if r == 0:
            await admin.put_binding("1000", {"network_policy_id": "p"}, caller="bench")
            continue  # the first round also binds: not counted
        times.append((time.perf_counter() - t0) * 1000)
        scopes.add(admin.engine.last_apply_scope)
        # What the daemon does once a reply is out (a collection, freeing the replaced state)
        # runs here, between rounds, as it runs between a client's requests.
        await asyncio.sleep(0)
    return {"destinations": destinations, "workloads": workloads, "change": change, "scope": "/".join(sorted(scopes)),
            "put_to_active_ms_median": round(statistics.median(times), 1),
            "put_to_active_ms_min": round(min(times), 1), "put_to_active_ms_max": round(max(times), 1),
            "repeat": len(times), "kernel_apply_ms_last": round(admin.engine.last_apply_ms, 1)}


async def run(repeat: int = 6, log=print) -> list[dict]:
    """Every case in a fresh scratch namespace; one result per case (the first round of each is not counted)."""
    ns = f"egb{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)  # noqa: ASYNC221 - set-up, before any timing
    try:
        nft = nft_in(ns)
        with tempfile.TemporaryDirectory() as tmp:
            results = []
            for dests, wls, change in ((10, 1, "names"), (2000, 1, "names"), (100_000, 1, "names"), (100_000, 1, "all"),
                                       (10, 10_000, "names")):
                res = await case(nft, Path(tmp), dests, wls, repeat if dests < 100_000 else max(6, repeat // 2 + 1), change)
                log(json.dumps(res))
                results.append(res)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)  # noqa: ASYNC221
    return results


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = await run(args.repeat, log=lambda s: print(s, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
