"""The per-workload DNS query rate limit: the pure token buckets, the config keys, and
Engine.classify refusing a workload over its limit before any policy work."""

from __future__ import annotations

import ipaddress

import pytest
from egressd.core.config import config_from_dict
from egressd.core.dnsmsg import EDE_OTHER, REFUSED, Query
from egressd.core.plan import build_plan
from egressd.core.policy import default_policy, parse_policy
from egressd.core.ratelimit import TokenBuckets
from egressd.core.workloads import Workload
from egressd.engine import Engine
from egressd.errors import ValidationError
from egressd.lab import world
from hypothesis import given, settings
from hypothesis import strategies as st

# --- TokenBuckets ------------------------------------------------------------------------------


def test_a_new_key_gets_the_burst_then_the_rate() -> None:
    b = TokenBuckets(rate=10, burst=20)
    assert sum(b.allow("w", 100.0) for _ in range(50)) == 20
    assert not b.allow("w", 100.05)  # half a token
    assert b.allow("w", 100.1)  # one token after 0.1 s at 10/s
    assert not b.allow("w", 100.1)
    # One second later: ten more, never more than the burst.
    assert sum(b.allow("w", 101.1) for _ in range(50)) == 10
    assert sum(b.allow("w", 1000.0) for _ in range(50)) == 20


def test_keys_are_independent() -> None:
    b = TokenBuckets(rate=1, burst=3)
    assert [b.allow("flood", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert [b.allow("quiet", 0.0) for _ in range(3)] == [True, True, True]


@pytest.mark.parametrize("rate,burst", [(0, 100), (100, 0), (0, 0)])
def test_zero_disables(rate: int, burst: int) -> None:
    b = TokenBuckets(rate, burst)
    assert not b.enabled
    assert all(b.allow("w", 0.0) for _ in range(10_000))
    assert len(b) == 0


def test_time_going_backwards_takes_nothing_back() -> None:
    b = TokenBuckets(rate=10, burst=2)
    assert b.allow("w", 5.0) and b.allow("w", 5.0) and not b.allow("w", 5.0)
    assert not b.allow("w", 4.0)  # no refill for a clock step backwards
    assert b.allow("w", 5.1)


def test_full_buckets_are_swept_so_gone_workloads_leave_no_state() -> None:
    b = TokenBuckets(rate=100, burst=200)  # sweep every 2 s
    for i in range(1000):
        b.allow(f"w{i}", 0.0)
    assert len(b) == 1000
    # 2 s later every one of them has refilled; the next query sweeps them out.
    assert b.allow("live", 2.5)
    assert len(b) == 1
    # A bucket that is not full yet survives a sweep.
    for _ in range(200):
        b.allow("busy", 4.0)
    assert b.sweep(4.5) == 1  # "live" went, "busy" stays (it has 50 of 200 tokens)
    assert len(b) == 1 and b.allow("busy", 4.5)


def test_max_keys_is_a_hard_cap() -> None:
    b = TokenBuckets(rate=1, burst=10, max_keys=100)
    for i in range(10_000):
        b.allow(f"w{i}", 0.0)
    assert len(b) == 100


def test_retain_drops_buckets_of_keys_no_longer_live() -> None:
    b = TokenBuckets(rate=1, burst=1)
    for k in ("a", "b", "c"):
        b.allow(k, 0.0)
    b.retain(["b"])
    assert len(b) == 1 and not b.allow("b", 0.0) and b.allow("a", 0.0)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(-1, 1)
    with pytest.raises(ValueError):
        TokenBuckets(1, 1, max_keys=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1, 1000),
    burst=st.integers(1, 2000),
    gaps=st.lists(st.floats(0, 0.05, allow_nan=False), min_size=1, max_size=400),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate: int, burst: int, gaps: list[float]) -> None:
    """In any window [t0, t1], at most burst + rate * (t1 - t0) queries are allowed."""
    b = TokenBuckets(rate, burst)
    now, times = 0.0, []
    for g in gaps:
        now += g
        if b.allow("w", now):
            times.append(now)
    for i, t0 in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - t0) + 1e-6


# --- config -------------------------------------------------------------------------------------

