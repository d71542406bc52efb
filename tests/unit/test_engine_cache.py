"""Engine.apply and the IP cache: an unchanged compiled policy keeps a workspace's entries as they
are (shared, not copied), a changed one withdraws what it no longer allows, and a failed apply
leaves the cache it had. The kernel side is a recording stand-in: this is about the engine's state."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from structlog.testing import capture_logs

from egressd.core.config import config_from_dict
from egressd.core.connections import parse_connections
from egressd.core.policy import default_policy, parse_policy
from egressd.core.workloads import Workload
from egressd.engine import Engine, State, Target
from egressd.errors import ApplyError
from egressd.lab import world


class _Nft:
    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail = False

    def run(self, script: str) -> None:
        if self.fail:
            raise ApplyError("refused")
        self.scripts.append(script)


def _wl(i: int, ws: str = "1001") -> Workload:
    return Workload(f"w{i}", ws, "GENERAL_COMPUTE", (ipaddress.ip_network(f"10.77.1.{i}/32"),))


def _state(policies: dict, n: int = 1) -> State:
    return State(policies, {"1001": "restricted-etl"}, tuple(_wl(i) for i in range(1, n + 1)))


@pytest.fixture
def engine() -> tuple[Engine, _Nft, dict]:
    nft = _Nft()
    e = Engine(config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}}), nft=nft,  # type: ignore[arg-type]
               clock=lambda: 1000.0)
    policies = {"default-policy": default_policy(), "restricted-etl": parse_policy(world.policy("restricted-etl"))}
    e.apply(_state(policies), reason="test")
    for i, name in enumerate(("pypi.org", "a.githubusercontent.com", "docs.pypi.org")):
        asyncio.run(e.program(Target("1001", name), ((f"198.51.100.{i + 1}", 60),)))
    return e, nft, policies


def _names(e: Engine) -> dict[str, str]:
    return {x.ip: x.name for x in e.cache.entries("1001", e.clock())}


def test_same_policy_keeps_the_entries_without_copying(engine) -> None:
    e, nft, policies = engine
    table = e.cache._ws["1001"]
    e.apply(_state(policies, n=50), reason="more workloads")
    assert e.cache._ws["1001"] is table
    assert _names(e) == {"198.51.100.1": "pypi.org", "198.51.100.2": "a.githubusercontent.com",
                         "198.51.100.3": "docs.pypi.org"}
    # Workloads only: a delta of their elements and the generation, the cached IPs untouched.
    assert e.last_apply_scope == "delta"
    delta = nft.scripts[-1]
    assert delta.startswith("delete set inet egressd generation\n") and "198.51.100" not in delta
    assert "10.77.1.2/32 : goto ws_1001_enf," in delta and "add element inet egressd workload_src_v4 {" in delta
    assert "10.77.1.1/32" not in delta  # the one workload already there is not rendered again


def test_changed_policy_withdraws_what_it_no_longer_allows(engine) -> None:
    e, nft, policies = engine
    doc = world.policy("restricted-etl")
    allowed = doc["egress"]["network_access"]["allowed_internet_destinations"]
    doc["egress"]["network_access"]["allowed_internet_destinations"] = [
        d for d in allowed if d["destination"] != "*.githubusercontent.com"]
    table = e.cache._ws["1001"]
    e.apply(_state({**policies, "restricted-etl": parse_policy(doc)}), reason="narrower")
    assert e.cache._ws["1001"] is not table
    assert _names(e) == {"198.51.100.1": "pypi.org", "198.51.100.3": "docs.pypi.org"}
    # The same workspaces: a delta that takes the withdrawn IP out of the timeout set (added
    # first, so that the delete cannot fail on an entry the kernel has just timed out) and
    # leaves the two still allowed alone.
    assert e.last_apply_scope == "delta"
    delta = nft.scripts[-1]
    assert "add element inet egressd ws_1001_dyn4 { 198.51.100.2 }\n" in delta
    assert "delete element inet egressd ws_1001_dyn4 { 198.51.100.2 }\n" in delta
    assert "198.51.100.1" not in delta and "198.51.100.3" not in delta


def test_an_equal_policy_object_is_not_the_same_compiled_policy(engine) -> None:
    # A re-parsed, equal policy compiles anew (the engine caches by identity), so its entries are
    # checked again rather than shared; the admin keeps unchanged baked objects to avoid this.
    e, _nft, policies = engine
    table = e.cache._ws["1001"]
    e.apply(_state({**policies, "restricted-etl": parse_policy(world.policy("restricted-etl"))}), reason="reparsed")
    assert e.cache._ws["1001"] is not table and len(_names(e)) == 3


def test_failed_apply_leaves_the_cache_and_generation(engine) -> None:
    e, nft, policies = engine
    cache, gen = e.cache, e.generation
    nft.fail = True
    with pytest.raises(ApplyError):
        e.apply(_state(policies, n=5), reason="fails")
    assert e.cache is cache and e.generation == gen and len(_names(e)) == 3
    nft.fail = False
    asyncio.run(e.program(Target("1001", "files.pythonhosted.org"), (("198.51.100.9", 60),)))
    e.apply(_state(policies, n=5), reason="works")
    assert len(_names(e)) == 4


def _conns(*hosts: str):
    return parse_connections({"connections": [
        {"name": f"c{i}", "connection_type": "POSTGRESQL", "host": h, "port": 5432} for i, h in enumerate(hosts)],
        "external_locations": []})


def test_connections_keep_their_compiled_policy_while_unchanged(engine) -> None:
    # A workspace with connections compiles its policy with extras: the same extras give the
    # same compiled object, so its cached IPs are shared and a workload change is a delta.
    e, nft, policies = engine
    conns = {"1001": _conns("db.example.com", "198.51.100.50")}
    e.apply(State(policies, {"1001": "restricted-etl"}, (_wl(1),), conns), reason="connections")
    assert e.last_apply_scope == "delta"
    assert "add element inet egressd ws_1001_host4 { 198.51.100.50 }" in nft.scripts[-1]
    compiled, table = e.plan.workspaces["1001"].compiled, e.cache._ws["1001"]
    e.apply(State(policies, {"1001": "restricted-etl"}, (_wl(1), _wl(2)), dict(conns)), reason="a workload")
    assert e.plan.workspaces["1001"].compiled is compiled and e.cache._ws["1001"] is table
    assert e.last_apply_scope == "delta"
    # Other connections: compiled anew, the old compiled form let go; the same workspaces, so a
    # delta that takes the connection's address out of the workspace's set of single addresses.
    e.apply(State(policies, {"1001": "restricted-etl"}, (_wl(1), _wl(2)), {"1001": _conns("db.example.com")}),
            reason="fewer connections")
    assert e.plan.workspaces["1001"].compiled is not compiled and e.last_apply_scope == "delta"
    assert "delete element inet egressd ws_1001_host4 { 198.51.100.50 }" in nft.scripts[-1]
    assert all(cp is not compiled for _p, cp in e._compiled.values())
    assert len(_names(e)) == 3


def test_a_refused_delta_falls_back_to_the_whole_table(engine) -> None:
    e, nft, policies = engine

    class RefusesDeltas:
        def run(self, script: str) -> None:
            if script.startswith("delete set inet egressd generation"):
                raise ApplyError("Could not process rule: No such file or directory")
            nft.run(script)

    e.nft = RefusesDeltas()  # type: ignore[assignment]
    gen = e.generation
    e.apply(_state(policies, n=3), reason="more workloads")
    assert e.last_apply_scope == "table" and e.generation == gen + 1
    assert "198.51.100.2" in nft.scripts[-1] and "10.77.1.3/32 : goto ws_1001_enf" in nft.scripts[-1]


def _ranges_policy(shift: int, n: int) -> dict:
    doc = world.policy("restricted-etl")
    doc["egress"]["network_access"]["allowed_internet_destinations"] += [
        {"destination": f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}/32", "internet_destination_type": "IP_RANGE"}
        for j in range(shift, 2 * n, 2)]
    return doc


def test_a_policy_edit_that_would_refill_big_range_sets_replaces_the_table(engine) -> None:
    # 12,000 ranges added, then every one of them changed: a delta would make libnftables read
    # the old ones back and add (or re-add) them all, where a new table takes less time.
    e, nft, policies = engine
    e.apply(_state({**policies, "restricted-etl": parse_policy(_ranges_policy(0, 12_000))}), reason="big")
    assert e.last_apply_scope == "table"
    e.apply(_state({**policies, "restricted-etl": parse_policy(_ranges_policy(1, 12_000))}), reason="all moved")
    assert e.last_apply_scope == "table" and nft.scripts[-1].startswith("table inet egressd\ndelete table")
    # One changed among them: a delta of that one.
    doc = _ranges_policy(1, 12_000)
    doc["egress"]["network_access"]["allowed_internet_destinations"].pop()
    e.apply(_state({**policies, "restricted-etl": parse_policy(doc)}), reason="one fewer")
    assert e.last_apply_scope == "delta"
    assert "delete element inet egressd ws_1001_host4 { 10.0.93.191 }" in nft.scripts[-1]


def test_gc_pause_lasts_until_the_loop_turns() -> None:
    import asyncio
    import gc

    from egressd.admin import pause_gc_until_idle

    async def main() -> list[bool]:
        seen = []
        pause_gc_until_idle()
        seen.append(gc.isenabled())
        pause_gc_until_idle()  # found off: schedules nothing more
        seen.append(gc.isenabled())
        await asyncio.sleep(0)
        seen.append(gc.isenabled())
        return seen

    assert gc.isenabled()
    assert asyncio.run(main()) == [False, False, True]

    async def last_step() -> bool:
        pause_gc_until_idle()
        return gc.isenabled()  # the loop ends here: its shutdown still runs the callback

    assert asyncio.run(last_step()) is False
    assert gc.isenabled()
    gc.disable()
    try:
        async def found_off() -> bool:
            pause_gc_until_idle()  # someone else turned it off: left to them
            await asyncio.sleep(0)
            return gc.isenabled()
        assert asyncio.run(found_off()) is False
    finally:
        gc.enable()


def test_an_apply_retires_what_it_replaced_until_taken_or_the_next_apply(engine) -> None:
    e, _nft, policies = engine
    doc = world.policy("restricted-etl")
    doc["egress"]["network_access"]["allowed_internet_destinations"].append({"destination": "new.example"})
    old_cache = e.cache
    e.apply(_state({**policies, "restricted-etl": parse_policy(doc)}), reason="edit", keep_retired=True)
    retired = e.take_retired()
    assert any(isinstance(x, tuple) and old_cache in x for x in retired)
    assert e.take_retired() == []
    e.apply(_state(policies), reason="back", keep_retired=True)
    assert e._retired  # held until taken ...
    e.apply(_state(policies), reason="again", keep_retired=True)
    assert all(old_cache not in x for x in e._retired if isinstance(x, tuple))  # ... or the next apply
    e.apply(_state(policies), reason="not kept")
    assert e._retired == []  # an apply that does not keep them frees them itself (a start, a SIGHUP)


def test_a_policy_edit_withdrawing_many_cached_ips_replaces_the_table(engine) -> None:
    # 12,000 cached IPs whose name the edit withdraws: an add and a delete each as a delta
    # (withdrawing 100,000 took 1.7 s that way, 0.6 s as a new table).
    e, nft, policies = engine
    for i in range(12_000):
        e.cache.adopt("1001", f"10.9.{i >> 8}.{i & 255}", f"x{i}.githubusercontent.com", e.clock() + 600)
    doc = world.policy("restricted-etl")
    access = doc["egress"]["network_access"]
    access["allowed_internet_destinations"] = [
        d for d in access["allowed_internet_destinations"] if d["destination"] != "*.githubusercontent.com"]
    e.apply(_state({**policies, "restricted-etl": parse_policy(doc)}), reason="narrower")
    assert e.last_apply_scope == "table" and nft.scripts[-1].startswith("table inet egressd\ndelete table")
    assert "10.9.0.1" not in nft.scripts[-1] and _names(e) == {"198.51.100.1": "pypi.org", "198.51.100.3": "docs.pypi.org"}


def test_the_gate_runs_before_the_kernel_and_a_failing_gate_changes_nothing(engine) -> None:
    e, nft, policies = engine
    seen: list[int] = []
    gen = e.generation
    e.apply(_state(policies, n=3), reason="gated", before_kernel=lambda: seen.append(len(nft.scripts)))
    assert seen == [len(nft.scripts) - 1] and e.generation == gen + 1  # once, right before the one transaction

    class Refused(Exception):
        pass

    def refuse() -> None:
        raise Refused

    before = list(nft.scripts)
    with pytest.raises(Refused):
        e.apply(_state(policies, n=5), reason="gate refuses", before_kernel=refuse)
    assert nft.scripts == before and e.generation == gen + 1
    e.apply(_state(policies, n=5), reason="no gate")  # a later apply is not held by the old gate
    assert e.generation == gen + 2


def test_expiry_deletes_without_the_raw_writer_go_through_libnftables_and_failures_fall_back() -> None:
    t = [1000.0]
    nft = _Nft()
    e = Engine(config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}}), nft=nft,  # type: ignore[arg-type]
               clock=lambda: t[0])
    policies = {"default-policy": default_policy(), "restricted-etl": parse_policy(world.policy("restricted-etl"))}
    e.apply(_state(policies), reason="test")
    asyncio.run(e.program(Target("1001", "pypi.org"), (("198.51.100.1", 60), ("2001:db8::1", 60))))
    t[0] += 62
    assert e.expire() == 2
    assert nft.scripts[-1].splitlines() == [
        "add element inet egressd ws_1001_dyn4 { 198.51.100.1 }",
        "delete element inet egressd ws_1001_dyn4 { 198.51.100.1 }",
        "add element inet egressd ws_1001_dyn6 { 2001:db8::1 }",
        "delete element inet egressd ws_1001_dyn6 { 2001:db8::1 }",
    ]
    assert e.counters["expired_deleted"] == 2 and e.counters["expire_delete_errors"] == 0
    # Refused deletes: counted, warned about once a minute, and the IPs still leave the cache (the
    # kernel's timeout removes them GRACE seconds later).
    asyncio.run(e.program(Target("1001", "pypi.org"), (("198.51.100.20", 60),)))
    t[0] += 10
    asyncio.run(e.program(Target("1001", "pypi.org"), (("198.51.100.21", 60),)))
    nft.fail = True
    with capture_logs() as logs:
        t[0] += 52  # the first is due
        assert e.expire() == 1
        t[0] += 10  # the second is due, 10 s after the first warning
        assert e.expire() == 1
    nft.fail = False
    assert e.counters["expire_delete_errors"] == 2 and e.counters["expired_deleted"] == 2
    warned = [x for x in logs if x["event"] == "expired_delete_failed"]
    assert len(warned) == 1 and warned[0]["ips"] == 1 and warned[0]["failures"] == 1
    assert e.cache.size("1001") == 0
