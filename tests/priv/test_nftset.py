"""The raw netlink writer of set elements, and Engine.program's batching, against real nftables in a
throw-away network namespace."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import time

import pytest

from egressd.core.config import config_from_dict
from egressd.core.ipcache import GRACE, MARGIN
from egressd.core import nfmsg
from egressd.core.nfmsg import Element
from egressd.core.policy import default_policy, parse_policy
from egressd.core.workloads import Workload
from egressd.engine import DELETE_BATCH, Engine, StaleGeneration, State, Target
from egressd.lab import world
from egressd.lab.kmem import element_kb, stock_socket_maxima
from egressd.netns import entered
from egressd.nftset import NftSetError, NftSetWriter

NO_DELETES = {"expired_deleted": 0, "expire_delete_errors": 0}
SETS = ("add table inet egressd\n"
        "add set inet egressd ws_a_dyn4 { type ipv4_addr; flags timeout; }\n"
        "add set inet egressd ws_a_dyn6 { type ipv6_addr; flags timeout; }\n")


@pytest.fixture
def writer(scratch_ns):
    with entered(scratch_ns.name):
        w = NftSetWriter()
    try:
        yield w
    finally:
        w.close()


def elements(ns, set_name: str) -> dict[str, dict]:
    """val -> element (timeout, expires, comment) of a set, from nft's JSON listing."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-j", "list", "set", "inet", "egressd", set_name],
                         capture_output=True, text=True, check=True).stdout
    for o in json.loads(out)["nftables"]:
        if "set" in o:
            # An element with neither timeout nor comment is listed as its bare value.
            return {e["elem"]["val"] if isinstance(e, dict) else e: e["elem"] if isinstance(e, dict) else {}
                    for e in o["set"].get("elem", [])}
    return {}


def test_elements_appear_with_timeouts_and_comments(scratch_ns, writer):
    scratch_ns.nft.run(SETS)
    writer.add({"ws_a_dyn4": [Element("192.0.2.1", 30, "a.example.com"), Element("192.0.2.2", 600, "b.example")],
                "ws_a_dyn6": [Element("2001:db8::1", 61, "v6.example")]})
    v4, v6 = elements(scratch_ns, "ws_a_dyn4"), elements(scratch_ns, "ws_a_dyn6")
    assert {k: (e["timeout"], e["comment"]) for k, e in v4.items()} == {
        "192.0.2.1": (30, "a.example.com"), "192.0.2.2": (600, "b.example")}
    assert {k: (e["timeout"], e["comment"]) for k, e in v6.items()} == {"2001:db8::1": (61, "v6.example")}
    assert 25 <= v4["192.0.2.1"]["expires"] <= 30
    # Adding again resets the timeout (add, delete, add), also to a shorter one.
    writer.add({"ws_a_dyn4": [Element("192.0.2.2", 40, "c.example")]})
    e = elements(scratch_ns, "ws_a_dyn4")["192.0.2.2"]
    assert (e["timeout"], e["comment"]) == (40, "c.example") and e["expires"] <= 40


def test_many_elements_in_one_batch(scratch_ns, writer):
    scratch_ns.nft.run(SETS)
    v4 = [Element(str(ipaddress.ip_address("198.51.100.0") + i), 100 + i % 7, f"n{i}.example") for i in range(100)]
    v4 += [Element(str(ipaddress.ip_address("203.0.113.0") + i), 200, "m.example") for i in range(200)]
    v6 = [Element(f"2001:db8:1::{i:x}", 300, "six.example") for i in range(600)]
    v4.append(Element("198.51.100.5", 900, "dup.example"))  # twice in one batch: the longer timeout wins
    sent = writer.add({"ws_a_dyn4": v4, "ws_a_dyn6": v6})
    assert sent == 3 * (2 + 3)  # chunks of 256: 300 v4 elements are 2 chunks, 600 v6 ones 3
    got4, got6 = elements(scratch_ns, "ws_a_dyn4"), elements(scratch_ns, "ws_a_dyn6")
    assert len(got4) == 300 and len(got6) == 600
    assert got4["198.51.100.5"]["timeout"] == 900 and got4["198.51.100.6"]["timeout"] == 106
    assert got6["2001:db8:1::257"]["comment"] == "six.example"