UP = {"upstreams": ["203.0.113.2"]}


def test_config_defaults() -> None:
    dns = config_from_dict({"dns": UP}).dns
    assert (dns.rate_limit_qps, dns.rate_limit_burst, dns.max_inflight) == (500, 1000, 2048)


def test_config_values_and_errors() -> None:
    dns = config_from_dict({"dns": {**UP, "rate_limit_qps": 0, "rate_limit_burst": 5, "max_inflight": 1}}).dns
    assert (dns.rate_limit_qps, dns.rate_limit_burst, dns.max_inflight) == (0, 5, 1)
    with pytest.raises(ValidationError) as e:
        config_from_dict({"dns": {**UP, "rate_limit_qps": -1, "rate_limit_burst": "x", "max_inflight": 0}})
    assert {err.path for err in e.value.errors} == {"dns.rate_limit_qps", "dns.rate_limit_burst", "dns.max_inflight"}


# --- Engine.classify -------------------------------------------------------------------------


def _wl(wid: str, ws: str, src: str) -> Workload:
    return Workload(wid, ws, "GENERAL_COMPUTE", (ipaddress.ip_network(src),))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(qps: int = 10, burst: int = 20) -> tuple[Engine, _Clock, list[str]]:
    cfg = config_from_dict({"dns": {**UP, "rate_limit_qps": qps, "rate_limit_burst": burst}})
    clock = _Clock()
    denied: list[str] = []
    e = Engine(cfg, nft=None, clock=clock, node_addresses=["10.99.0.1"],  # type: ignore[arg-type]
               on_denial=lambda wl, d, name: denied.append(name))
    policies = {"default-policy": default_policy(), "restricted-etl": parse_policy(world.policy("restricted-etl"))}
    e.plan = build_plan(policies, {"1001": "restricted-etl", "1002": "restricted-etl"},
                        [_wl("w1", "1001", "10.77.1.2/32"), _wl("w2", "1002", "10.77.2.2/32"),
                         _wl("w3", "1003", "10.77.3.2/32")])
    return e, clock, denied


def _q(name: str) -> Query:
    return Query(id=1, qname=name, qtype=1, qclass=1, has_edns=True, udp_size=1232, wire=b"")


def test_classify_refuses_a_workload_over_its_limit_before_policy() -> None:
    e, clock, denied = _engine()
    kinds = [e.classify("10.77.1.2", _q(f"n{i}.evil.example")).kind for i in range(25)]
    assert kinds == ["deny"] * 25
    assert len(denied) == 20  # only the 20 within the burst reached the policy (and made events)
    a = e.classify("10.77.1.2", _q("pypi.org"))  # allowed by policy, but over the limit
    assert (a.kind, a.rcode, a.ede_code, a.target) == ("deny", REFUSED, EDE_OTHER, None)
    assert "rate limited" in a.ede_text and "w1" in a.ede_text
    assert dict(e.dns_rate_limited) == {"1001": 6}
    # Other workloads are not affected, nor is the node, nor any full-access workload's own bucket.
    assert e.classify("10.77.2.2", _q("pypi.org")).kind == "forward"
    assert all(e.classify("10.99.0.1", _q(f"n{i}.x")).kind == "forward" for i in range(100))
    assert all(e.classify("10.77.3.2", _q(f"n{i}.x")).kind == "forward" for i in range(20))
    assert e.classify("10.77.3.2", _q("one.more")).kind == "deny"
    # Unregistered sources are ignored (never answered), not counted.
    assert e.classify("10.77.9.2", _q("pypi.org")).kind == "ignore"
    assert dict(e.dns_rate_limited) == {"1001": 6, "1003": 1}
    # 0.1 s later w1 has one token again.
    clock.now += 0.1
    assert e.classify("10.77.1.2", _q("pypi.org")).kind == "forward"
    assert e.classify("10.77.1.2", _q("pypi.org")).rcode == REFUSED


def test_classify_without_a_limit() -> None:
    e, _, denied = _engine(qps=0)
    assert all(e.classify("10.77.1.2", _q(f"n{i}.evil.example")).kind == "deny" for i in range(5000))
    assert len(denied) == 5000 and not e.dns_rate_limited
