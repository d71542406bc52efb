"""The local API's defences, against a daemon in the lab that also listens on TCP with a bearer
token: the request size limit, ids that try to be paths, no secret in any log, and the token
file's mode."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from egressd.api.server import MAX_BODY
from egressd.lab import Lab, world
from egressd.lab.apiclient import call
from egressd.lab.collectorproc import CollectorProc
from egressd.lab.daemonproc import DaemonProc, DaemonStartError

P = "/api/2.0"
TCP = "127.0.0.1:9181"


class Sec:
    def __init__(self, lab: Lab, config: Path, token: str, daemon: DaemonProc, collector: CollectorProc):
        self.lab, self.config, self.token, self.daemon, self.collector = lab, config, token, daemon, collector
        self.sock = str(config.parent / "api.sock")
        self.state = config.parent / "state"

    def api(self, method: str, path: str, body=None):
        return call(self.sock, method, path, body)

    def table(self) -> str:
        out = self.lab.run(self.lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
        return re.sub(r"packets \d+ bytes \d+", "", re.sub(r" expires \S+", "", out))

    def tcp(self, path: str, auth: str | None, method: str = "GET", body: str | None = None) -> tuple[int, str]:
        """curl in the node namespace against the TCP listener: (status, body)."""
        argv = ["curl", "-sS", "-X", method, "--max-time", "10", "-w", "\n%{http_code}"]
        if auth is not None:
            argv += ["-H", f"Authorization: {auth}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", body]
        r = self.lab.run(self.lab.node_ns, [*argv, f"http://{TCP}{path}"], timeout=20)
        text, _, code = r.stdout.rpartition("\n")
        return int(code or 0), text


@pytest.fixture(scope="module")
def sec():
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        collector = CollectorProc(lab)
        collector.start()
        token_file = Path(lab.tmpdir) / "api.token"
        token = secrets.token_urlsafe(32)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, token.encode() + b"\n")
        os.close(fd)
        config = world.write_config(lab, collector_url=collector.url, tcp_listen=TCP, token_file=str(token_file))
        daemon = DaemonProc(lab, config)
        daemon.start()
        try:
            yield Sec(lab, config, token, daemon, collector)
        finally:
            daemon.stop()
            collector.stop()


# --- request size -----------------------------------------------------------------------------

def raw_request(sock_path: str, method: str, path: str, body: bytes, *, chunked: bool = False,
                timeout: float = 30) -> tuple[int, bytes]:
    """Send a request on the unix socket while reading the answer (the server may answer and
    close before it has read the whole body). Returns (status, body of the answer)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    head = f"{method} {path} HTTP/1.1\r\nHost: egressd\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n"
    head += "Connection: close\r\n\r\n"

    def send() -> None:
        try:
            s.sendall(head.encode())
            if chunked:
                step = 1 << 20
                for i in range(0, len(body), step):
                    part = body[i:i + step]
                    s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(body)
        except OSError:
            pass  # the server answered and closed early: fine

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_, _, rest = data.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: (\d+)", head_, re.IGNORECASE)
                if m and len(rest) >= int(m.group(1)):
                    break
    finally:
        sender.join(timeout)
        s.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def padded_policy(pid: str, size: int) -> bytes:
    doc = json.dumps(world.policy(pid)).encode()
    return doc + b" " * (size - len(doc))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_and_changes_nothing(sec, chunked):
    before = sec.table()
    t0 = time.monotonic()
    status, body = raw_request(sec.sock, "PUT", f"{P}/network-policies/too-big",
                               padded_policy("too-big", MAX_BODY + 4096), chunked=chunked)
    elapsed = time.monotonic() - t0
    assert status in (400, 413), (status, body[:300])
    err = json.loads(body)
    assert err["error_code"] == "INVALID_PARAMETER_VALUE" and "too large" in err["message"], err
    assert str(MAX_BODY) in err["message"]
    assert sec.api("GET", f"{P}/network-policies/too-big")[0] == 404
    assert sec.table() == before
    assert sec.api("GET", f"{P}/status")[0] == 200 and sec.daemon.proc.poll() is None
    print(f"{'chunked' if chunked else 'sized'} body of {MAX_BODY + 4096} bytes: {status} in {elapsed:.2f} s")


def test_a_body_just_under_the_limit_is_accepted(sec):
    status, body = raw_request(sec.sock, "PUT", f"{P}/network-policies/just-fits",
                               padded_policy("just-fits", MAX_BODY))
    assert status == 200, body[:300]
    assert sec.api("DELETE", f"{P}/network-policies/just-fits")[0] == 200


