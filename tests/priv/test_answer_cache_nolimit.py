"""The shim's answer cache with no per-workload rate limit ([dns] rate_limit_qps = 0), end to end.

Without a limit, a hit is answered by the shim's UDP handler straight from the cache's entries
(no call to admit()). The same guarantees hold there: the TTL is counted down, the IP is in the
set while the answer is served, and a policy change empties the cache at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from egressd.lab import world
from test_answer_cache import _event, dig

P = "/api/2.0"
pytestmark = pytest.mark.parametrize("env", [{"rate_limit_qps": 0}], indirect=True)


def test_hit_without_a_rate_limit_counts_the_ttl_down_with_the_ip_in_the_set(env):
    first = dig(env, "files.pythonhosted.org")
    assert first.status == "NOERROR" and first.addresses == ["198.51.100.11"], first.output
    hits = _event(env, "cache_hits")
    time.sleep(2.2)
    again = dig(env, "files.pythonhosted.org")
    assert again.status == "NOERROR" and again.addresses == ["198.51.100.11"], again.output
    assert _event(env, "cache_hits") == hits + 1
    assert first.ttls[0] - again.ttls[0] >= 2, (first.ttls, again.ttls)
    assert "198.51.100.11" in env.nft("-j", "list", "set", "inet", "egressd", "ws_1001_dyn4")
    code, _out, _ = env.lab.curl(env.w1, "http://files.pythonhosted.org/")
    assert code == 200


def test_a_policy_change_empties_the_cache_without_a_rate_limit(env):
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


def test_many_hits_without_a_rate_limit_are_all_answered(env):
    """3,000 identical queries as fast as one dig sends them: with no limit, none is REFUSED."""
    assert dig(env, "raw.githubusercontent.com").status == "NOERROR"
    hits = _event(env, "cache_hits")
    batch = Path(env.lab.tmpdir) / "hits.txt"
    batch.write_text("raw.githubusercontent.com A\n" * 3000)
    cp = env.lab.run(env.w1, ["dig", "+nocookie", "+time=1", "+tries=1", "+noall", "+comments", "-f", str(batch)], timeout=60)
    assert cp.stdout.count("status: NOERROR") == 3000, cp.stdout[-1500:]
    assert "REFUSED" not in cp.stdout
    assert _event(env, "cache_hits") == hits + 3000
