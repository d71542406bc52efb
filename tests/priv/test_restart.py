"""Starting over an existing table, and restarting, never opens a restricted workload."""

from __future__ import annotations

import re
import textwrap
import time

import pytest

from egressd.lab import Lab, world
from egressd.lab.daemonproc import DaemonProc

PROBE = textwrap.dedent(
    """
    import socket, sys, time
    denied, allowed, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    t0 = time.monotonic()
    end = t0 + seconds
    through = allowed_fail = tries = 0
    when = []  # seconds since the start of each denied connection that got through
    while time.monotonic() < end:
        tries += 1
        for ip, bad in ((denied, True), (allowed, False)):
            try:
                socket.create_connection((ip, 80), timeout=0.2).close()
                through += bad
                if bad:
                    when.append(round(time.monotonic() - t0, 3))
            except OSError:
                allowed_fail += not bad
        time.sleep(0.02)
    print(tries, through, allowed_fail, ",".join(map(str, when)) or "-")
    """
)


@pytest.fixture
def lab():
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        yield lab


def generation(lab) -> int:
    out = lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
    return int(re.search(r'comment "egressd generation=(\d+)"', out).group(1))


def test_start_replaces_a_stale_table_in_one_transaction(lab):
    # A table left by something else, with a junk chain, a junk set and a hook that drops everything.
    lab.run(
        lab.node_ns,
        ["nft", "add table inet egressd; add set inet egressd junk { type ipv4_addr; };"
         " add chain inet egressd junkfwd { type filter hook forward priority 0; policy drop; }"],
        check=True,
    )
    d = DaemonProc(lab, world.write_config(lab))
    d.start()
    try:
        out = lab.run(lab.node_ns, ["nft", "list", "ruleset"], check=True).stdout
        assert "junk" not in out
        assert out.count("table inet egressd") == 1
        w1, w3 = lab.workloads[0], lab.workloads[2]
        assert lab.curl(w1, "http://pypi.org/")[0] == 200
        assert lab.curl(w3, "http://192.0.2.99/")[0] == 200
        assert lab.curl(w1, "http://192.0.2.99/")[0] is None
    finally:
        d.stop()


def test_restart_keeps_restricted_closed_and_resolved_ips_open(lab):
    w1 = lab.workloads[0]
    config = world.write_config(lab)
    d = DaemonProc(lab, config)
    d.start()
    assert lab.dig(w1, "pypi.org").status == "NOERROR"
    g1 = generation(lab)
    probe = lab.popen(w1.netns, [__import__("sys").executable, "-c", PROBE, "192.0.2.99", "198.51.100.10", "4"],
                      stdout=__import__("subprocess").PIPE, text=True)
    t0 = time.monotonic()
    marks = {}  # when each step began, in seconds since the probe (to place a failure)
    time.sleep(0.5)
    marks["stop"] = round(time.monotonic() - t0, 3)
    d.stop()
    # No daemon: the rules stay (fail closed); the resolved IP still works, DNS does not.
    assert lab.curl(w1, "http://192.0.2.99/")[0] is None
    assert lab.curl(w1, "http://198.51.100.10/")[0] == 200
    assert lab.dig(w1, "pypi.org", timeout=2).status in (None, "SERVFAIL")
    time.sleep(0.5)
    d2 = DaemonProc(lab, config, name="egressd2")
    marks["start"] = round(time.monotonic() - t0, 3)
    d2.start()
    marks["ready"] = round(time.monotonic() - t0, 3)
    try:
        out, _ = probe.communicate(timeout=10)
        counts, when = out.split()[:3], out.split()[3]
        tries, through, allowed_fail = map(int, counts)
        assert tries > 50
        assert through == 0, (f"a denied IP got through during the restart, at {when} s; steps at {marks}\n"
                              f"first daemon:\n{d.log()[-3000:]}\nsecond daemon:\n{d2.log()[-3000:]}")
        assert allowed_fail == 0, "a resolved IP was closed during the restart"
        assert generation(lab) == g1 + 1
        # the adopted entry is still there, and DNS answers again
        assert "198.51.100.10" in lab.run(lab.node_ns, ["nft", "list", "set", "inet", "egressd", "ws_1001_dyn4"]).stdout
        assert lab.dig(w1, "pypi.org").status == "NOERROR"
    finally:
        d2.stop()


def test_deny_action_drop_makes_clients_time_out(lab):
    d = DaemonProc(lab, world.write_config(lab, deny_action="drop"))
    d.start()
    try:
        w1 = lab.workloads[0]
        code, _out, elapsed = lab.curl(w1, "http://192.0.2.99/", timeout=2)
        assert code is None and elapsed >= 1.5  # no RST, no ICMP: the connect times out
        assert re.search(r"counter packets [1-9]\d* bytes \d+ drop", lab.run(lab.node_ns, ["nft", "list", "chain", "inet", "egressd", "deny"]).stdout)
        assert lab.curl(w1, "http://pypi.org/")[0] == 200
    finally:
        d.stop()


def test_pushed_state_survives_a_daemon_restart(lab):
    from egressd.lab.apiclient import call as api

    config = world.write_config(lab)

    def call(method, path, body=None):
        return api(str(config.parent / "api.sock"), method, path, body)

    d = DaemonProc(lab, config)
    d.start()
    w3 = lab.workloads[2]
    try:
        assert call("PUT", "/api/2.0/network-policies/pushed", world.policy("pushed"))[0] == 200
        assert call("PUT", "/api/2.0/workspaces/1003/network", {"network_policy_id": "pushed"})[0] == 200
        assert call("PUT", "/api/2.0/workloads/extra", {"workspace_id": "1003", "product": "APPS", "sources": ["10.77.9.0/24"]})[0] == 200
        assert lab.curl(w3, "http://192.0.2.99/")[0] is None
    finally:
        d.stop()
    log = d.log()
    assert '"event": "api_change"' in log and '"caller": "uid=0' in log and '"object": "pushed"' in log
    d2 = DaemonProc(lab, config, name="egressd2")
    d2.start()
    try:
        status, body = call("GET", "/api/2.0/network-policies/pushed")
        assert status == 200 and body["source"] == "api"
        assert call("GET", "/api/2.0/workspaces/1003/network")[1]["network_policy_id"] == "pushed"
        assert call("GET", "/api/2.0/workloads/extra")[0] == 200
        assert lab.curl(w3, "http://192.0.2.99/")[0] is None
        assert lab.dig(w3, "evil.example").status == "NXDOMAIN"
    finally:
        d2.stop()
