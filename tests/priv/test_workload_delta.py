"""A change of workloads only goes into the kernel as a delta (the workload elements that differ and
the generation marker), against real nftables in a throw-away namespace: the result is the table a
whole re-render gives, the cached IPs stay as they are, and a delta the kernel refuses falls back to
the whole table."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import subprocess

import pytest

from egressd.core.config import config_from_dict
from egressd.core.policy import default_policy, parse_policy
from egressd.core.workloads import Workload
from egressd.engine import Engine, State, Target
from egressd.lab import world

WORKLOAD_OBJECTS = ("workload_verdict_v4", "workload_verdict_v6", "workload_src_v4", "workload_src_v6")
CFG = {"dns": {"upstreams": ["203.0.113.2"]}}


def members(ns, name: str) -> set[str]:
    """The elements of a set or map of the egressd table, as nft lists them."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "list", "map" if "verdict" in name else "set",
                          "inet", "egressd", name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"elements = \{(.*?)\}", out, re.S)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def _no_expiry(element: str) -> str:
    return re.sub(r" expires \S+", "", element)


def workload_objects(ns) -> dict[str, set[str]]:
    return {name: members(ns, name) for name in WORKLOAD_OBJECTS}


def kernel_generation(ns) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "list", "table", "inet", "egressd"],
                         capture_output=True, text=True, check=True).stdout
    gens = re.findall(r'comment "egressd generation=(\d+)"', out)
    assert len(gens) == 1, out  # one marker, never a stale second one
    return int(gens[0])


def wl(wid: str, ws: str, product: str, *nets: str) -> Workload:
    return Workload(wid, ws, product, tuple(ipaddress.ip_network(n) for n in nets))


POLICIES = {
    "default-policy": default_policy(),
    "restricted-etl": parse_policy(world.policy("restricted-etl")),
    "dry": parse_policy(world.policy("dry", dry_run=True)),
}
BINDINGS = {"1000": "restricted-etl", "1001": "dry"}


def before() -> list[Workload]:
    out = [wl(f"w{i}", str(1000 + i % 3), "APPS", f"10.77.{i // 200}.{i % 200 + 1}/32", f"2001:db8:77::{i + 1:x}/128")
           for i in range(600)]
    out.append(wl("net", "1000", "APPS", "10.78.0.0/24"))
    out.append(wl("range6", "1001", "APPS", "2001:db8:78::/64"))
    return out


def after() -> list[Workload]:
    keep = [w for w in before() if w.workload_id not in {"w3", "w4", "w5", "net"}]  # removed
    moved = [wl("w6", "1001", "APPS", "10.77.0.7/32", "2001:db8:77::7/128")]  # was in 1000: a new verdict
    keep = [w for w in keep if w.workload_id != "w6"] + moved
    keep += [wl("half-a", "1001", "APPS", "10.78.0.0/25"), wl("half-b", "1002", "APPS", "10.78.0.128/25")]  # take over "net"
    keep += [wl(f"n{i}", "1000", "APPS", f"10.79.0.{i + 1}/32") for i in range(50)]  # new
    return keep


def state(workloads: list[Workload]) -> State:
    return State(POLICIES, BINDINGS, tuple(workloads))


@pytest.fixture
def engine(scratch_ns):
    e = Engine(config_from_dict(CFG), scratch_ns.nft)
    e.apply(state(before()), reason="test")
    assert e.last_apply_scope == "table"
    return e


def test_workload_change_is_a_delta_equal_to_the_whole_table(scratch_ns, engine) -> None:
    asyncio.run(engine.program(Target("1000", "pypi.org"), (("198.51.100.7", 300), ("2001:db8:1::7", 300))))
    cached = members(scratch_ns, "ws_1000_dyn4")
    gen = engine.generation
    assert kernel_generation(scratch_ns) == gen

    engine.apply(state(after()), reason="workloads")
    assert engine.last_apply_scope == "delta"
    assert engine.generation == kernel_generation(scratch_ns) == gen + 1
    by_delta = workload_objects(scratch_ns)
    assert "10.77.0.7 : goto ws_1001_dry" in by_delta["workload_verdict_v4"]
    assert "10.78.0.0/25 : goto ws_1001_dry" in by_delta["workload_verdict_v4"]
    assert "10.78.0.128/25 : accept" in by_delta["workload_verdict_v4"]
    assert "10.78.0.0/24" not in by_delta["workload_src_v4"] and "10.77.0.4" not in by_delta["workload_src_v4"]
    # The cached IP was not re-added: its element is the one programmed (same timeout; the time
    # left runs on), where a re-render would set the timeout to what is left.
    assert {_no_expiry(e) for e in members(scratch_ns, "ws_1000_dyn4")} == {_no_expiry(e) for e in cached}

    # A new engine's first apply replaces the whole table: the same workload elements.
    whole = Engine(config_from_dict(CFG), scratch_ns.nft)
    whole.generation = engine.generation
    whole.apply(state(after()), reason="whole")
    assert whole.last_apply_scope == "table"
    assert workload_objects(scratch_ns) == by_delta
    assert all(by_delta.values())


def test_a_refused_delta_falls_back_to_the_whole_table(scratch_ns, engine) -> None:
    # Somebody removed an element by hand: deleting it again is refused, the table is rebuilt.
    scratch_ns.nft.run("delete element inet egressd workload_src_v4 { 10.77.0.4 }")
    engine.apply(state(after()), reason="workloads")
    assert engine.last_apply_scope == "table"
    assert kernel_generation(scratch_ns) == engine.generation
    assert "10.79.0.50" in members(scratch_ns, "workload_src_v4")


