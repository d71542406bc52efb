"""Rendered rulesets load into a real kernel, and a refused transaction changes nothing."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import uuid

import pytest

from egressd.core.ipcache import Entry
from egressd.core.plan import build_plan
from egressd.core.policy import default_policy, parse_policy
from egressd.core.ruleset import RenderOptions, render_table, replace_table
from egressd.core.workloads import Workload
from egressd.lab import world


@pytest.fixture
def netns():
    name = f"egt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(ns, text, check=True):
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, capture_output=True, check=check)


def listing(ns):
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], text=True, capture_output=True, check=True).stdout


def plan_of(n_workloads=3):
    pols = {
        "restricted-etl": parse_policy(world.policy("restricted-etl")),
        "dry": parse_policy(world.policy("dry", dry_run=True)),
        "default-policy": default_policy(),
    }
    wls = [
        Workload(f"w{i}", str(1000 + i % 3), "APPS", (ipaddress.ip_network(f"10.77.{i // 250}.{i % 250 + 1}/32"),
                                                    ipaddress.ip_network(f"2001:db8:77::{i + 1:x}/128")))
        for i in range(n_workloads)
    ]
    return build_plan(pols, {"1000": "restricted-etl", "1001": "dry"}, wls)


@pytest.mark.parametrize("deny", ["reject", "drop"])
def test_rendered_table_loads_and_reloads(netns, deny):
    plan = plan_of(300)
    dyn = {"1000": [Entry(f"198.51.100.{i}", 60.0, "pypi.org") for i in range(1, 50)]}
    text = replace_table(render_table(plan, dyn, 0.0, RenderOptions(1, 10053, deny)))
    nft(netns, text)
    nft(netns, text)  # over an existing table: replaced, not merged
    out = listing(netns)
    assert out.count("table inet egressd") == 1
    assert "198.51.100.49 timeout" in out
    # Every answer set (dyn4, dyn6) of each restricted or dry-run workspace, collected every 10 s.
    dyn_sets = re.findall(r"set (ws_\w+_dyn[46]) \{\n\t+type \w+\n\t+flags timeout\n\t+gc-interval 10s\n", out)
    assert len(dyn_sets) == 4 and len(set(dyn_sets)) == 4, out[:2000]
    rate_sets = re.findall(r"set (\w+_rate_v[46]) \{\n\t+type \w+\n\t+size 65535\n\t+flags dynamic,timeout\n"
                           r"\t+timeout 1m\n\t+gc-interval 10s\n", out)
    assert sorted(rate_sets) == ["dns_rate_v4", "dns_rate_v6", "log_rate_v4", "log_rate_v6"], out[:2000]


def test_refused_transaction_changes_nothing(netns):
    good = replace_table(render_table(plan_of(), {}, 0.0, RenderOptions(1, 10053, "reject")))
    nft(netns, good)
    before = listing(netns)
    bad = good.replace("goto deny\n", "goto no_such_chain\n", 1)
    assert bad != good
    r = nft(netns, bad, check=False)
    assert r.returncode != 0
    assert listing(netns) == before