def test_missing_set_is_a_clear_error_and_changes_nothing(scratch_ns, writer):
    scratch_ns.nft.run(SETS)
    before = scratch_ns.ruleset()
    with pytest.raises(NftSetError) as ei:
        writer.add({"ws_a_dyn4": [Element("192.0.2.7", 30, "ok.example")],
                    "ws_gone_dyn4": [Element("192.0.2.8", 30, "bad.example")]})
    assert ei.value.set_name == "ws_gone_dyn4" and ei.value.errno == 2
    assert "ws_gone_dyn4" in str(ei.value) and "ENOENT" in str(ei.value)
    assert scratch_ns.ruleset() == before  # the good set's element did not go in either
    # No table at all: the same, and the writer still works afterwards.
    scratch_ns.nft.run("delete table inet egressd")
    with pytest.raises(NftSetError):
        writer.add({"ws_a_dyn4": [Element("192.0.2.7", 30, "ok.example")]})
    scratch_ns.nft.run(SETS)
    writer.add({"ws_a_dyn4": [Element("192.0.2.7", 30, "ok.example")]})
    assert set(elements(scratch_ns, "ws_a_dyn4")) == {"192.0.2.7"}


def test_dump_reads_back_what_nft_lists(scratch_ns, writer):
    scratch_ns.nft.run(SETS)
    v4 = [Element(str(ipaddress.ip_address("198.51.100.0") + i), 100 + i, f"n{i}.example") for i in range(200)]
    v4 += [Element(str(ipaddress.ip_address("203.0.113.0") + i), 3600, "") for i in range(200)]
    writer.add({"ws_a_dyn4": v4, "ws_a_dyn6": [Element("2001:db8::5", 61, "v6.example")]})
    scratch_ns.nft.run("add element inet egressd ws_a_dyn4 { 192.0.2.99 }")  # no timeout at all
    listed = elements(scratch_ns, "ws_a_dyn4")
    dumped = {d.ip: d for d in writer.dump("ws_a_dyn4")}  # 401 elements: several dump replies
    assert set(dumped) == set(listed) and len(dumped) == 401
    for ip, e in listed.items():
        d = dumped[ip]
        assert d.comment == e.get("comment", "")
        if "expires" in e:
            assert abs(d.expires_ms / 1000 - e["expires"]) < 2
        else:
            assert d.expires_ms is None
    assert [(d.ip, d.comment) for d in writer.dump("ws_a_dyn6")] == [("2001:db8::5", "v6.example")]
    with pytest.raises(NftSetError) as ei:
        writer.dump("ws_gone_dyn4")
    assert ei.value.errno == 2 and "reading set inet egressd ws_gone_dyn4" in str(ei.value)
    writer.add({"ws_a_dyn6": [Element("2001:db8::6", 61, "v6.example")]})  # the socket still works
    assert len(writer.dump("ws_a_dyn6")) == 2


def test_adopt_through_the_dump_matches_the_json_listing(scratch_ns, writer):
    cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}})
    first = Engine(cfg, scratch_ns.nft)
    first.apply(_state(), reason="test")
    v4 = [f"{net}.{i}" for net in ("192.0.2", "198.51.100", "203.0.113") for i in range(1, 251)]
    first.nft.run("add element inet egressd ws_1001_dyn4 { " + ", ".join(
        f"{ip} timeout 300s comment \"h{i}.githubusercontent.com\"" for i, ip in enumerate(v4)) + " }")
    first.nft.run("add element inet egressd ws_1001_dyn6 { " + ", ".join(
        f"2001:db8::{i:x} timeout 90s comment \"pypi.org\"" for i in range(1, 2252)) + " }")
    by_json, by_dump = Engine(cfg, scratch_ns.nft), Engine(cfg, scratch_ns.nft, nftset=writer)
    assert by_json.adopt() == by_dump.adopt() == 3001
    assert by_json.generation == by_dump.generation == first.generation
    now = by_json.clock()
    for ws in ("1001",):
        a = {e.ip: e for e in by_json.cache.entries(ws, now)}
        b = {e.ip: e for e in by_dump.cache.entries(ws, now)}
        assert set(a) == set(b) and len(a) == 3001
        assert all(a[ip].name == b[ip].name and abs(a[ip].expires - b[ip].expires) < 2 for ip in a)
    assert b["2001:db8::7"].name == "pypi.org" and b["203.0.113.250"].name == "h749.githubusercontent.com"


