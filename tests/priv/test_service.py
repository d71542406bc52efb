"""The daemon as a system service: sd_notify, watchdog, SIGHUP, journald fields, metrics, and
restarts (kill -9, established flows, DNS back right after READY=1)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egressd.lab import Lab, world
from egressd.lab.apiclient import call
from egressd.lab.daemonproc import DaemonProc


@pytest.fixture
def lab():
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        yield lab


def generation(lab) -> int:
    out = lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
    return int(re.search(r'comment "egressd generation=(\d+)"', out).group(1))


def rules_only(lab) -> str:
    out = lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
    return "\n".join(l for l in out.splitlines() if "expires" not in l and "packets" not in l and "generation=" not in l)


def test_ready_only_when_ruleset_and_shim_are_up_and_dns_answers_within_1s(lab):
    d = DaemonProc(lab, world.write_config(lab))
    assert lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"]).returncode != 0
    d.start()
    t_ready = time.monotonic()
    try:
        r = lab.dig(lab.workloads[0], "pypi.org", timeout=1)
        assert r.status == "NOERROR" and time.monotonic() - t_ready < 1.0
        assert generation(lab) >= 1
        assert any("STATUS=generation" in m for m in d.messages) or d.wait_message("STATUS=", 12)
    finally:
        d.stop()


def test_watchdog_pings_stop_when_the_loop_stalls(lab):
    d = DaemonProc(lab, world.write_config(lab))
    d.start(extra_env={"WATCHDOG_USEC": "400000", "EGRESSD_TEST_HOOKS": "1", "EGRESSD_TEST_STALL_SECONDS": "2.5"})
    try:
        assert d.wait_message("WATCHDOG=1", 2) and d.wait_message("WATCHDOG=1", 1)
        d.messages.clear()
        d.signal(signal.SIGUSR2)
        time.sleep(0.3)
        d.messages.clear()
        # a stalled loop sends nothing: systemd (WatchdogSec) would kill and restart it
        assert not d.wait_message("WATCHDOG=1", 1.8)
        assert d.wait_message("WATCHDOG=1", 3)  # and pings resume once the loop runs
    finally:
        d.stop()


def test_sighup_applies_good_files_and_refuses_bad_ones(lab):
    config = world.write_config(lab)
    d = DaemonProc(lab, config)
    d.start()
    pol = config.parent / "policies.d" / "restricted-etl.json"
    w1 = lab.workloads[0]
    sock = str(config.parent / "api.sock")
    try:
        g0 = generation(lab)
        t0 = call(sock, "GET", "/api/2.0/status")[1]["last_apply_time"]
        time.sleep(0.05)
        doc = world.policy("restricted-etl")
        doc["egress"]["network_access"]["allowed_internet_destinations"].append({"destination": "evil.example"})
        pol.write_text(json.dumps(doc))
        d.signal(signal.SIGHUP)
        assert d.wait_message("RELOADING=1", 5) and d.wait_message("READY=1", 5)
        assert generation(lab) == g0 + 1
        st = call(sock, "GET", "/api/2.0/status")[1]
        assert st["generation"] == g0 + 1 and st["last_apply_time"] > t0, (t0, st["last_apply_time"])
        assert lab.dig(w1, "evil.example").status == "NOERROR"
        before = rules_only(lab)
        pol.write_text('{"network_policy_id": "restricted-etl", "egress": {"network_access": {"restriction_mode": "NOPE"}}}')
        d.signal(signal.SIGHUP)
        assert d.wait_message("RELOADING=1", 5) and d.wait_message("READY=1", 5)
        assert generation(lab) == g0 + 1 and rules_only(lab) == before
        assert lab.dig(w1, "evil.example").status == "NOERROR"
        assert "reload_refused" in d.log() and "restriction_mode" in d.log()
    finally:
        d.stop()


def test_journald_native_protocol_fields(lab, tmp_path):
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    d = DaemonProc(lab, world.write_config(lab))
    d.start(extra_env={"JOURNAL_STREAM": "8:1234", "EGRESSD_JOURNAL_SOCKET": str(path)})
    try:
        records = []
        end = time.monotonic() + 5
        while time.monotonic() < end and not any(b"EVENT=ready" in r for r in records):
            try:
                records.append(sock.recv(65536))
            except TimeoutError:
                pass
        fields = [dict(l.split("=", 1) for l in r.decode().splitlines() if "=" in l) for r in records]
        applied = next(f for f in fields if f.get("EVENT") == "ruleset_applied")
        assert applied["SYSLOG_IDENTIFIER"] == "egressd" and applied["PRIORITY"] == "6"
        assert int(applied["GENERATION"]) >= 1 and float(applied["DURATION_MS"]) > 0
        assert applied["MESSAGE"].startswith("ruleset_applied ")
        assert any(f.get("EVENT") == "ready" for f in fields)
    finally:
        d.stop()
        sock.close()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_move_with_traffic(lab):
    d = DaemonProc(lab, world.write_config(lab))
    d.start()
    sock = str(Path(d.config).parent / "api.sock")
    try:
        s1 = samples(call(sock, "GET", "/metrics")[1])
        w1 = lab.workloads[0]
        assert lab.dig(w1, "pypi.org").status == "NOERROR"
        assert lab.dig(w1, "evil.example").status == "NXDOMAIN"
        lab.curl(w1, "http://192.0.2.99/")
        time.sleep(0.3)
        s2 = samples(call(sock, "GET", "/metrics")[1])
        key = lambda n, **l: (n, tuple(sorted(l.items())))
        assert s2[key("egressd_dns_answers_total", outcome="allowed", rcode="0")] > s1.get(key("egressd_dns_answers_total", outcome="allowed", rcode="0"), 0)
        assert s2[key("egressd_dns_answers_total", outcome="denied", rcode="3")] >= 1
        assert s2[key("egressd_dns_forward_duration_seconds_count")] > s1.get(key("egressd_dns_forward_duration_seconds_count"), 0)
        assert s2[key("egressd_set_elements", workspace_id="1001", policy_id="restricted-etl")] >= 1
        assert s2[key("egressd_nflog_messages_total", outcome="received")] >= 1
        assert s2[key("egressd_ruleset_generation")] >= 1
        assert key("egressd_spool_events") in s2 and key("egressd_collector_backlog_events") in s2
    finally:
        d.stop()


def test_metrics_listener_serves_only_metrics(lab):
    d = DaemonProc(lab, world.write_config(lab, metrics_listen="127.0.0.1:9182"))
    d.start()
    try:
        r = lab.run(lab.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9182/metrics"])
        assert r.stdout == "200"
        r = lab.run(lab.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9182/api/2.0/status"])
        assert r.stdout == "404"
    finally:
        d.stop()


def test_kill_9_keeps_restricted_closed_and_resolved_ips_open(lab):
    d = DaemonProc(lab, world.write_config(lab))
    d.start()
    w1 = lab.workloads[0]
    assert lab.curl(w1, "http://pypi.org/")[0] == 200
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(5)
    assert lab.curl(w1, "http://198.51.100.10/")[0] == 200  # recently resolved: still open
    assert lab.curl(w1, "http://192.0.2.99/")[0] is None  # restricted: still closed
    assert lab.curl(lab.workloads[1], "http://192.0.2.99/")[0] == 200  # dry run stays dry run
    r = lab.dig(w1, "evil.example", timeout=1)
    assert r.status != "NOERROR"  # DNS fails closed while the shim is down
    d.stop()


HOLD = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    print("connected", flush=True)
    sys.stdin.readline()           # the test restarts the daemon meanwhile
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: pypi.org\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.split(b"\\r\\n")[0].decode(), flush=True)
    """
)


