"""The shim's answer cache, end to end: dig from a workload against the real shim and dnsmasq.

A repeated query is answered from the cache (no upstream query), with its TTL counted down, and
its IPs are in the workspace's set while the answer is served; a policy change empties the cache
so a name the new policy denies is denied at once; the rate limit still applies to hits. Each
guarantee is checked with the default rate limit and with none ([dns] rate_limit_qps = 0), where
a hit is answered by the shim's UDP handler straight from the cache's entries."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from egressd.lab import world

P = "/api/2.0"
LIMITED = pytest.param(None, id="rate-limit")
UNLIMITED = pytest.param({"rate_limit_qps": 0}, id="no-rate-limit")


def dig(env, name: str):
    # +nocookie: dig sends a fresh random EDNS client cookie per run, and the cache is keyed on the
    # query's bytes (a resolver keeps its cookie, and the glibc stub and dnsperf send none).
    return env.lab.dig(env.w1, name, extra=["+nocookie"])


def _metric(env, name: str) -> float:
    status, text = env.api("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def _repeat(env, name: str, n: int) -> str:
    """``n`` identical queries for ``name`` from w1, as fast as one dig sends them; its output."""
    batch = Path(env.lab.tmpdir) / "hits.txt"
    batch.write_text(f"{name} A\n" * n)
    cmd = ["dig", "+nocookie", "+time=1", "+tries=1", "+noall", "+comments", "-f", str(batch)]
    return env.lab.run(env.w1, cmd, timeout=60).stdout


def _event(env, kind: str) -> float:
    return _metric(env, f'egressd_dns_events_total{{kind="{kind}"}}')


@pytest.mark.parametrize("env", [LIMITED, UNLIMITED], indirect=True)
def test_repeat_is_served_from_cache_with_ttl_counted_down_and_ips_in_the_set(env):
    first = dig(env, "files.pythonhosted.org")
    assert first.status == "NOERROR" and first.addresses == ["198.51.100.11"], first.output
    hits = _event(env, "cache_hits")
    time.sleep(2.2)
    again = dig(env, "files.pythonhosted.org")
    assert again.status == "NOERROR" and again.addresses == ["198.51.100.11"], again.output
    assert _event(env, "cache_hits") == hits + 1
    # Served with the TTL counted down by the entry's age (dnsmasq's local TTL is 60).
    assert first.ttls[0] - again.ttls[0] >= 2, (first.ttls, again.ttls)
    # The IP is in the kernel set while the answer is served, with at least that TTL left.
    listing = env.nft("-j", "list", "set", "inet", "egressd", "ws_1001_dyn4")
    assert "198.51.100.11" in listing
    code, _out, _ = env.lab.curl(env.w1, "http://files.pythonhosted.org/")
    assert code == 200


@pytest.mark.parametrize("env", [LIMITED, UNLIMITED], indirect=True)
def test_a_policy_change_empties_the_cache_and_a_newly_denied_name_is_denied(env):
    assert dig(env, "pypi.org").status == "NOERROR"
    hits = _event(env, "cache_hits")
    assert dig(env, "pypi.org").status == "NOERROR"
    assert _event(env, "cache_hits") == hits + 1
    doc = world.policy("restricted-etl")
    allowed = doc["egress"]["network_access"]["allowed_internet_destinations"]
    doc["egress"]["network_access"]["allowed_internet_destinations"] = [
        d for d in allowed if d["destination"] != "pypi.org"]
    status, body = env.api("PUT", f"{P}/network-policies/restricted-etl", doc)
    assert status == 200, body
    try:
        hits = _event(env, "cache_hits")
        r = dig(env, "pypi.org")
        assert r.status == "NXDOMAIN" and r.ede_code == 15, r.output
        assert _event(env, "cache_hits") == hits
    finally:
        status, body = env.api("PUT", f"{P}/network-policies/restricted-etl", world.policy("restricted-etl"))
        assert status == 200, body
    assert dig(env, "pypi.org").status == "NOERROR"


@pytest.mark.parametrize("env", [LIMITED], indirect=True)
def test_cache_hits_still_pass_the_rate_limit(env):
    assert dig(env, "raw.githubusercontent.com").status == "NOERROR"
    limited = _metric(env, 'egressd_dns_rate_limited_total{workspace_id="1001"}')
    # Over the default per-workload budget (a burst of 1,000, then 500/s).
    out = _repeat(env, "raw.githubusercontent.com", 3000)
    assert out.count("status: REFUSED") > 0, out[-1500:]
    assert out.count("status: NOERROR") > 0
    assert _metric(env, 'egressd_dns_rate_limited_total{workspace_id="1001"}') > limited


@pytest.mark.parametrize("env", [UNLIMITED], indirect=True)
def test_without_a_rate_limit_every_hit_is_answered(env):
    assert dig(env, "raw.githubusercontent.com").status == "NOERROR"
    hits = _event(env, "cache_hits")
    out = _repeat(env, "raw.githubusercontent.com", 3000)
    assert out.count("status: NOERROR") == 3000 and "REFUSED" not in out, out[-1500:]
    assert _event(env, "cache_hits") == hits + 3000