def test_adopt_falls_back_to_a_listing_when_the_dump_fails(scratch_ns, writer):
    class Failing(NftSetWriter):
        def __init__(self) -> None:  # no socket: dump() always fails
            pass

        def dump(self, set_name):
            raise NftSetError(set_name, 71, "reading")  # EPROTO

    cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}})
    first = Engine(cfg, scratch_ns.nft)
    first.apply(_state(), reason="test")
    first.nft.run("add element inet egressd ws_1001_dyn4 { 192.0.2.5 timeout 300s comment \"pypi.org\", "
                  "198.51.100.6 timeout 60s comment \"docs.pypi.org\" }")
    e = Engine(cfg, scratch_ns.nft, nftset=Failing())
    assert e.adopt() == 2 and e.generation == first.generation
    assert {x.ip: x.name for x in e.cache.entries("1001", e.clock())} == {
        "192.0.2.5": "pypi.org", "198.51.100.6": "docs.pypi.org"}


# --- Engine.program over the writer --------------------------------------------------------------

class CountingWriter(NftSetWriter):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[dict] = []

    def add(self, sets):
        self.batches.append({k: [e.ip for e in v] for k, v in sets.items()})
        return super().add(sets)


def _state(policy: str = "restricted-etl") -> State:
    policies = {"default-policy": default_policy(), policy: parse_policy(world.policy(policy))}
    wl = Workload("w1", "1001", "GENERAL_COMPUTE", (ipaddress.ip_network("10.77.1.2/32"),))
    return State(policies, {"1001": policy}, (wl,))


def _state_without(destination: str) -> State:
    """_state() with restricted-etl no longer allowing ``destination`` (a policy edit)."""
    doc = world.policy("restricted-etl")
    access = doc["egress"]["network_access"]
    access["allowed_internet_destinations"] = [d for d in access["allowed_internet_destinations"]
                                               if d["destination"] != destination]
    state = _state()
    return State({**state.policies, "restricted-etl": parse_policy(doc)}, state.bindings, state.workloads)


@pytest.fixture
def engine(scratch_ns):
    cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}})
    with entered(scratch_ns.name):
        w = CountingWriter()
    e = Engine(cfg, scratch_ns.nft, nftset=w)
    e.apply(_state(), reason="test")
    try:
        yield e
    finally:
        w.close()


async def test_concurrent_answers_are_one_batch_and_return_after_the_kernel_has_them(scratch_ns, engine):
    seen: dict[int, set[str]] = {}

    async def one(i: int) -> None:
        ip = f"198.51.100.{i + 1}"
        await engine.program(Target("1001", f"h{i}.githubusercontent.com"), ((ip, 60), (f"2001:db8::{i + 1:x}", 60)))
        seen[i] = set(elements(scratch_ns, "ws_1001_dyn4")) | set(elements(scratch_ns, "ws_1001_dyn6"))

    await asyncio.gather(*(one(i) for i in range(20)))
    assert len(engine.nftset.batches) == 1
    assert len(engine.nftset.batches[0]["ws_1001_dyn4"]) == 20
    for i, have in seen.items():  # every caller returned with its own IPs in the kernel
        assert {f"198.51.100.{i + 1}", f"2001:db8::{i + 1:x}"} <= have
    assert engine.counters == {**NO_DELETES, "programmed_ips": 40, "program_errors": 0, "set_transactions": 1}
    assert elements(scratch_ns, "ws_1001_dyn4")["198.51.100.3"]["comment"] == "h2.githubusercontent.com"


async def test_a_bad_answer_fails_alone(scratch_ns, engine):
    # A set gone from under the engine fails the batch; the retry per answer fails only its own.
    scratch_ns.nft.run("flush chain inet egressd ws_1001_enf\nflush chain inet egressd ws_1001_dry\n"
                       "delete set inet egressd ws_1001_dyn6")
    results = await asyncio.gather(
        engine.program(Target("1001", "pypi.org"), (("198.51.100.10", 60),)),
        engine.program(Target("1001", "docs.pypi.org"), (("2001:db8::10", 60),)),
        engine.program(Target("1001", "files.pythonhosted.org"), (("198.51.100.11", 60),)),
        return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], NftSetError) and results[1].set_name == "ws_1001_dyn6"
    assert set(elements(scratch_ns, "ws_1001_dyn4")) == {"198.51.100.10", "198.51.100.11"}
    assert engine.counters == {**NO_DELETES, "programmed_ips": 2, "program_errors": 1, "set_transactions": 4}  # the batch, then each answer
    assert engine.cache.size("1001") == 2  # the failed IP was forgotten, to be programmed again