@pytest.mark.parametrize("where,depth", [("top", 100_000), ("dry_run_filter", 900), ("dry_run_filter", 990)])
def test_a_deeply_nested_body_is_a_400_not_a_500(sec, where, depth):
    """json.loads gives up (RecursionError) somewhere near depth 970 in the daemon; below that
    the validator names the field. Either way a 400, never a 500 with a traceback."""
    if where == "top":
        raw = b"[" * depth + b"]" * depth
    else:
        doc = world.policy("deep", dry_run=True, products=["DBSQL"])
        raw = json.dumps(doc).replace('["DBSQL"]', "[" * depth + "]" * depth).encode()
    status, body = raw_request(sec.sock, "PUT", f"{P}/network-policies/deep", raw)
    assert status == 400, body[:300]
    err = json.loads(body)
    assert err["error_code"] == "INVALID_PARAMETER_VALUE", err
    if depth == 900:
        assert err["message"].startswith("egress.network_access.policy_enforcement.dry_run_mode_product_filter[0]: ")
    else:
        assert err["message"] == "the body is nested too deeply"
    assert sec.daemon.proc.poll() is None and "api_internal_error" not in sec.daemon.log()
    assert sec.api("GET", f"{P}/network-policies/deep")[0] == 404


# --- ids that look like paths -----------------------------------------------------------------

def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith((".log", ".notify"))}


BAD_IDS = [
    "..%2F..%2Fetc%2Fpasswd", "..%2f..%2f..%2f..%2fetc%2fpasswd", "a%2Fb", "%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows", "a%00b", "%00", "x%0Ay", "x" * 200, "x" * 5000, "%2E%2E%2F",
]
UNROUTABLE = ["../../etc/passwd", "a/b", "x" * 9000]  # more than one segment, or over aiohttp's line limit
WORKLOAD = {"workspace_id": "1003", "product": "APPS", "sources": ["10.77.250.2/32"]}


def attempts(ident: str) -> list[tuple[str, str, object]]:
    pol = world.policy("ignored")
    pol.pop("network_policy_id")
    return [
        ("PUT", f"{P}/network-policies/{ident}", pol),
        ("DELETE", f"{P}/network-policies/{ident}", None),
        ("GET", f"{P}/network-policies/{ident}", None),
        ("PUT", f"{P}/workloads/{ident}", WORKLOAD),
        ("DELETE", f"{P}/workloads/{ident}", None),
        ("PUT", f"{P}/workspaces/{ident}/network", {"network_policy_id": "restricted-etl"}),
        ("GET", f"{P}/workspaces/{ident}/network", None),
        ("PUT", f"{P}/workspaces/{ident}/connections", {"connections": [], "external_locations": []}),
    ]


def test_ids_that_look_like_paths_are_refused_and_touch_no_file(sec):
    root = Path(sec.lab.tmpdir)
    before_files = files_under(root)
    before_table = sec.table()
    passwd = os.stat("/etc/passwd")
    seen: dict[int, int] = {}
    for ident in BAD_IDS + UNROUTABLE:
        for method, path, body in attempts(ident):
            # Raw, so the path is sent as written; aiohttp may answer and close before the body.
            status, raw = raw_request(sec.sock, method, path, json.dumps(body).encode() if body else b"")
            assert status in (400, 404), (method, path[:80], status, raw[:200])
            seen[status] = seen.get(status, 0) + 1
            if ident not in UNROUTABLE[-1:]:  # aiohttp's own line-length refusal is plain text
                answer = json.loads(raw)
                assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"), (
                    method, path[:80], answer)
    print(f"{sum(seen.values())} path-like id requests: {seen}")
    assert files_under(root) == before_files
    assert {p.name for p in sec.state.iterdir()} <= {"spool", "state.json"}
    assert sec.table() == before_table
    after = os.stat("/etc/passwd")
    assert (after.st_mtime_ns, after.st_size) == (passwd.st_mtime_ns, passwd.st_size)
    assert not [p for p in root.rglob("passwd")]
    assert sec.daemon.proc.poll() is None


@pytest.mark.parametrize("ident", ["..", "%2E%2E", "."])
def test_dot_ids_are_legal_names_kept_only_in_the_state_file(sec, ident):
    """`.` and `..` match the SPEC's id pattern ([a-zA-Z0-9_.-]{1,32}); egressctl percent-encodes
    them. They are plain keys of state.json: no file is named after them."""
    name = ident.replace("%2E", ".")
    root = Path(sec.lab.tmpdir)
    before_files = files_under(root)
    pol = world.policy(name)
    status, body = sec.api("PUT", f"{P}/network-policies/{ident}", pol)
    assert status == 200 and body["network_policy_id"] == name, body
    status, body = sec.api("PUT", f"{P}/workloads/{ident}", WORKLOAD)
    assert status == 200 and body["workload_id"] == name, body
    state = json.loads((sec.state / "state.json").read_text())
    assert name in state["policies"] and name in state["workloads"]
    assert files_under(root) - before_files <= {"egressd/state/state.json"}
    assert sec.api("GET", f"{P}/network-policies/{ident}")[1]["network_policy_id"] == name
    assert sec.api("DELETE", f"{P}/workloads/{ident}")[0] == 200
    assert sec.api("DELETE", f"{P}/network-policies/{ident}")[0] == 200
    assert sec.api("GET", f"{P}/network-policies/{ident}")[0] == 404