def test_established_connection_survives_restart(lab):
    config = world.write_config(lab)
    d = DaemonProc(lab, config)
    d.start()
    w1 = lab.workloads[0]
    assert lab.dig(w1, "pypi.org").status == "NOERROR"
    p = lab.popen(w1.netns, [sys.executable, "-c", HOLD, "198.51.100.10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "connected"
    d.stop()
    # drop the resolved IP from the sets: only conntrack (established) can carry the flow now
    lab.run(lab.node_ns, ["nft", "flush", "set", "inet", "egressd", "ws_1001_dyn4"], check=True)
    d2 = DaemonProc(lab, config, name="egressd2")
    d2.start()
    try:
        out, _ = p.communicate("go\n", timeout=10)
        assert out.strip().endswith("200 OK")
        assert lab.curl(w1, "http://198.51.100.10/")[0] is None  # a new flow is not allowed any more
    finally:
        d2.stop()


def test_uninstall_rules_removes_the_table_on_purpose(lab):
    d = DaemonProc(lab, world.write_config(lab))
    d.start()
    d.stop()
    egressd = str(Path(sys.executable).parent / "egressd")
    r = lab.run(lab.node_ns, [egressd, "uninstall-rules"])
    assert r.returncode == 2 and "--yes" in r.stderr
    assert lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"]).returncode == 0
    r = lab.run(lab.node_ns, [egressd, "uninstall-rules", "--yes"])
    assert r.returncode == 0
    assert lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"]).returncode != 0
    assert lab.curl(lab.workloads[0], "http://192.0.2.99/")[0] == 200


def test_status_tells_the_truth(lab):
    d = DaemonProc(lab, world.write_config(lab))
    d.start()
    try:
        lab.dig(lab.workloads[0], "pypi.org")
        exe = str(Path(sys.executable).parent / "egressctl")
        r = subprocess.run([exe, "--socket", str(Path(d.config).parent / "api.sock"), "--json", "status"], capture_output=True, text=True, timeout=10)
        st = json.loads(r.stdout)
        assert st["generation"] == generation(lab)
        assert st["shim"]["listening"] and st["set_sizes"]["1001"] >= 1
        assert "backlog" in st["collector"] and st["last_apply_time"].endswith("+00:00")
    finally:
        d.stop()
