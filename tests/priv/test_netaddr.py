"""egressd.netaddr's RTM_GETADDR dump against `ip -j addr` in a throw-away namespace."""

from __future__ import annotations

import json
import subprocess

from egressd.netaddr import node_addresses
from egressd.netns import entered


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, check=True).stdout


def test_node_addresses_match_ip_addr(scratch_ns):
    ns = scratch_ns.name
    _ip(ns, "link", "set", "lo", "up")
    _ip(ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    _ip(ns, "link", "set", "d1", "up")
    _ip(ns, "link", "set", "d0", "up")
    _ip(ns, "addr", "add", "192.0.2.7/24", "dev", "d0")
    _ip(ns, "addr", "add", "198.51.100.9/32", "dev", "d0")
    _ip(ns, "addr", "add", "2001:db8::7/64", "dev", "d0", "nodad")
    with entered(ns):
        got = node_addresses()
    want = [a["local"] for link in json.loads(_ip(ns, "-j", "addr")) for a in link.get("addr_info", [])]
    assert sorted(got) == sorted(want)
    assert {"127.0.0.1", "::1", "192.0.2.7", "198.51.100.9", "2001:db8::7"} <= set(got)


def test_empty_namespace_has_no_addresses(scratch_ns):
    with entered(scratch_ns.name):
        assert node_addresses() == []