async def test_a_whole_table_racing_a_pending_batch_is_an_error_not_a_silent_add(scratch_ns, engine):
    task = asyncio.ensure_future(engine.program(Target("1001", "pypi.org"), (("198.51.100.20", 60),)))
    await asyncio.sleep(0)  # queued, the batch not sent yet
    # Another restricted workspace: new objects, so the whole table is replaced.
    state = _state()
    engine.apply(State(state.policies, {**state.bindings, "1002": "restricted-etl"}, state.workloads), reason="test")
    assert engine.last_apply_scope == "table"
    with pytest.raises(StaleGeneration):
        await task
    assert engine.counters["program_errors"] == 1
    # The new generation rendered the recorded entry itself: the kernel has it, the cache agrees.
    assert "198.51.100.20" in elements(scratch_ns, "ws_1001_dyn4") and engine.cache.size("1001") == 1


async def test_a_delta_racing_a_pending_batch_lets_it_go_in(scratch_ns, engine):
    # A delta keeps the sets: the waiting answer's IPs, still allowed, go in with the new generation.
    task = asyncio.ensure_future(engine.program(Target("1001", "pypi.org"), (("198.51.100.20", 60),)))
    await asyncio.sleep(0)
    engine.apply(_state(), reason="an equal policy, parsed again")
    assert engine.last_apply_scope == "delta"
    await task
    assert engine.counters == {**NO_DELETES, "programmed_ips": 1, "program_errors": 0, "set_transactions": 1}
    assert "198.51.100.20" in elements(scratch_ns, "ws_1001_dyn4") and engine.cache.size("1001") == 1


async def test_a_delta_withdrawing_a_pending_answer_fails_it(scratch_ns, engine):
    task = asyncio.ensure_future(engine.program(Target("1001", "files.pythonhosted.org"), (("198.51.100.21", 60),)))
    await asyncio.sleep(0)
    engine.apply(_state_without("files.pythonhosted.org"), reason="edit")
    assert engine.last_apply_scope == "delta"
    with pytest.raises(StaleGeneration):
        await task
    assert "198.51.100.21" not in elements(scratch_ns, "ws_1001_dyn4") and engine.cache.size("1001") == 0


def test_an_expired_element_not_yet_collected_neither_matches_nor_blocks_a_new_add(scratch_ns, writer):
    """What makes the answer sets' long gc-interval safe: with the collector an hour away, an
    element past its timeout no longer matches a packet, is not dumped (so a restart does not
    adopt it), and the writer's add makes it match again, with its new timeout."""
    ns = scratch_ns.name

    def sh(*cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)

    scratch_ns.nft.run(
        "add table inet egressd\n"
        "add set inet egressd ws_a_dyn4 { type ipv4_addr; flags timeout; gc-interval 1h; }\n"
        "add counter inet egressd hits\n"
        "add chain inet egressd out { type filter hook output priority 0; policy accept; }\n"
        "add rule inet egressd out ip daddr @ws_a_dyn4 counter name hits\n")
    # A veth pair inside the namespace to route the probes into: they leave it nowhere.
    sh("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", "d0")
    sh("ip", "link", "set", "d0", "up")
    sh("ip", "link", "set", "d1", "up")
    sh("ip", "route", "add", "192.0.2.0/24", "dev", "d0")

    def hits_after_probe() -> int:
        sh("python3", "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 9))")
        out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "counter", "inet", "egressd", "hits"],
                             capture_output=True, text=True, check=True).stdout
        return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)

    writer.add({"ws_a_dyn4": [Element("192.0.2.1", 1, "a.example")]})
    assert hits_after_probe() == 1
    time.sleep(1.6)
    assert hits_after_probe() == 1  # expired: no match, though not collected
    assert writer.dump("ws_a_dyn4") == [] and elements(scratch_ns, "ws_a_dyn4") == {}
    writer.add({"ws_a_dyn4": [Element("192.0.2.1", 30, "b.example")]})
    assert hits_after_probe() == 2
    e = elements(scratch_ns, "ws_a_dyn4")["192.0.2.1"]
    assert (e["timeout"], e["comment"]) == (30, "b.example")


