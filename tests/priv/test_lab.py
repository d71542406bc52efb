"""The network-namespace lab itself (no firewall running).

Everything here stays inside namespaces the lab creates and uses only documentation ranges
and 10.x addresses inside them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from egressd.lab import DigResult, Lab, LabError, cleanup_stale, parse_dig

_missing = [t for t in ("ip", "dig", "curl", "getent", "/usr/sbin/dnsmasq") if not shutil.which(t)]


def privileged(fn):
    fn = pytest.mark.skipif(_missing != [], reason=f"missing tools: {_missing}")(fn)
    fn = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")(fn)
    return pytest.mark.privileged(fn)


RECORDS = {
    "a.example": ["198.51.100.10", "2001:db8:ff::10"],
    "b.example": ["203.0.113.20"],
    "v6only.example": ["2001:db8:ff::30"],
}
CNAMES = {"alias1.example": "alias2.example", "alias2.example": "a.example"}


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _assert_gone(prefix: str, pids: list[int] = (), tmpdir: Path | None = None) -> None:
    assert not [n for n in _netns_names() if n.startswith(prefix + "-")]
    etc = Path("/etc/netns")
    if etc.is_dir():
        assert not [d for d in etc.iterdir() if d.name.startswith(prefix + "-")]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "processes survived teardown"
    if tmpdir is not None:
        assert not tmpdir.exists()


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0 or _missing:
        pytest.skip("needs root and lab tools")
    with Lab(workloads=2, records=RECORDS, cnames=CNAMES) as lab:
        yield lab


# ----------------------------------------------------------------------------- DNS

@privileged
def test_build_is_fast(lab):
    assert lab.build_seconds is not None
    assert lab.build_seconds < 5, lab.build_seconds


@privileged
def test_dig_a_and_aaaa(lab):
    r = lab.dig("w1", "a.example", server=lab.dns_v4)
    assert r.status == "NOERROR", r.output
    assert r.answers == [("a.example", "A", "198.51.100.10")]
    assert r.ttls == [60]
    r6 = lab.dig("w1", "a.example", server=lab.dns_v4, qtype="AAAA")
    assert r6.status == "NOERROR", r6.output
    assert r6.answers == [("a.example", "AAAA", "2001:db8:ff::10")]
    # the IPv6 listener and the resolv.conf default work too
    assert lab.dig("w2", "b.example", server=lab.dns_v6).addresses == ["203.0.113.20"]
    assert lab.dig("w2", "b.example").addresses == ["203.0.113.20"]
    # a name with only an AAAA record: A is NODATA, not NXDOMAIN
    nodata = lab.dig("w1", "v6only.example")
    assert nodata.status == "NOERROR" and nodata.answers == []


@privileged
def test_unknown_name_is_nxdomain(lab):
    r = lab.dig("w1", "nope.example", server=lab.dns_v4)
    assert r.status == "NXDOMAIN", r.output
    assert r.answers == []
    assert lab.dig("w1", "nope", qtype="AAAA").status == "NXDOMAIN"


@privileged
def test_cname_chain(lab):
    r = lab.dig("w1", "alias1.example", server=lab.dns_v4)
    assert r.status == "NOERROR", r.output
    assert r.answers == [
        ("alias1.example", "CNAME", "alias2.example"),
        ("alias2.example", "CNAME", "a.example"),
        ("a.example", "A", "198.51.100.10"),
    ]
    assert lab.dig("w2", "alias1.example", qtype="AAAA").addresses == ["2001:db8:ff::10"]


@privileged
def test_dns_over_tcp(lab):
    for server in (lab.dns_v4, lab.dns_v6):
        r = lab.dig("w1", "a.example", server=server, tcp=True)
        assert r.status == "NOERROR", r.output
        assert r.addresses == ["198.51.100.10"]


@privileged
def test_dns_query_log(lab):
    lab.clear_dns_queries()
    lab.dig("w2", "b.example")
    lab.dig("w2", "nope2.example", qtype="AAAA")
    assert lab.dns_queries() == ["b.example", "nope2.example"]
    log = lab.dns_query_log()
    assert log[1] == ("AAAA", "nope2.example", lab.workload("w2").ipv4)


@privileged
def test_getent_uses_lab_resolver(lab):
    addrs = lab.getent("w1", "a.example")
    assert set(addrs) == {"198.51.100.10", "2001:db8:ff::10"}
    assert lab.getent("w1", "nope.example") == []


# ---------------------------------------------------------------------------- web

@privileged
def test_curl_by_name(lab):
    status, text, elapsed = lab.curl("w1", "http://b.example/")
    assert status == 200, text
    assert text == "ok host=b.example addr=203.0.113.20\n"
    assert elapsed < 3


@privileged
def test_curl_ipv4_and_ipv6_literals(lab):
    status, text, _ = lab.curl("w2", "http://198.51.100.77/")
    assert (status, text) == (200, "ok host=198.51.100.77 addr=198.51.100.77\n")
    status, text, _ = lab.curl("w2", "http://[2001:db8:ff::10]/", extra=["-6", "-g"])
    assert status == 200, text
    assert "addr=2001:db8:ff::10\n" in text
    status, text, _ = lab.curl("w1", "http://10.200.3.4/")
    assert (status, text) == (200, "ok host=10.200.3.4 addr=10.200.3.4\n")


@privileged
def test_curl_resolve_and_failure(lab):
    status, text, _ = lab.curl("w1", "http://pinned.example/", resolve="pinned.example:80:192.0.2.44")
    assert (status, text) == (200, "ok host=pinned.example addr=192.0.2.44\n")
    # an unknown name: curl fails (status None), no exception
    status, text, _ = lab.curl("w1", "http://nope.example/", timeout=2)
    assert status is None and text


@privileged
def test_tcp_853_connects(lab):
    status, text, _ = lab.curl("w1", "http://198.51.100.10:853/")
    assert status == 200, text
    status, text, _ = lab.curl("w1", "http://[2001:db8:ff::10]:853/", extra=["-g"])
    assert status == 200, text


@privileged
def test_udp_echo_v4_and_v6(lab):
    code = textwrap.dedent("""
        import socket
        for fam, addr in ((socket.AF_INET, "192.0.2.99"), (socket.AF_INET6, "2001:db8:ff::99")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect((addr, 7))   # connected: the reply must come from addr
            s.send(b"ping-" + addr.encode())
            print(s.recv(100).decode())
    """)
    cp = lab.run("w1", [sys.executable, "-c", code], timeout=10)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["ping-192.0.2.99", "ping-2001:db8:ff::99"]


# ------------------------------------------------------------- DNS control

@privileged
def test_set_records_and_cnames():
    with Lab(workloads=1, records={"x.example": ["192.0.2.1"]}) as lab:
        assert lab.dig("w1", "x.example").addresses == ["192.0.2.1"]
        lab.set_records({"x.example": ["192.0.2.2", "2001:db8:ff::2"], "y.example": ["192.0.2.3"]})
        assert lab.dig("w1", "x.example").addresses == ["192.0.2.2"]
        assert lab.dig("w1", "x.example", qtype="AAAA").addresses == ["2001:db8:ff::2"]
        assert lab.dig("w1", "y.example").addresses == ["192.0.2.3"]
        lab.set_records({"y.example": ["192.0.2.3"]}, cnames={"z.example": "y.example"})
        assert lab.dig("w1", "x.example").status == "NXDOMAIN"
        assert lab.dig("w1", "z.example").answers == [
            ("z.example", "CNAME", "y.example"), ("y.example", "A", "192.0.2.3")]


@privileged
def test_stop_and_start_dns():
    with Lab(workloads=1, records={"x.example": ["192.0.2.1"]}) as lab:
        lab.stop_dns()
        r = lab.dig("w1", "x.example", timeout=1)
        assert r.status is None and r.elapsed < 1.5  # port unreachable: fails at once
        assert lab.getent("w1", "x.example") == []
        lab.start_dns()
        assert lab.dig("w1", "x.example").addresses == ["192.0.2.1"]
        lab.stop_dns(blackhole=True)
        r = lab.dig("w1", "x.example", timeout=1)
        assert r.status is None and r.elapsed >= 0.9  # dropped: a timeout
        lab.start_dns()
        assert lab.dig("w1", "x.example", tcp=True).addresses == ["192.0.2.1"]


# ------------------------------------------------------------------ teardown

@privileged
def test_teardown_leaves_nothing():
    with Lab(workloads=2, records={"x.example": ["192.0.2.1"]}) as lab:
        sleeper = lab.popen("w1", ["sleep", "60"])
        # a grandchild that is not tracked directly must die too
        lab.popen("node", ["sh", "-c", "sleep 60 & wait"])
        lab.dig("w1", "x.example", tcp=True)
        pids = [p for ns in lab.namespaces for p in _ns_pids(ns)]
        assert lab.dns.proc.pid in pids and lab.web_proc.pid in pids and sleeper.pid in pids
        assert {w.netns for w in lab.workloads} <= _netns_names()
        assert Path(f"/etc/netns/{lab.workloads[0].netns}/resolv.conf").read_text().startswith(
            "nameserver 203.0.113.2")
        prefix, tmpdir = lab.prefix, lab.tmpdir
        assert tmpdir.is_dir()
    _assert_gone(prefix, pids, tmpdir)
    lab.close()  # idempotent


@privileged
def test_exception_inside_with_tears_down():
    with pytest.raises(ZeroDivisionError):
        with Lab(workloads=1) as lab:
            pids = [p for ns in lab.namespaces for p in _ns_pids(ns)]
            prefix, tmpdir = lab.prefix, lab.tmpdir
            1 / 0
    _assert_gone(prefix, pids, tmpdir)


@privileged
def test_failed_build_tears_down(monkeypatch):
    def boom(self, ready):
        raise LabError("injected failure")
    monkeypatch.setattr(Lab, "_start_web", boom)
    lab = Lab(workloads=2)
    with pytest.raises(LabError, match="injected"):
        with lab:
            pass
    _assert_gone(lab.prefix, tmpdir=lab.tmpdir)


@privileged
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_tears_down(tmp_path, sig):
    script = textwrap.dedent("""
        import signal, sys, time
        from egressd.lab import Lab
        # Like an interactive Ctrl-C even when this test runs in a background job
        # (where SIGINT is inherited as ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with Lab(workloads=1) as lab:
            print(lab.prefix, lab.tmpdir, lab.dns.proc.pid, lab.web_proc.pid, flush=True)
            time.sleep(30)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "daemon") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline().split()
        assert len(line) == 4, p.stderr.read() if p.poll() is not None else line
        prefix, tmpdir, pids = line[0], Path(line[1]), [int(x) for x in line[2:]]
        assert f"{prefix}-w1" in _netns_names()
        p.send_signal(sig)
        p.wait(15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdout.close()
        p.stderr.close()
    _assert_gone(prefix, pids, tmpdir)


@privileged
def test_two_labs_at_once():
    with Lab(workloads=1, records={"x.example": ["192.0.2.1"]}) as a, \
            Lab(workloads=2, records={"x.example": ["192.0.2.2"]}) as b:
        assert a.prefix != b.prefix
        assert a.dig("w1", "x.example").addresses == ["192.0.2.1"]
        assert b.dig("w1", "x.example").addresses == ["192.0.2.2"]
        assert a.curl("w1", "http://x.example/")[1] == "ok host=x.example addr=192.0.2.1\n"
        assert b.curl("w2", "http://x.example/")[1] == "ok host=x.example addr=192.0.2.2\n"
        a_prefix = a.prefix
        a.close()
        _assert_gone(a_prefix)
        # b is unaffected by a's teardown
        assert b.curl("w1", "http://x.example/")[0] == 200
    _assert_gone(b.prefix)


@privileged
def test_cleanup_stale_only_touches_dead_labs():
    # a fake "crashed" lab with a prefix nobody else can use
    dead = f"egz{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", f"{dead}-inet"], check=True, timeout=10)
    etc = Path(f"/etc/netns/{dead}-inet")
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 203.0.113.2\n")
    try:
        with Lab(workloads=1, prefix=f"egz{secrets.token_hex(4)}") as live:
            removed = cleanup_stale(dead)
            assert removed == [f"{dead}-inet"]
            _assert_gone(dead)
            # a live lab of this process is never removed
            assert cleanup_stale(live.prefix) == []
            assert cleanup_stale(live.prefix, force=True) == []
            assert live.dig("w1", "nope.example").status == "NXDOMAIN"
    finally:
        subprocess.run(["ip", "netns", "del", f"{dead}-inet"], capture_output=True, timeout=10)
        shutil.rmtree(etc, ignore_errors=True)