def test_a_policy_change_replaces_the_whole_table(scratch_ns, engine) -> None:
    engine.apply(State(POLICIES, {**BINDINGS, "1002": "dry"}, tuple(before())), reason="binding")
    assert engine.last_apply_scope == "table"
    assert "10.77.0.3 : goto ws_1002_dry" in members(scratch_ns, "workload_verdict_v4")
    engine.apply(State(POLICIES, {**BINDINGS, "1002": "dry"}, tuple(after())), reason="workloads")
    assert engine.last_apply_scope == "delta"
    assert kernel_generation(scratch_ns) == engine.generation


def test_adopt_reads_the_generation_a_delta_left(scratch_ns, engine) -> None:
    engine.apply(state(after()), reason="workloads")
    engine.apply(state(before()), reason="workloads back")
    assert engine.last_apply_scope == "delta"
    again = Engine(config_from_dict(CFG), scratch_ns.nft)
    again.adopt()
    assert again.generation == engine.generation


def _edited() -> dict:
    """restricted-etl, edited: a name withdrawn, one IP_RANGE replaced and two added (IPv4, IPv6),
    a blocked range added, and dry run for every product."""
    doc = world.policy("restricted-etl", dry_run=True)
    access = doc["egress"]["network_access"]
    access["allowed_internet_destinations"] = [
        d for d in access["allowed_internet_destinations"]
        if d["destination"] not in ("files.pythonhosted.org", "203.0.113.128/25")
    ] + [{"destination": d, "internet_destination_type": "IP_RANGE"}
         for d in ("203.0.113.0/26", "192.0.2.0/24", "2001:db8:ee::/48", "198.51.100.77/32", "2001:db8:ef::1/128")]
    access["blocked_internet_destinations"].append({"destination": "203.0.113.7/32", "internet_destination_type": "IP_RANGE"})
    return doc


POLICY_SETS = ("ws_1000_net4", "ws_1000_net6", "ws_1000_host4", "ws_1000_host6", "ws_1000_blk4", "ws_1000_blk6")


def test_a_policy_edit_is_a_delta_equal_to_the_whole_table(scratch_ns, engine) -> None:
    asyncio.run(engine.program(Target("1000", "pypi.org"), (("198.51.100.7", 300), ("2001:db8:1::7", 300))))
    asyncio.run(engine.program(Target("1000", "files.pythonhosted.org"), (("198.51.100.8", 300), ("2001:db8:1::8", 300))))
    assert {"198.51.100.7", "198.51.100.8"} <= {e.split()[0] for e in members(scratch_ns, "ws_1000_dyn4")}
    policies = {**POLICIES, "restricted-etl": parse_policy(_edited())}
    gen = engine.generation

    engine.apply(State(policies, BINDINGS, tuple(before())), reason="policy edit")
    assert engine.last_apply_scope == "delta"
    assert engine.generation == kernel_generation(scratch_ns) == gen + 1
    by_delta = {name: members(scratch_ns, name) for name in POLICY_SETS + WORKLOAD_OBJECTS}
    assert by_delta["ws_1000_net4"] == {"192.0.2.0/24", "203.0.113.0/26"}
    assert by_delta["ws_1000_blk4"] == {"203.0.113.7"}
    assert "2001:db8:ee::/48" in by_delta["ws_1000_net6"]
    # the lab policy's 192.0.2.237/32 merged into the new 192.0.2.0/24; its /128 stays single
    assert by_delta["ws_1000_host4"] == {"198.51.100.77"}
    assert by_delta["ws_1000_host6"] == {"2001:db8:ef::1", "2001:db8:ff:1::237"}
    assert "10.77.0.1 : goto ws_1000_dry" in by_delta["workload_verdict_v4"]  # w0: enforced before
    # The withdrawn name's IPs left the timeout sets; the allowed name's stayed, untouched.
    assert {e.split()[0] for e in members(scratch_ns, "ws_1000_dyn4")} == {"198.51.100.7"}
    assert {e.split()[0] for e in members(scratch_ns, "ws_1000_dyn6")} == {"2001:db8:1::7"}

    # A new engine's first apply replaces the whole table: the same policy sets and workload elements.
    whole = Engine(config_from_dict(CFG), scratch_ns.nft)
    whole.generation = engine.generation
    whole.apply(State(policies, BINDINGS, tuple(before())), reason="whole")
    assert whole.last_apply_scope == "table"
    assert {name: members(scratch_ns, name) for name in POLICY_SETS + WORKLOAD_OBJECTS} == by_delta


def test_a_policy_edit_deletes_ips_the_kernel_already_timed_out(scratch_ns, engine) -> None:
    # The kernel times out an entry the cache still holds: the delete of the withdrawn IP must
    # not fail on it (the delta adds it first), so the edit stays a delta.
    asyncio.run(engine.program(Target("1000", "files.pythonhosted.org"), (("198.51.100.8", 300),)))
    scratch_ns.nft.run("delete element inet egressd ws_1000_dyn4 { 198.51.100.8 }")
    engine.apply(State({**POLICIES, "restricted-etl": parse_policy(_edited())}, BINDINGS, tuple(before())), reason="edit")
    assert engine.last_apply_scope == "delta"
    assert "198.51.100.8" not in " ".join(members(scratch_ns, "ws_1000_dyn4"))