# --- deletes of expired answers ------------------------------------------------------------------

def test_delete_frees_live_elements_and_takes_expired_or_missing_ones_in_its_stride(scratch_ns, writer):
    """The writer's delete (destroy, or add the bare keys then delete them) frees live elements at once, with
    the collector an hour away, and does not fail on an element that has timed out, or one the
    set never had."""
    scratch_ns.nft.run(
        "add table inet egressd\n"
        "add set inet egressd ws_a_dyn4 { type ipv4_addr; flags timeout; gc-interval 1h; }\n"
        "add set inet egressd ws_a_dyn6 { type ipv6_addr; flags timeout; gc-interval 1h; }\n")
    writer.add({"ws_a_dyn4": [Element("192.0.2.1", 1, "gone.example")]})
    time.sleep(1.3)  # timed out, not collected
    # 100,000 live ones, with comments of 40 characters: 10 MB or more of the kernel's slab.
    live = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(100_000)]
    before = element_kb()
    for i in range(0, len(live), 10_000):  # a transaction's messages must fit the socket's buffer
        writer.add({"ws_a_dyn4": [Element(ip, 300, "live-element-with-a-long-name.example.org")
                                  for ip in live[i : i + 10_000]]})
    writer.add({"ws_a_dyn6": [Element("2001:db8::1", 300, "v6.example")]})
    grown = element_kb() - before
    print(f"slab grew {grown} kB for 100,000 elements")
    assert grown > 5_000, f"the kernel's slab grew {grown} kB for 100,000 elements"
    for i in range(0, len(live), 50_000):
        writer.delete({"ws_a_dyn4": live[i : i + 50_000]})
    # One timed out, one never there: no error. (A destroy per set, or an add and a delete.)
    assert writer.delete({"ws_a_dyn4": ["192.0.2.1", "192.0.2.77"], "ws_a_dyn6": ["2001:db8::1"]}) == (
        2 if writer.destroy else 4)
    assert writer.dump("ws_a_dyn4") == [] and writer.dump("ws_a_dyn6") == []
    deadline = time.monotonic() + 10
    while element_kb() - before > grown / 4 and time.monotonic() < deadline:
        time.sleep(0.2)  # the commit frees them after an RCU grace period
    left = element_kb() - before
    print(f"{left} kB of it left after the delete")
    assert left <= grown / 4, f"slab still {left} kB over the start after the delete (it grew {grown} kB)"
    # The same delete again, of elements that are all gone: still no error.
    writer.delete({"ws_a_dyn4": live[:10]})
    # DESTROYSETELEM where the kernel has it (6.3 and later), else add-then-delete.
    assert writer.destroy is (tuple(map(int, os.uname().release.split(".")[:2])) >= (6, 3))
    with pytest.raises(NftSetError) as ei:  # a set that is missing is an error, and says which
        writer.delete({"ws_gone_dyn4": ["192.0.2.1"]})
    assert ei.value.errno == 2 and "deleting elements from set inet egressd ws_gone_dyn4" in str(ei.value)


def test_a_kernel_without_destroy_gets_add_then_delete(scratch_ns, writer, monkeypatch):
    """A message type the kernel does not know (as DESTROYSETELEM before Linux 6.3) fails the first
    delete with EINVAL: the writer sends it again as add-then-delete, and keeps to that."""
    monkeypatch.setattr(nfmsg, "NFT_MSG_DESTROYSETELEM", 250)
    scratch_ns.nft.run(SETS)
    writer.add({"ws_a_dyn4": [Element("192.0.2.1", 60, "a.example"), Element("192.0.2.2", 60, "b.example")]})
    assert writer.delete({"ws_a_dyn4": ["192.0.2.1", "192.0.2.9"]}) == 2  # an add and a delete
    assert writer.destroy is False and [d.ip for d in writer.dump("ws_a_dyn4")] == ["192.0.2.2"]
    assert writer.delete({"ws_a_dyn4": ["192.0.2.2"]}) == 2
    assert writer.dump("ws_a_dyn4") == []
    with pytest.raises(NftSetError) as ei:  # errors other than the probe's still surface
        writer.delete({"ws_gone_dyn4": ["192.0.2.1"]})
    assert ei.value.errno == 2