# ------------------------------------------------------------- pure parsing

def test_parse_dig_ede_and_answers():
    out = textwrap.dedent("""\
        ;; Got answer:
        ;; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 15060
        ;; flags: qr rd ra; QUERY: 1, ANSWER: 0, AUTHORITY: 0, ADDITIONAL: 1

        ;; OPT PSEUDOSECTION:
        ; EDNS: version: 0, flags:; udp: 1232
        ; EDE: 15 (Blocked): (blocked by policy "p1")
        """)
    r = parse_dig(out, 0.01)
    assert isinstance(r, DigResult)
    assert r.status == "NXDOMAIN" and r.ede == (15, 'blocked by policy "p1"') and r.ede_code == 15
    assert r.flags == {"qr", "rd", "ra"}
    out2 = (";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n"
            ";; flags: qr aa rd ra; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1\n"
            "; EDE: 3 (Stale Answer)\n"
            "c.example.\t\t60\tIN\tCNAME\ta.example.\n"
            "a.example.\t\t30\tIN\tA\t198.51.100.10\n")
    r2 = parse_dig(out2, 0.0)
    assert r2.answers == [("c.example", "CNAME", "a.example"), ("a.example", "A", "198.51.100.10")]
    assert r2.ttls == [60, 30] and r2.addresses == ["198.51.100.10"] and r2.ede == (3, "")
    timeout = parse_dig(";; communications error to 203.0.113.2#53: timed out\n"
                        ";; no servers could be reached\n", 1.0)
    assert timeout.status is None and timeout.answers == [] and timeout.ede is None


@privileged
def test_set_resolv_conf():
    with Lab(workloads=2, records={"x.example": ["192.0.2.1"]}) as lab:
        lab.set_resolv_conf(["192.0.2.200"], workloads=["w2"])  # nothing listens there
        assert lab.getent("w1", "x.example") == ["192.0.2.1"]
        assert lab.getent("w2", "x.example") == []
        lab.set_resolv_conf([lab.dns_v6])
        assert lab.getent("w2", "x.example") == ["192.0.2.1"]