# --- no secrets in logs -----------------------------------------------------------------------

def test_the_token_is_never_logged(sec, tmp_path):
    token = sec.token
    assert sec.tcp(f"{P}/status", f"Bearer {token}")[0] == 200
    status, body = sec.tcp(f"{P}/network-policies/tok-test", f"Bearer {token}", "PUT",
                           json.dumps(world.policy("tok-test")))
    assert status == 200, body
    # Wrong tokens: one that shares a long prefix with the real one, a bare one, a scheme-less one.
    for auth in (f"Bearer {token[:20]}{'x' * (len(token) - 20)}", f"Bearer {token}x", token,
                 f"Basic {token}", "Bearer ", None):
        status, body = sec.tcp(f"{P}/status", auth)
        assert status == 401 and json.loads(body)["error_code"] == "UNAUTHENTICATED", (auth, status, body)
        assert token[:8] not in body
    status, _ = sec.tcp(f"{P}/network-policies/tok-test", f"Bearer {token[:-1]}", "DELETE")
    assert status == 401
    assert sec.tcp(f"{P}/network-policies/tok-test", f"Bearer {token}", "DELETE")[0] == 200
    # egressctl with a wrong token file says so without echoing either token.
    wrong = tmp_path / "wrong.token"
    wrong.write_text(token[:12] + "y" * 40)
    os.chmod(wrong, 0o600)
    exe = str(Path(sys.executable).parent / "egressctl")
    r = sec.lab.run(sec.lab.node_ns, [exe, "--url", f"http://{TCP}", "--token-file", str(wrong), "status"], timeout=30)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stdout + r.stderr, r
    assert token[:8] not in r.stdout + r.stderr
    # Some denials, so the collector log has content too.
    sec.lab.dig(sec.lab.workloads[0], "secret-check.evil.example")
    time.sleep(1.5)

    daemon_log = sec.daemon.log_path.read_text(errors="replace")
    collector_log = sec.collector.log_path.read_text(errors="replace")
    assert "api_change" in daemon_log and len(collector_log) > 0
    for name, text in (("daemon", daemon_log), ("collector", collector_log)):
        for needle in (token, token[:8], token[-8:], "Authorization", "Bearer"):
            assert needle not in text, f"{needle!r} found in the {name} log"



def test_a_malformed_authorization_header_is_not_logged(sec):
    """aiohttp logs what its HTTP parser refuses with the offending line; egressd.httplog keeps the
    fact and drops the bytes. The same parser serves TCP and the unix socket."""
    marker = "leak" + secrets.token_hex(16)
    for line in (f"Authorization: Bearer {marker}\x00", f"Authorization : Bearer {marker}",
                 f"Authorization: Bearer {marker}{'x' * 9000}"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sec.sock)
        try:
            s.sendall(f"GET {P}/status HTTP/1.1\r\nHost: egressd\r\n{line}\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.0 400")  # refused by aiohttp's parser
        finally:
            s.close()
    time.sleep(0.5)
    text = sec.daemon.log_path.read_text(errors="replace")
    assert marker not in text
    assert "http_request_refused" in text, "the refusal itself is still logged"


# --- the token file's mode --------------------------------------------------------------------

def test_tcp_with_the_0600_token_works(sec):
    assert (Path(sec.lab.tmpdir) / "api.token").stat().st_mode & 0o777 == 0o600
    status, body = sec.tcp(f"{P}/status", f"Bearer {sec.token}")
    assert status == 200 and json.loads(body)["generation"] >= 1


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_a_token_file_others_can_read_or_write_stops_the_start(sec, tmp_path, mode):
    bad = Path(sec.lab.tmpdir) / f"api-{mode:o}.token"
    bad.write_text(secrets.token_urlsafe(32))
    os.chmod(bad, mode)
    text = sec.config.read_text()
    config = sec.config.with_name(f"egressd-{mode:o}.toml")
    config.write_text(text.replace(str(Path(sec.lab.tmpdir) / "api.token"), str(bad))
                      .replace(sec.sock, str(sec.config.parent / f"api-{mode:o}.sock")))
    gen_before = sec.table()
    d = DaemonProc(sec.lab, config, name=f"egressd-{mode:o}")
    with pytest.raises(DaemonStartError):
        d.start(timeout=15)
    out = d.log()
    assert d.proc.returncode not in (0, None), out
    assert str(bad) in out and f"mode {mode:o}" in out and "chmod o-rwx" in out, out
    assert bad.read_text() not in out  # the refusal does not print the token either
    assert "Traceback" not in out
    assert sec.table() == gen_before  # refused before touching the kernel
    assert sec.api("GET", f"{P}/status")[0] == 200  # the running daemon is unaffected