class Clock:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t


async def test_an_expiry_round_deletes_what_it_drops_before_the_kernel_would(scratch_ns, engine):
    engine.clock = clock = Clock()
    await engine.program(Target("1001", "pypi.org"), (("198.51.100.10", 60), ("2001:db8::10", 60)))
    await engine.program(Target("1001", "docs.pypi.org"), (("198.51.100.11", 300),))
    el = elements(scratch_ns, "ws_1001_dyn4")["198.51.100.10"]
    assert el["timeout"] == 60 + MARGIN + GRACE
    clock.t += 60 + MARGIN + 0.5  # the cache's expiry of the first answer; the kernel's is GRACE s on
    tx = engine.counters["set_transactions"]
    assert engine.expire() == 2
    # Gone from the kernel at once, GRACE seconds before its timeout (real time: not even one).
    assert set(elements(scratch_ns, "ws_1001_dyn4")) == {"198.51.100.11"}
    assert elements(scratch_ns, "ws_1001_dyn6") == {}
    assert engine.counters["expired_deleted"] == 2 and engine.counters["set_transactions"] == tx + 1
    assert engine.expire() == 0 and engine.counters["set_transactions"] == tx + 1  # nothing due: no transaction


async def test_an_ip_answered_again_is_not_deleted_by_a_round_on_the_replaced_cache(scratch_ns, engine):
    """A round left between steps on a cache that a policy apply then replaced: an IP it drops,
    which an answer put back in the live cache (and the kernel) meanwhile, stays in the kernel."""
    engine.clock = clock = Clock()
    ips = [f"198.51.100.{i}" for i in range(30, 40)]
    for ip in ips:
        await engine.program(Target("1001", "pypi.org"), ((ip, 60),))
    clock.t += 62
    steps = engine.expire_steps(chunk=1)
    next(steps)  # one IP dropped and deleted; the round waits between steps
    assert len(elements(scratch_ns, "ws_1001_dyn4")) == 9
    # A policy edit that still allows pypi.org: a delta, with a new cache (the expired IPs are
    # not carried, and the delta withdraws them from the kernel).
    engine.apply(_state_without("files.pythonhosted.org"), reason="edit")
    assert engine.last_apply_scope == "delta" and elements(scratch_ns, "ws_1001_dyn4") == {}
    again = ips[5:]
    for ip in again:  # answered again: in the new cache and the kernel
        await engine.program(Target("1001", "pypi.org"), ((ip, 60),))
    assert set(elements(scratch_ns, "ws_1001_dyn4")) == set(again)
    deleted = engine.counters["expired_deleted"]
    for _ in steps:  # the old round goes on, and drops them all from the old cache
        pass
    assert set(elements(scratch_ns, "ws_1001_dyn4")) == set(again)
    assert engine.counters["expired_deleted"] == deleted + 4  # ips[1:5]: in neither cache
    assert engine.counters["expire_delete_errors"] == 0


async def test_a_restart_adopts_each_ip_until_the_kernels_expiry_less_the_grace(scratch_ns, engine):
    await engine.program(Target("1001", "pypi.org"), (("198.51.100.10", 60),))
    cache_expiry = next(e.expires for e in engine.cache.entries("1001", engine.clock()))
    sets = {o["set"]["name"]: o["set"].get("comment") for o in scratch_ns.nft.list_json("sets table inet egressd")
            if "set" in o}
    assert sets["ws_1001_dyn4"] == sets["ws_1001_dyn6"] == f"egressd grace={GRACE}s"
    again = Engine(engine.cfg, scratch_ns.nft, nftset=engine.nftset)
    assert again.adopt() == 1
    (e,) = again.cache.entries("1001", again.clock())
    assert abs(e.expires - cache_expiry) < 1.5, (e.expires, cache_expiry)
    # A table of an egressd before the grace (no comment on the set): the kernel's expiry as it is.
    scratch_ns.nft.run("add set inet egressd ws_1002_dyn4 { type ipv4_addr; flags timeout; }\n"
                       "add element inet egressd ws_1002_dyn4 { 192.0.2.7 timeout 60s comment \"old.example\" }")
    old = Engine(engine.cfg, scratch_ns.nft, nftset=engine.nftset)
    assert old.adopt() == 2
    (o,) = old.cache.entries("1002", old.clock())
    assert 58 <= o.expires - old.clock() <= 60


