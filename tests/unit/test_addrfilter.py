"""core.addrfilter: which answer addresses never reach an allow set, and the engine's use of it
(filter, per-name cap in answer order, "refuse" mode) with a recording stand-in for libnftables."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from pathlib import Path

import pytest
from egressd.core import addrfilter
from egressd.core.addrfilter import (
    REASONS,
    FilterCounters,
    SpecialAddressRefused,
    classify,
    split,
)
from egressd.core.config import config_from_dict
from egressd.core.plan import build_plan
from egressd.core.policy import default_policy, parse_policy
from egressd.core.workloads import Workload
from egressd.engine import Engine, Target
from egressd.errors import ValidationError
from egressd.lab import world
from hypothesis import given
from hypothesis import strategies as st

NODE = frozenset(ipaddress.ip_address(a) for a in ("10.99.0.1", "10.77.1.1", "2001:db8:99::1", "127.0.0.1"))

SPECIAL = {
    # IPv4
    "0.0.0.0": "unspecified",
    "0.1.2.3": "unspecified",
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "169.254.169.254": "metadata-service",
    "100.100.100.200": "metadata-service",
    "169.254.0.1": "link-local",
    "169.254.170.2": "link-local",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "255.255.255.255": "broadcast",
    "10.99.0.1": "node-address",
    "10.77.1.1": "node-address",
    # IPv6
    "::": "unspecified",
    "::1": "loopback",
    "fd00:ec2::254": "metadata-service",
    "fe80::1": "link-local",
    "febf:ffff::1": "link-local",
    "ff02::1": "multicast",
    "ff0e::fb": "multicast",
    "2001:db8:99::1": "node-address",
    # IPv6 forms of IPv4 special addresses: mapped, compatible, NAT64.
    "::ffff:127.0.0.1": "loopback",
    "::ffff:169.254.169.254": "metadata-service",
    "::ffff:0.0.0.0": "unspecified",
    "::ffff:224.0.0.5": "multicast",
    "::ffff:255.255.255.255": "broadcast",
    "::ffff:10.99.0.1": "node-address",
    "::127.0.0.1": "loopback",
    "::169.254.1.1": "link-local",
    "64:ff9b::7f00:1": "loopback",
    "64:ff9b::a9fe:a9fe": "metadata-service",
}
ORDINARY = [
    "198.51.100.10", "203.0.113.7", "192.0.2.1", "8.8.8.8",
    # Private ranges are real endpoints: allowed.
    "10.0.0.1", "10.99.0.2", "172.16.0.1", "172.31.255.254", "192.168.1.1", "100.64.0.1",
    "100.127.255.254", "fc00::1", "fd12:3456::1", "2001:db8:ff::10", "::ffff:198.51.100.10",
    "64:ff9b::c633:640a", "2002:c633:640a::1", "169.253.255.255", "169.255.0.0", "223.255.255.255",
    "240.0.0.1", "255.255.255.254",
]


@pytest.mark.parametrize(("ip", "reason"), sorted(SPECIAL.items()))
def test_special_addresses(ip: str, reason: str) -> None:
    assert classify(ip, NODE) == reason
    assert classify(ipaddress.ip_address(ip), NODE) == reason
    assert reason in REASONS


@pytest.mark.parametrize("ip", ORDINARY)
def test_ordinary_and_private_addresses_pass(ip: str) -> None:
    assert classify(ip, NODE) is None


def test_node_addresses_are_only_special_on_the_node() -> None:
    assert classify("10.99.0.1") is None and classify("2001:db8:99::1", frozenset()) is None
    assert classify("127.0.0.1") == "loopback"  # whatever the node's addresses


def test_scoped_link_local() -> None:
    assert classify("fe80::1%eth0", NODE) == "link-local"


@given(st.ip_addresses())
def test_classify_total_and_consistent_with_embedding(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    reason = classify(ip, NODE)
    assert reason is None or reason in REASONS
    if ip.version == 4:
        # The mapped form is judged exactly like the IPv4 address itself.
        assert classify(ipaddress.IPv6Address(f"::ffff:{ip}"), NODE) == reason
        assert classify(ipaddress.IPv6Address(f"64:ff9b::{ip}"), NODE) == reason


def test_split_keeps_answer_order() -> None:
    addrs = [(f"198.51.100.{i}", i) for i in random.Random(7).sample(range(1, 255), 50)]
    mixed = addrs[:10] + [("127.0.0.1", 5), ("::ffff:169.254.169.254", 5)] + addrs[10:] + [("10.99.0.1", 1)]
    kept, filtered = split(mixed, NODE)
    assert kept == addrs
    assert filtered == [("127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata-service"),
                        ("10.99.0.1", "node-address")]


def test_warn_due_rate_limits_per_key() -> None:
    fc = FilterCounters(warn_every=10.0)
    assert set(fc.filtered) == set(REASONS) and sum(fc.filtered.values()) == 0
    assert fc.warn_due("1001", 100.0) == 0
    assert fc.warn_due("1001", 101.0) is None
    assert fc.warn_due("1001", 109.9) is None
    assert fc.warn_due("1002", 105.0) == 0  # another workspace has its own budget
    assert fc.warn_due("1001", 110.0) == 2  # two suppressed since the last warning
    assert fc.warn_due("1001", 111.0) is None


def test_warn_due_memory_is_bounded() -> None:
    fc = FilterCounters(warn_every=10.0, max_keys=4)
    assert [fc.warn_due(str(i), 0.0) for i in range(4)] == [0, 0, 0, 0]
    assert fc.warn_due("new", 1.0) is None  # full of recent keys: quiet
    assert fc.warn_due("new", 11.0) == 0  # the old ones aged out
    assert len(fc._warns) <= 4


def test_module_is_pure() -> None:
    src = Path(addrfilter.__file__).read_text()
    for mod in ("socket", "asyncio", "subprocess", "time", "os", "structlog"):
        assert f"import {mod}" not in src


# --- config ----------------------------------------------------------------------------------

UP = {"upstreams": ["203.0.113.2"]}


def test_config_special_addresses() -> None:
    assert config_from_dict({"dns": UP}).dns.special_addresses == "answer-closed"
    assert config_from_dict({"dns": {**UP, "special_addresses": "refuse"}}).dns.special_addresses == "refuse"
    for bad in ("REFUSE", "servfail", 1, True):
        with pytest.raises(ValidationError) as e:
            config_from_dict({"dns": {**UP, "special_addresses": bad}})
        assert [err.path for err in e.value.errors] == ["dns.special_addresses"]


# --- Engine.program --------------------------------------------------------------------------


class _Nft:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    def run(self, script: str) -> None:
        self.scripts.append(script)

    def added(self) -> list[str]:
        """IPs added, in order (each program_elements entry is add, delete, add)."""
        out = []
        for script in self.scripts:
            for line in script.splitlines():
                if line.startswith("delete element"):
                    out.append(line.rsplit("{", 1)[1].strip(" }"))
        return out


def _engine(**dns: object) -> tuple[Engine, _Nft]:
    cfg = config_from_dict({"dns": {**UP, **dns}})
    nft = _Nft()
    e = Engine(cfg, nft=nft, clock=lambda: 1000.0,  # type: ignore[arg-type]
               node_addresses=["10.99.0.1", "127.0.0.1", "2001:db8:99::1"])
    policies = {"default-policy": default_policy(), "restricted-etl": parse_policy(world.policy("restricted-etl"))}
    wl = Workload("w1", "1001", "GENERAL_COMPUTE", (ipaddress.ip_network("10.77.1.2/32"),))
    e.plan = build_plan(policies, {"1001": "restricted-etl"}, [wl])
    return e, nft


def _program(e: Engine, name: str, addrs: list[tuple[str, int]]) -> None:
    asyncio.run(e.program(Target("1001", name), tuple(addrs)))


def test_program_leaves_special_addresses_closed() -> None:
    e, nft = _engine()
    _program(e, "pypi.org", [("198.51.100.10", 60), ("127.0.0.1", 60), ("169.254.169.254", 60),
                             ("::ffff:127.0.0.2", 60), ("10.99.0.1", 60), ("10.5.5.5", 60), ("fe80::1", 60)])
    assert nft.added() == ["198.51.100.10", "10.5.5.5"]
    f = e.answer_filter
    assert {r: n for r, n in f.filtered.items() if n} == {
        "loopback": 2, "metadata-service": 1, "node-address": 1, "link-local": 1}
    assert e.counters["programmed_ips"] == 2 and f.refused_answers == 0
    # An answer of special addresses only programs nothing, and does not fail.
    _program(e, "pypi.org", [("127.0.0.1", 60)])
    assert len(nft.scripts) == 1 and f.filtered["loopback"] == 3


def test_program_refuse_mode_programs_nothing() -> None:
    e, nft = _engine(special_addresses="refuse")
    with pytest.raises(SpecialAddressRefused):
        _program(e, "pypi.org", [("198.51.100.10", 60), ("224.0.0.1", 60)])
    assert nft.scripts == [] and e.cache.size() == 0
    assert e.answer_filter.refused_answers == 1 and e.answer_filter.filtered["multicast"] == 1
    _program(e, "pypi.org", [("198.51.100.10", 60)])  # a clean answer is programmed as usual
    assert nft.added() == ["198.51.100.10"]


def test_program_cap_keeps_the_first_in_answer_order() -> None:
    e, nft = _engine(max_ips_per_name=64)
    order = random.Random(3).sample(range(3000), 3000)
    addrs = [(f"10.{200 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 60) for i in order]
    _program(e, "many.example", addrs[:5] + [("127.0.0.1", 60)] + addrs[5:])
    assert nft.added() == [ip for ip, _ in addrs[:64]]
    assert e.answer_filter.capped == 3000 - 64


# The IPv4 fast path (integer tests on a dotted quad) against the general one (ipaddress objects).
_V4_EDGES = st.sampled_from([0, 0x00FFFFFF, 0x01000000, 0x7EFFFFFF, 0x7F000000, 0x7FFFFFFF, 0x80000000,
                             0xA9FDFFFF, 0xA9FE0000, 0xA9FEA9FE, 0xA9FEFFFF, 0xA9FF0000, 0x646464C8,
                             0xDFFFFFFF, 0xE0000000, 0xEFFFFFFF, 0xF0000000, 0xFFFFFFFE, 0xFFFFFFFF,
                             int(ipaddress.ip_address("10.99.0.1")), int(ipaddress.ip_address("10.77.1.1"))])


@given(st.one_of(st.integers(0, 2**32 - 1), _V4_EDGES))
def test_the_ipv4_fast_path_agrees_with_the_ipaddress_path(n):
    addr = ipaddress.IPv4Address(n)
    for node in (NODE, ()):
        assert classify(str(addr), node) == classify(addr, node)


@given(st.one_of(st.text(alphabet="0123456789.x \n\u0663", max_size=20),
                 st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){2,4}", fullmatch=True),
                 st.ip_addresses(v=4).map(str)))
def test_dotted_quad_takes_what_ip_address_takes_as_ipv4(text):
    try:
        want = int(ipaddress.IPv4Address(text))
    except ValueError:
        want = None
    assert addrfilter._dotted_quad(text) == want


@pytest.mark.parametrize("text", ["01.2.3.4", "1.2.3", "127.1", "1.2.3.4 ", "256.1.1.1", "0x7f.0.0.1", ""])
def test_malformed_ipv4_text_is_refused_as_before(text):
    with pytest.raises(ValueError):
        classify(text, NODE)
