"""egressctl against fake servers: a daemon API on a unix socket and a collector on loopback TCP.

The fakes run in a background event loop thread, record every request and answer SPEC-shaped JSON;
``main([...])`` runs in the test's thread as it would from the console script.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from egressd.ctl import commands, main, render
from egressd.ctl.client import api_path, segment

POLICY = {
    "network_policy_id": "restricted-etl",
    "egress": {"network_access": {
        "restriction_mode": "RESTRICTED_ACCESS",
        "allowed_internet_destinations": [
            {"destination": "pypi.org", "internet_destination_type": "DNS_NAME"},
            {"destination": "*.githubusercontent.com", "internet_destination_type": "DNS_NAME"},
            {"destination": "198.51.100.0/24", "internet_destination_type": "IP_RANGE"}],
        "blocked_internet_destinations": [
            {"destination": "gist.githubusercontent.com", "internet_destination_type": "DNS_NAME"}],
        "allowed_storage_destinations": [
            {"storage_destination_type": "AWS_S3", "bucket_name": "my-bucket", "region": "us-west-2"}],
        "policy_enforcement": {"enforcement_mode": "DRY_RUN", "dry_run_mode_product_filter": ["DBSQL"]},
    }},
}
DEFAULT = {"network_policy_id": "default-policy",
           "egress": {"network_access": {"restriction_mode": "FULL_ACCESS"}}, "source": "default"}


def event(n: int, time: str, **kw: Any) -> dict[str, Any]:
    e = {"account_id": "node-1", "workspace_id": "1001", "event_id": f"00000000-0000-4000-8000-00000000000{n}",
         "destination_type": "DNS", "destination": f"evil{n}.example",
         "dns_event": {"domain_name": f"evil{n}.example", "rcode": 3}, "storage_event": None,
         "event_time": time, "access_type": "DROP", "network_source_type": "GENERAL_COMPUTE", "ip_event": None,
         "workload_id": "ws1-notebook", "network_policy_id": "restricted-etl", "node": "node-1"}
    return e | kw


E1 = event(1, "2024-05-01T12:00:00.000Z")
E2 = event(2, "2024-05-01T12:00:01.500Z", destination_type="IP", destination="203.0.113.9", dns_event=None,
           ip_event={"source_ip": "10.77.1.2", "destination_ip": "203.0.113.9", "destination_port": 443,
                     "protocol": "TCP"})
E3 = event(3, "2024-05-01T12:00:02.250Z", access_type="LOG_ONLY_DENIAL")


# -- fake servers ----------------------------------------------------------------------------

@dataclass
class Req:
    method: str
    raw_path: str
    path: str
    query: dict[str, str]
    body: Any
    auth: str | None


Answer = tuple[int, Any] | Callable[[Req], tuple[int, Any]]


class Fake:
    """A catch-all aiohttp app: records requests, answers from ``answers[(method, raw_path)]``."""

    def __init__(self, answers: dict[tuple[str, str], Answer]) -> None:
        self.answers = answers
        self.requests: list[Req] = []
        self.delay = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        req = Req(request.method, request.rel_url.raw_path, request.path, dict(request.query),
                  json.loads(raw) if raw else None, request.headers.get("Authorization"))
        self.requests.append(req)
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answers.get((req.method, req.raw_path))
        if answer is None:
            return web.json_response({"error_code": "RESOURCE_DOES_NOT_EXIST",
                                      "message": f"no route {req.method} {req.raw_path}"}, status=404)
        status, doc = answer(req) if callable(answer) else answer
        if isinstance(doc, str):
            return web.Response(text=doc, status=status)
        return web.json_response(doc, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @property
    def last(self) -> Req:
        return self.requests[-1]


def daemon_answers() -> dict[tuple[str, str], Answer]:
    p = "/api/2.0"
    return {
        ("GET", f"{p}/network-policies"): (200, {"items": [DEFAULT, POLICY | {"source": "api"}]}),
        ("GET", f"{p}/network-policies/restricted-etl"): (200, POLICY | {"source": "baked"}),
        ("PUT", f"{p}/network-policies/restricted-etl"): (200, POLICY),
        ("DELETE", f"{p}/network-policies/old"): (200, {}),
        ("DELETE", f"{p}/network-policies/restricted-etl"): (409, {
            "error_code": "RESOURCE_CONFLICT",
            "message": "network policy restricted-etl is bound to workspace 1001"}),
        ("GET", f"{p}/workspaces"): (200, {"items": [
            {"workspace_id": "1001", "network_policy_id": "restricted-etl", "binding_source": "api",
             "restriction_mode": "RESTRICTED_ACCESS", "workloads": ["ws1-notebook", "ws1-sql"],
             "destination_count": 7, "allowed_ips": 12}]}),
        ("GET", f"{p}/workspaces/1001/network"): (200, {"workspace_id": "1001",
                                                        "network_policy_id": "restricted-etl"}),
        ("PUT", f"{p}/workspaces/1001/network"): lambda r: (200, r.body),
        ("GET", f"{p}/workloads"): (200, {"items": [
            {"workload_id": "ws1-notebook", "workspace_id": "1001", "product": "GENERAL_COMPUTE",
             "sources": ["10.77.1.2/32", "2001:db8:77:1::2/128"], "source": "baked"}]}),
        ("GET", f"{p}/workloads/ws1-notebook"): (200, {
            "workload_id": "ws1-notebook", "workspace_id": "1001", "product": "GENERAL_COMPUTE",
            "sources": ["10.77.1.2/32"], "source": "baked"}),
        ("PUT", f"{p}/workloads/ws1-notebook"): lambda r: (200, r.body),
        ("DELETE", f"{p}/workloads/ws1-notebook"): (200, {}),
        ("GET", f"{p}/workspaces/1001/connections"): (200, {
            "connections": [{"name": "pg", "connection_type": "POSTGRESQL", "host": "db.example", "port": 5432}],
            "external_locations": [{"name": "lake", "url": "s3://my-bucket/raw"}]}),
        ("PUT", f"{p}/workspaces/1001/connections"): lambda r: (200, r.body),
        ("POST", f"{p}/verify"): lambda r: (200, {
            "verdict": "DROP" if r.body["destination"] == "evil.example" else "ALLOW",
            "network_policy_id": "restricted-etl",
            "reason": "no allowed destination matches" if r.body["destination"] == "evil.example"
            else "allowed by DNS_NAME pypi.org",
            "matched": None if r.body["destination"] == "evil.example" else "pypi.org"}),
        ("GET", f"{p}/status"): (200, {"version": "0.1.0", "uptime_s": 42, "generation": 7,
                                       "last_apply_ms": 3.5, "sets": {"1001": {"v4": 12, "v6": 1}},
                                       "collector_backlog": 0}),
    }


def collector_answers() -> dict[tuple[str, str], Answer]:
    return {
        ("GET", "/v1/events"): (200, {"events": [E3, E2, E1]}),
        ("POST", "/v1/sql"): (200, {"columns": ["workspace_id", "destination", "dns_event", "ip_event"],
                                    "rows": [["1001", "evil1.example", {"domain_name": "evil1.example", "rcode": 3},
                                              None]],
                                    "truncated": False}),
    }


class Servers:
    def __init__(self, loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
        self.loop = loop
        self.tmp = tmp
        self.sock = str(tmp / "api.sock")
        self.daemon = Fake(daemon_answers())
        self.collector = Fake(collector_answers())
        self.runners: list[web.AppRunner] = []
        self.collector_url = self.daemon_url = ""

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def start(self) -> None:
        d = web.AppRunner(self.daemon.app())
        await d.setup()
        await web.UnixSite(d, self.sock).start()
        c = web.AppRunner(self.collector.app())
        await c.setup()
        site = web.TCPSite(c, "127.0.0.1", 0)
        await site.start()
        self.collector_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        # The same daemon fake over TCP, for --url and --token-file.
        t = web.AppRunner(self.daemon.app())
        await t.setup()
        tsite = web.TCPSite(t, "127.0.0.1", 0)
        await tsite.start()
        self.daemon_url = f"http://127.0.0.1:{tsite._server.sockets[0].getsockname()[1]}"
        self.runners = [d, c, t]

    async def stop(self) -> None:
        for r in self.runners:
            await r.cleanup()

    def run(self, *argv: str) -> int:
        return main(["--socket", self.sock, "--collector", self.collector_url, *argv])


@pytest.fixture
def srv() -> Iterator[Servers]:
    tmp = Path(tempfile.mkdtemp(prefix="ectl", dir="/tmp"))  # short: unix socket paths are limited
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    s = Servers(loop, tmp)
    s.call(s.start())
    try:
        yield s
    finally:
        s.call(s.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


def write(tmp: Path, name: str, doc: Any) -> str:
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# -- policies --------------------------------------------------------------------------------

def test_policies_list_human(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("policies", "list") == 0
    assert (srv.daemon.last.method, srv.daemon.last.raw_path) == ("GET", "/api/2.0/network-policies")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "MODE", "ENFORCEMENT", "#ALLOWED", "#BLOCKED", "#STORAGE", "SOURCE"]
    assert lines[1].split() == ["default-policy", "FULL_ACCESS", "ENFORCED", "0", "0", "0", "default"]
    assert lines[2].split() == ["restricted-etl", "RESTRICTED_ACCESS", "DRY_RUN(DBSQL)", "3", "1", "1", "api"]
    assert lines[1].index("FULL_ACCESS") == lines[2].index("RESTRICTED_ACCESS")  # aligned


@pytest.mark.parametrize("argv", [["--json", "policies", "list"], ["policies", "list", "--json"],
                                  ["policies", "--json", "list"]])
def test_json_before_or_after_subcommand(srv: Servers, capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    assert srv.run(*argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"items": [DEFAULT, POLICY | {"source": "api"}]}
    assert out.startswith('{\n  "items"')  # pretty


def test_policies_get(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("policies", "get", "restricted-etl") == 0
    assert srv.daemon.last.raw_path == "/api/2.0/network-policies/restricted-etl"
    out = capsys.readouterr().out
    for text in ("restricted-etl", "source:", "baked", "RESTRICTED_ACCESS", "DRY_RUN(DBSQL)",
                 "*.githubusercontent.com  (DNS_NAME)", "gist.githubusercontent.com",
                 "AWS_S3  bucket_name=my-bucket region=us-west-2"):
        assert text in out


def test_policies_put_replaces(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(srv.tmp, "p.json", POLICY)
    assert srv.run("policies", "put", path) == 0
    r = srv.daemon.last
    assert (r.method, r.raw_path, r.body) == ("PUT", "/api/2.0/network-policies/restricted-etl", POLICY)
    assert len(srv.daemon.requests) == 1
    assert "policy restricted-etl saved" in capsys.readouterr().out


def test_policies_put_falls_back_to_post_on_404(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    new = POLICY | {"network_policy_id": "new-one"}
    srv.daemon.answers[("POST", "/api/2.0/network-policies")] = lambda r: (200, r.body)
    assert srv.run("policies", "put", write(srv.tmp, "n.json", new)) == 0
    assert [(r.method, r.raw_path) for r in srv.daemon.requests] == [
        ("PUT", "/api/2.0/network-policies/new-one"), ("POST", "/api/2.0/network-policies")]
    assert srv.daemon.last.body == new
    assert "policy new-one created" in capsys.readouterr().out


def test_policies_put_from_stdin(srv: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(POLICY)))
    assert srv.run("policies", "put", "-") == 0
    assert srv.daemon.last.body == POLICY


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"egress": {}}', "network_policy_id is missing"),
    ('{"network_policy_id": 7}', "network_policy_id is missing"),
])
def test_policies_put_bad_file_exits_2(srv: Servers, capsys: pytest.CaptureFixture[str],
                                       content: str, message: str) -> None:
    assert srv.run("policies", "put", write(srv.tmp, "bad.json", content)) == 2
    assert message in capsys.readouterr().err
    assert srv.daemon.requests == []


def test_policies_put_missing_file_exits_2(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("policies", "put", str(srv.tmp / "nope.json")) == 2
    assert "cannot read" in capsys.readouterr().err and srv.daemon.requests == []


def test_policies_put_400_exits_1_with_server_error(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    msg = 'egress.network_access.allowed_internet_destinations[3].destination: "*.*.com" is not a valid DNS_NAME pattern'
    srv.daemon.answers[("PUT", "/api/2.0/network-policies/restricted-etl")] = (
        400, {"error_code": "INVALID_PARAMETER_VALUE", "message": msg})
    assert srv.run("policies", "put", write(srv.tmp, "p.json", POLICY)) == 1
    assert f"INVALID_PARAMETER_VALUE: {msg}" in capsys.readouterr().err
    assert len(srv.daemon.requests) == 1  # no POST fallback on 400


def test_policies_delete(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("policies", "delete", "old") == 0
    assert (srv.daemon.last.method, srv.daemon.last.raw_path) == ("DELETE", "/api/2.0/network-policies/old")
    assert "policy old deleted" in capsys.readouterr().out


def test_policies_delete_conflict_exits_1(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("policies", "delete", "restricted-etl") == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == ("egressctl: RESOURCE_CONFLICT: network policy restricted-etl "
                                    "is bound to workspace 1001")
    assert captured.out == ""


def test_path_segments_are_percent_encoded(srv: Servers) -> None:
    assert srv.run("policies", "get", "a/b?c#d%e f") == 1  # the fake's 404
    assert srv.daemon.last.raw_path == "/api/2.0/network-policies/a%2Fb%3Fc%23d%25e%20f"
    assert srv.daemon.last.path == "/api/2.0/network-policies/a/b?c#d%e f"
    assert srv.run("policies", "delete", "..") == 1
    assert srv.daemon.last.raw_path == "/api/2.0/network-policies/%2E%2E"
    assert srv.run("workspaces", "get", "../status") == 1
    assert srv.daemon.last.raw_path == "/api/2.0/workspaces/..%2Fstatus/network"


def test_segment_helpers() -> None:
    assert segment("ok-id_1.2") == "ok-id_1.2"
    assert segment(".") == "%2E"
    assert api_path("workspaces", "1/2", "network") == "/api/2.0/workspaces/1%2F2/network"


def test_non_json_error_answer_exits_1(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv.daemon.answers[("GET", "/api/2.0/status")] = (502, "upstream gone")
    assert srv.run("status") == 1
    assert "HTTP 502" in capsys.readouterr().err


# -- workspaces, workloads, connections ------------------------------------------------------

def test_workspaces(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("workspaces", "list") == 0
    assert srv.daemon.last.raw_path == "/api/2.0/workspaces"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["WORKSPACE", "POLICY", "MODE", "BOUND_BY", "WORKLOADS", "DESTINATIONS"]
    assert lines[1].split() == ["1001", "restricted-etl", "RESTRICTED_ACCESS", "api", "2", "7"]

    assert srv.run("workspaces", "get", "1001") == 0
    assert (srv.daemon.last.method, srv.daemon.last.raw_path) == ("GET", "/api/2.0/workspaces/1001/network")
    out = capsys.readouterr().out
    assert "workspace_id:" in out and "network_policy_id: restricted-etl" in out

    assert srv.run("workspaces", "assign", "1001", "restricted-etl") == 0
    r = srv.daemon.last
    assert (r.method, r.raw_path) == ("PUT", "/api/2.0/workspaces/1001/network")
    assert r.body == {"workspace_id": "1001", "network_policy_id": "restricted-etl"}
    assert "workspace 1001 now uses network policy restricted-etl" in capsys.readouterr().out


def test_workloads(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("workloads", "list") == 0
    assert srv.daemon.last.raw_path == "/api/2.0/workloads"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["WORKLOAD", "WORKSPACE", "PRODUCT", "SOURCES", "SOURCE"]
    assert lines[1].split() == ["ws1-notebook", "1001", "GENERAL_COMPUTE", "10.77.1.2/32,2001:db8:77:1::2/128",
                                "baked"]

    assert srv.run("workloads", "get", "ws1-notebook") == 0
    assert (srv.daemon.last.method, srv.daemon.last.raw_path) == ("GET", "/api/2.0/workloads/ws1-notebook")
    assert "product:      GENERAL_COMPUTE" in capsys.readouterr().out

    wl = {"workload_id": "ws1-notebook", "workspace_id": "1001", "product": "GENERAL_COMPUTE",
          "sources": ["10.77.1.2/32"]}
    assert srv.run("workloads", "put", write(srv.tmp, "w.json", wl)) == 0
    r = srv.daemon.last
    assert (r.method, r.raw_path, r.body) == ("PUT", "/api/2.0/workloads/ws1-notebook", wl)
    assert "workload ws1-notebook saved" in capsys.readouterr().out
    assert srv.run("workloads", "put", write(srv.tmp, "w2.json", {"workspace_id": "1"})) == 2
    assert "workload_id is missing" in capsys.readouterr().err

    assert srv.run("--json", "workloads", "delete", "ws1-notebook") == 0
    assert (srv.daemon.last.method, srv.daemon.last.raw_path) == ("DELETE", "/api/2.0/workloads/ws1-notebook")
    assert json.loads(capsys.readouterr().out) == {}


def test_connections(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("connections", "get", "1001") == 0
    assert srv.daemon.last.raw_path == "/api/2.0/workspaces/1001/connections"
    out = capsys.readouterr().out
    for text in ("pg", "POSTGRESQL", "db.example", "5432", "lake", "s3://my-bucket/raw"):
        assert text in out
    doc = {"connections": [], "external_locations": [{"name": "l", "url": "gs://b/x"}]}
    assert srv.run("connections", "put", "1001", write(srv.tmp, "c.json", doc)) == 0
    r = srv.daemon.last
    assert (r.method, r.raw_path, r.body) == ("PUT", "/api/2.0/workspaces/1001/connections", doc)
    assert "(0 connections, 1 external locations)" in capsys.readouterr().out


# -- verify, status --------------------------------------------------------------------------

def test_verify_drop_exits_0(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("verify", "--workspace", "1001", "evil.example") == 0
    r = srv.daemon.last
    assert (r.method, r.raw_path) == ("POST", "/api/2.0/verify")
    assert r.body == {"workspace_id": "1001", "product": "GENERAL_COMPUTE", "destination": "evil.example"}
    assert capsys.readouterr().out.strip() == (
        "DROP  evil.example  (network policy restricted-etl: no allowed destination matches)")


def test_verify_allow_with_product_json(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("verify", "--workspace", "1001", "--product", "DBSQL", "pypi.org", "--json") == 0
    assert srv.daemon.last.body["product"] == "DBSQL"
    assert json.loads(capsys.readouterr().out)["verdict"] == "ALLOW"
    assert srv.run("verify", "--workspace", "1001", "pypi.org") == 0
    assert capsys.readouterr().out.startswith("ALLOW  pypi.org  (network policy restricted-etl: allowed by")


def test_status(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("status") == 0
    assert srv.daemon.last.raw_path == "/api/2.0/status"
    lines = capsys.readouterr().out.splitlines()
    assert "version:           0.1.0" in lines
    assert "sets.1001.v4:      12" in lines
    assert any(line.startswith("collector_backlog: 0") for line in lines)


# -- connection and usage errors -------------------------------------------------------------

def test_missing_socket_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "api.sock")
    assert main(["--socket", sock, "status"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"egressctl: cannot connect to {sock}: No such file or directory (is egressd running?)")


def test_stale_socket_connection_refused_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    tmp = tempfile.mkdtemp(prefix="ectl", dir="/tmp")
    try:
        sock = os.path.join(tmp, "api.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(sock)
        s.close()  # the file stays, nobody listens
        assert main(["--socket", sock, "policies", "list"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"egressctl: cannot connect to {sock}: Connection refused (is egressd running?)")
    finally:
        shutil.rmtree(tmp)


def test_socket_permission_denied_exits_2(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        os.chmod(srv.sock, 0)
        assert srv.run("status") == 2
        err = capsys.readouterr().err
    else:  # root ignores file modes: ask as nobody, with the socket left 0600 root
        os.chmod(srv.tmp, 0o755)
        os.chmod(srv.sock, 0o600)
        proc = subprocess.run([sys.executable, "-c", "import sys; from egressd.ctl import main; "
                               f"sys.exit(main(['--socket', {srv.sock!r}, 'status']))"],
                              user=65534, group=65534, capture_output=True, text=True, timeout=30,
                              env={"PYTHONPATH": os.pathsep.join(sys.path), "PATH": os.environ.get("PATH", "")})
        if "ModuleNotFoundError" in proc.stderr or "PermissionError" in proc.stderr:
            pytest.skip(f"cannot run egressctl as nobody here: {proc.stderr.strip()[-200:]}")
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr
    assert f"egressctl: cannot connect to {srv.sock}: Permission denied (" in err
    assert srv.daemon.requests == []


def test_collector_refused_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert main(["--collector", f"http://127.0.0.1:{port}", "logs"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"egressctl: cannot connect to http://127.0.0.1:{port}: Connection refused (is egress-collector running?)")


def test_timeout_exits_2(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv.daemon.delay = 2
    assert srv.run("--timeout", "0.2", "status") == 2
    assert capsys.readouterr().err.strip() == (
        f"egressctl: cannot connect to {srv.sock}: no answer within 0.2 s (is egressd running?)")


@pytest.mark.parametrize("argv", [
    [], ["policies"], ["frobnicate"], ["policies", "get"], ["verify", "evil.example"],
    ["verify", "--workspace", "1", "--product", "NOPE", "x"], ["logs", "--access-type", "ALLOW"],
    ["logs", "--limit", "0"], ["--timeout", "-1", "status"], ["--token-file", "/dev/null", "status"],
    ["--socket", "/x", "--url", "http://127.0.0.1:1", "status"], ["--url", "ftp://x", "status"],
    ["policies", "get", ""],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--help"]) == 0
    assert "exit code is 0 whatever the verdict" in " ".join(capsys.readouterr().out.split())


def test_url_with_bearer_token(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    token = write(srv.tmp, "api.token", "  s3cret-token\n")
    assert main(["--url", srv.daemon_url, "--token-file", token, "status"]) == 0
    assert srv.daemon.last.auth == "Bearer s3cret-token"
    assert srv.daemon.last.raw_path == "/api/2.0/status"
    assert main(["--url", srv.daemon_url, "--token-file", str(srv.tmp / "missing"), "status"]) == 2
    assert "cannot read token file" in capsys.readouterr().err


def test_unauthenticated_exits_1(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv.daemon.answers[("GET", "/api/2.0/status")] = (401, {"error_code": "UNAUTHENTICATED",
                                                            "message": "missing bearer token"})
    assert main(["--url", srv.daemon_url, "status"]) == 1
    assert srv.daemon.last.auth is None
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err


# -- logs ------------------------------------------------------------------------------------

def test_logs_query_parameters_and_table(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("logs", "--since", "2h", "--access-type", "DROP", "--workspace", "1001",
                   "--destination-type", "DNS", "--limit", "5") == 0
    r = srv.collector.last
    assert (r.method, r.raw_path) == ("GET", "/v1/events")
    assert r.query == {"since": "2h", "access_type": "DROP", "workspace_id": "1001",
                       "destination_type": "DNS", "limit": "5"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["EVENT_TIME", "ACCESS_TYPE", "WORKSPACE_ID", "NETWORK_SOURCE_TYPE",
                                "DESTINATION_TYPE", "DESTINATION", "WORKLOAD_ID", "NETWORK_POLICY_ID"]
    # Newest first on the wire, oldest first on screen.
    assert [line.split()[0] for line in lines[1:]] == [E1["event_time"], E2["event_time"], E3["event_time"]]
    assert lines[2].split()[1:] == ["DROP", "1001", "GENERAL_COMPUTE", "IP", "203.0.113.9:443/TCP",
                                    "ws1-notebook", "restricted-etl"]
    assert "evil1.example" in lines[1] and "LOG_ONLY_DENIAL" in lines[3]


def test_logs_no_filters_and_json(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("logs", "--json") == 0
    assert srv.collector.last.query == {}
    assert json.loads(capsys.readouterr().out) == {"events": [E3, E2, E1]}


def test_logs_empty(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv.collector.answers[("GET", "/v1/events")] = (200, {"events": []})
    assert srv.run("logs") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no events" in captured.err


def test_logs_collector_refuses_exits_1(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    srv.collector.answers[("GET", "/v1/events")] = (400, {
        "error_code": "INVALID_PARAMETER_VALUE", "message": "since: 'yesterday' is neither ..."})
    assert srv.run("logs", "--since", "yesterday") == 1
    assert "INVALID_PARAMETER_VALUE: since: 'yesterday'" in capsys.readouterr().err


def _polls(srv: Servers, answers: list[list[dict[str, Any]]]) -> None:
    queue = list(answers)
    srv.collector.answers[("GET", "/v1/events")] = lambda r: (200, {"events": queue.pop(0) if queue else []})


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, polls: int) -> list[float]:
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= polls:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands, "sleep", fake_sleep)
    return sleeps


def test_logs_follow_prints_each_event_once(srv: Servers, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _polls(srv, [[E2, E1], [E3, E2]])
    sleeps = _interrupt_after(monkeypatch, 2)
    assert srv.run("logs", "--follow", "--workspace", "1001") == 0
    assert sleeps == [1.0, 1.0]
    first, second = srv.collector.requests
    assert first.query == {"workspace_id": "1001"}
    # Since the newest event seen (E2 at 12:00:01.500) minus the late-arrival lookback.
    assert second.query == {"workspace_id": "1001", "since": "2024-05-01T11:59:51.500Z", "limit": "1000"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("EVENT_TIME")
    assert [line.split()[0] for line in lines[1:]] == [E1["event_time"], E2["event_time"], E3["event_time"]]


def test_logs_follow_json_lines(srv: Servers, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    _polls(srv, [[E1], [E2, E1], [E3, E2, E1]])
    _interrupt_after(monkeypatch, 3)
    assert srv.run("--json", "logs", "-f", "--limit", "50") == 0
    assert srv.collector.requests[0].query == {"limit": "50"}
    assert srv.collector.requests[1].query["limit"] == "50"
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event_id"] for line in out] == [E1["event_id"], E2["event_id"], E3["event_id"]]


def test_logs_follow_survives_a_collector_outage(srv: Servers, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _polls(srv, [[E1]])
    calls = 0

    async def fake_sleep(seconds: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            srv.call(srv.runners[1].cleanup())  # collector goes away
        if calls == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands, "sleep", fake_sleep)
    assert srv.run("logs", "--follow") == 0
    captured = capsys.readouterr()
    assert "evil1.example" in captured.out
    assert captured.err.count("Connection refused") == 1  # said once, not at every poll


def test_logs_follow_unreachable_at_start_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert main(["--collector", f"http://127.0.0.1:{port}", "logs", "--follow"]) == 2


def test_logs_sql_table(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    q = "select * from system.access.outbound_network where event_time >= current_timestamp() - interval 2 hour"
    assert srv.run("logs", "sql", q) == 0
    r = srv.collector.last
    assert (r.method, r.raw_path, r.body) == ("POST", "/v1/sql", {"query": q})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["workspace_id", "destination", "dns_event", "ip_event"]
    assert lines[1].split() == ["1001", "evil1.example", '{"domain_name":"evil1.example","rcode":3}', "NULL"]
    assert lines[2] == "(1 row)"


def test_logs_sql_json_and_refusal(srv: Servers, capsys: pytest.CaptureFixture[str]) -> None:
    assert srv.run("logs", "sql", "select 1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == collector_answers()[("POST", "/v1/sql")][1]
    srv.collector.answers[("POST", "/v1/sql")] = (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                                        "message": "query: only SELECT is allowed"})
    assert srv.run("logs", "sql", "delete from system.access.outbound_network") == 1
    assert "INVALID_PARAMETER_VALUE: query: only SELECT is allowed" in capsys.readouterr().err


# -- render ----------------------------------------------------------------------------------

def test_render_escapes_control_characters() -> None:
    assert render.clean("evil\x1b[31m.example\n") == "evil\\x1b[31m.example\\n"
    out = render.table(["A", "B"], [["x\x07", None]])
    assert "\x07" not in out and "\\x07" in out and out.splitlines()[1].endswith("-")


def test_render_ip_destinations() -> None:
    v6 = {"destination_type": "IP", "destination": "2001:db8::1",
          "ip_event": {"destination_ip": "2001:db8::1", "destination_port": 443, "protocol": "TCP"}}
    icmp = {"destination_type": "IP", "destination": "203.0.113.9",
            "ip_event": {"destination_ip": "203.0.113.9", "destination_port": None, "protocol": "ICMP"}}
    assert render.event_destination(v6) == "[2001:db8::1]:443/TCP"
    assert render.event_destination(icmp) == "203.0.113.9/ICMP"


def test_render_growing_table_keeps_header_once() -> None:
    t = render.GrowingTable(["A", "B"])
    assert t.lines([]) == []
    assert t.lines([["x", "y"]]) == ["A  B", "x  y"]
    assert t.lines([["long", "z"]]) == ["long  z"]