async def test_a_whole_round_of_many_ips_is_split_into_transactions_that_fit(scratch_ns, engine):
    engine.clock = clock = Clock()
    n = DELETE_BATCH + 5_000
    ips = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n)]
    for i in range(0, n, 5_000):  # answers of 50 IPs (max_ips_per_name is 64), a batch of 100 of them at a time
        await asyncio.gather(*(engine.program(Target("1001", "pypi.org"), tuple((ip, 60) for ip in ips[j : j + 50]))
                               for j in range(i, i + 5_000, 50)))
    assert len(engine.nftset.dump("ws_1001_dyn4")) == n
    clock.t += 62
    tx = engine.counters["set_transactions"]
    assert engine.expire() == n  # in one step: the deletes go in two transactions
    assert engine.counters["set_transactions"] == tx + 2 and engine.counters["expired_deleted"] == n
    assert engine.nftset.dump("ws_1001_dyn4") == []


def test_the_writer_takes_batches_beyond_the_sysctl_buffer_maxima(scratch_ns):
    """At Debian's default net.core.wmem_max and rmem_max (212,992) a plain SO_SNDBUF is capped
    at 425,984 bytes, and a batch of 10,000 IPs (about 1.4 MB) failed with EMSGSIZE. The writer
    forces its buffers past the maxima (CAP_NET_ADMIN)."""
    with stock_socket_maxima(), entered(scratch_ns.name):
        w = NftSetWriter()
    try:
        assert w._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 8 * 1024 * 1024
        scratch_ns.nft.run(SETS)
        ips = [f"10.1.{i >> 8}.{i & 255}" for i in range(10_000)]
        w.add({"ws_a_dyn4": [Element(ip, 60, "files.pythonhosted.org") for ip in ips]})
        assert len(w.dump("ws_a_dyn4")) == 10_000
    finally:
        w.close()


def test_an_upgrade_from_a_table_without_the_grace_gets_it_on_the_first_apply(scratch_ns, writer):
    """A table of an egressd from before the deletes: answer sets without the grace comment, whose
    elements' timeouts end at the cache's expiry. The new engine adopts them as they are, its first
    apply replaces the table with the grace added, and its round deletes them while still live."""
    cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}})
    first = Engine(cfg, scratch_ns.nft)
    first.apply(_state(), reason="the old egressd")
    # What an older table held: the same sets, no comment on them.
    for fam, typ in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        scratch_ns.nft.run(f"flush chain inet egressd ws_1001_enf\nflush chain inet egressd ws_1001_dry\n"
                           f"delete set inet egressd ws_1001_dyn{fam}\n"
                           f"add set inet egressd ws_1001_dyn{fam} {{ type {typ}; flags timeout; gc-interval 10s; }}")
    scratch_ns.nft.run('add element inet egressd ws_1001_dyn4 { 198.51.100.10 timeout 61s comment "pypi.org" }')
    new = Engine(cfg, scratch_ns.nft, nftset=writer, clock=(clock := Clock()))
    assert new.adopt() == 1
    (e,) = new.cache.entries("1001", clock())
    assert 59 <= e.expires - clock() <= 61  # the kernel's expiry as it was
    new.apply(_state(), reason="the new egressd starts")
    assert new.last_apply_scope == "table"
    el = elements(scratch_ns, "ws_1001_dyn4")["198.51.100.10"]
    assert 65 <= el["timeout"] <= 67 and el["comment"] == "pypi.org"  # the grace added (rounded up)
    sets = {o["set"]["name"]: o["set"].get("comment") for o in scratch_ns.nft.list_json("sets table inet egressd")
            if "set" in o}
    assert sets["ws_1001_dyn4"] == f"egressd grace={GRACE}s"
    clock.t += 62
    assert new.expire() == 1 and new.counters["expired_deleted"] == 1
    assert elements(scratch_ns, "ws_1001_dyn4") == {}  # deleted live, GRACE s before its timeout
