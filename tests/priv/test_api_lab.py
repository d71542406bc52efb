"""The API of a running daemon in the lab: changes are live for the very next connection, and the
unix socket answers only root and the socket group."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from egressd.lab import Lab, world
from egressd.lab.apiclient import call
from egressd.lab.daemonproc import DaemonProc

P = "/api/2.0"
PROBE = textwrap.dedent(
    """
    import socket, sys
    for line in sys.stdin:
        ip, port = line.split()
        try:
            socket.create_connection((ip, int(port)), timeout=0.5).close()
            print("ok", flush=True)
        except OSError:
            print("fail", flush=True)
    """
)




@pytest.fixture(scope="module")
def live():
    rundir = Path(f"/run/egressd-test-{uuid.uuid4().hex[:8]}")
    rundir.mkdir(mode=0o755)
    try:
        with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
            sock = str(rundir / "api.sock")
            d = DaemonProc(lab, world.write_config(lab, api_socket=sock, socket_group="nogroup"))
            d.start()
            probe = lab.popen(lab.workloads[0].netns, [sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

            def connect(ip: str, port: int = 80) -> bool:
                probe.stdin.write(f"{ip} {port}\n")
                probe.stdin.flush()
                return probe.stdout.readline().strip() == "ok"

            try:
                yield lab, sock, connect, d
            finally:
                probe.stdin.close()
                probe.wait(5)
                d.stop()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_flips_take_effect_for_the_next_connection(live):
    lab, sock, connect, _ = live
    doc = world.policy("restricted-etl")
    mismatches = []
    for i in range(100):
        mode = "FULL_ACCESS" if i % 2 == 0 else "RESTRICTED_ACCESS"
        doc["egress"]["network_access"]["restriction_mode"] = mode
        status, body = call(sock, "PUT", f"{P}/network-policies/restricted-etl", doc)
        assert status == 200, body
        if connect("192.0.2.99") != (mode == "FULL_ACCESS"):
            mismatches.append((i, mode))
    doc["egress"]["network_access"]["restriction_mode"] = "RESTRICTED_ACCESS"
    for i in range(100):
        dry = i % 2 == 0
        doc["egress"]["network_access"]["policy_enforcement"] = {"enforcement_mode": "DRY_RUN" if dry else "ENFORCED"}
        status, body = call(sock, "PUT", f"{P}/network-policies/restricted-etl", doc)
        assert status == 200, body
        if connect("192.0.2.99") != dry:
            mismatches.append((i, "DRY_RUN" if dry else "ENFORCED"))
    assert mismatches == []
    assert connect("192.0.2.99") is False  # ends ENFORCED


def test_binding_and_workload_changes_are_live(live):
    lab, sock, connect, _ = live
    w3 = lab.workloads[2]
    assert lab.curl(w3, "http://192.0.2.99/")[0] == 200  # ws 1003: default-policy, full access
    status, _ = call(sock, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "restricted-etl"})
    assert status == 200
    assert lab.curl(w3, "http://192.0.2.99/")[0] is None
    assert lab.dig(w3, "evil.example").status == "NXDOMAIN"
    call(sock, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "default-policy"})
    assert lab.curl(w3, "http://192.0.2.99/")[0] == 200
    # unregister w3's workload: its traffic is no longer touched at all, DNS included
    status, _ = call(sock, "DELETE", f"{P}/workloads/ws3-app")
    assert status == 409  # it comes from the config file
    status, body = call(sock, "PUT", f"{P}/workloads/extra", {"workspace_id": "1001", "product": "APPS", "sources": [f"{w3.ipv4}/32"]})
    assert status == 400 and "overlap" in body["message"]


def test_verify_and_status(live):
    lab, sock, connect, d = live
    assert lab.dig(lab.workloads[0], "pypi.org").status == "NOERROR"
    status, body = call(sock, "POST", f"{P}/verify", {"workspace_id": "1001", "destination": "198.51.100.10"})
    assert status == 200 and body["verdict"] == "ALLOW" and "resolved from pypi.org" in body["reason"]
    status, body = call(sock, "GET", f"{P}/status")
    assert status == 200 and body["generation"] >= 1 and body["shim"]["listening"] is True
    assert body["set_sizes"].get("1001", 0) >= 1 and body["last_apply_ms"] > 0


def run_as(user: str, groups: str | None, sock: str) -> subprocess.CompletedProcess:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('refused', e.errno); sys.exit(0)\n"
        "s.sendall(b'GET /api/2.0/status HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
    )
    argv = ["setpriv", f"--reuid={user}", "--regid=nogroup" if groups else "--regid=daemon"]
    argv += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return subprocess.run(argv + [sys.executable, "-c", code, sock], capture_output=True, text=True, timeout=10)


def test_socket_answers_only_root_and_its_group(live):
    _lab, sock, _connect, _ = live
    st = Path(sock).stat()
    assert oct(st.st_mode & 0o777) == "0o660"
    assert "200" in run_as("nobody", "nogroup", sock).stdout  # nobody, in the socket group
    r = run_as("daemon", None, sock)
    assert "refused 13" in r.stdout, r  # EACCES: not in the group


def egressctl(sock: str, *args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "egressctl")
    return subprocess.run([exe, "--socket", sock, *args], capture_output=True, text=True, timeout=30)


def test_egressctl_against_the_daemon(live, tmp_path):
    lab, sock, connect, _ = live
    r = egressctl(sock, "policies", "list")
    assert r.returncode == 0 and "restricted-etl" in r.stdout and "default-policy" in r.stdout
    doc = world.policy("from-ctl")
    doc["egress"]["network_access"]["allowed_internet_destinations"] = [{"destination": "evil.example", "internet_destination_type": "DNS_NAME"}]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    assert egressctl(sock, "policies", "put", str(f)).returncode == 0
    r = egressctl(sock, "--json", "policies", "get", "from-ctl")
    assert r.returncode == 0 and json.loads(r.stdout)["source"] == "api"
    assert egressctl(sock, "workspaces", "assign", "1001", "from-ctl").returncode == 0
    assert lab.dig(lab.workloads[0], "evil.example").status == "NOERROR"
    assert lab.dig(lab.workloads[0], "pypi.org").status == "NXDOMAIN"
    r = egressctl(sock, "verify", "--workspace", "1001", "pypi.org")
    assert r.returncode == 0 and "DROP" in r.stdout and "from-ctl" in r.stdout
    r = egressctl(sock, "policies", "delete", "from-ctl")
    assert r.returncode == 1 and "RESOURCE_CONFLICT" in r.stderr and "1001" in r.stderr
    assert egressctl(sock, "workspaces", "assign", "1001", "restricted-etl").returncode == 0
    assert egressctl(sock, "policies", "delete", "from-ctl").returncode == 0
    r = egressctl(sock, "--json", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["shim"]["listening"] is True
    r = egressctl("/nonexistent/api.sock", "status")
    assert r.returncode == 2 and "/nonexistent/api.sock" in r.stderr
