"""Floods: egressd stays up, fails closed and keeps serving the other workloads.

Its own lab: w1 (workspace 1001, restricted-etl, enforced) is the attacker; w2 (workspace 1002,
bound over the API to restricted-etl, enforced, not dry run) is the bystander. The daemon runs
with the defaults [dns] rate_limit_qps = 500, rate_limit_burst = 1000, max_inflight = 2048 and
[enforcement] log_rate = 50 (burst 100), at nice -10 (see DAEMON_NICE).

- A million unique names from w1, as fast as one sender can push them (at most 60 s): the
  daemon's RSS stays bounded, its API answers, the flood is refused cheaply, and the event
  pipeline (Folder, shipper queue, spool) stays bounded because a rate-limited query makes no
  event. w2 must stay served, at 5,000 queries/s (ten times the limit) and at full speed: the
  kernel drops a source's UDP queries beyond 4x the limit in front of the shim
  (egressd_dns_flood_drops_total), so the flood cannot fill the shim socket's receive queue and
  crowd w2 out.
- An NFLOG storm (200,000 new flows to denied IPs): the packet log is bounded by the kernel's
  per-source limit, the rest is counted as suppressed, the API answers within 200 ms
  throughout, and the daemon's CPU stays low.

Bounds:
- RSS grows by < 100 MB and stays < 200 MB: what a DNS flood can make the daemon hold is the
  Folder (<= 65,536 keys, ~15 MB), the shipper's memory queue (<= 20,000 events, ~40 MB) and
  one rate-limit bucket per workload; the shim's socket queue is kernel memory. The daemon
  starts at ~60 MB.
- Events from a flood <= burst + rate x seconds: only queries within the limit reach the policy.
- w2 during the absorbable flood: no query dropped in front of the shim (the node's UDP
  RcvbufErrors stay 0), none fails (1 s timeout, one try), p50 < 50 ms and p99 < 200 ms. Without
  a flood w2's p99 is ~10 ms here, and 5-35 ms during it; a query queued behind a full shim
  socket (8 MB of small datagrams, thousands of queries, drained at ~20,000/s) would wait
  >= 250 ms, and most would be dropped. The margin is for shared two-CPU test hosts (load 5-8).
- Packet-log messages <= 2 x log_rate + log_rate x seconds (the kernel's per-source bucket).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from egressd.lab import Lab, parse_dig, world
from egressd.lab.apiclient import call
from egressd.lab.collectorproc import CollectorProc
from egressd.lab.daemonproc import DaemonProc
from egressd.lab.kmem import stock_socket_maxima
from egressd.netns import entered
from egressd.shim import _bind as shim_bind

pytestmark = pytest.mark.slow

QPS, BURST = 500, 1000  # [dns] rate_limit_qps, rate_limit_burst (defaults)
LOG_RATE, LOG_BURST = 50, 100  # [enforcement] log_rate (default), burst twice that
FLOOD_NAMES, FLOOD_SECONDS = 1_000_000, 60.0
PACED_QPS, PACED_SECONDS = 5_000, 20.0
STORM_PACKETS, STORM_SECONDS = 200_000, 15.0
# The node gives its firewall daemon CPU priority over the workloads it polices (the flooder, and
# on a shared test host everything else). Without it, the latency measured here is the host's
# CPU contention: the daemon was seen waiting for a CPU 75-88% of the time (schedstat) while w2's
# queries took 0.2-1 s, whatever egressd did.
DAEMON_NICE = -10

# w1: send n unique-name A queries (any :53 is redirected to the shim) as fast as the socket
# takes them, or paced at `rate` per second; fire and forget: answers are drained in bounded
# batches so the socket's receive queue stalls nothing. Bounded by count and by time.
FLOOD = textwrap.dedent(
    r"""
    import json, socket, struct, sys, time
    n, seconds, tag, rate = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("203.0.113.2", 53))
    s.setblocking(False)
    suffix = bytes([len(tag)]) + tag + b"\x04evil\x07example\x00\x00\x01\x00\x01"
    hdr = struct.Struct("!HHHHHH")
    rcodes = {}
    sent = 0

    def drain(limit):
        for _ in range(limit):
            try:
                a = s.recv(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            rc = a[3] & 15
            rcodes[rc] = rcodes.get(rc, 0) + 1

    t0 = time.monotonic()
    deadline = t0 + seconds
    step = 0 if rate else 63  # paced: look at the clock before every query, so they stay evenly spread
    while sent < n:
        if not sent & step:
            now = time.monotonic()
            if now > deadline:
                break
            if not sent & 1023:
                drain(256)
            if rate and sent / rate > now - t0:
                time.sleep(sent / rate - (now - t0))
        label = b"f%d" % sent
        try:
            s.send(hdr.pack(sent & 0xFFFF, 0x0100, 1, 0, 0, 0) + bytes([len(label)]) + label + suffix)
            sent += 1
        except BlockingIOError:
            drain(256)
        except ConnectionRefusedError:
            pass
    elapsed = time.monotonic() - t0
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        drain(1024)
        time.sleep(0.01)
    print(json.dumps({"sent": sent, "seconds": elapsed, "answers": {str(k): v for k, v in rcodes.items()}}))
    """
)

# w2: resolve allowed names one after another (10 ms apart) until a stop file appears or for at
# most `seconds`; each must come back NOERROR with an answer within 1 s, in one try.
PROBE = textwrap.dedent(
    r"""
    import json, os, random, socket, struct, sys, time
    seconds, stop_file = float(sys.argv[1]), sys.argv[2]
    names = ["pypi.org", "files.pythonhosted.org", "raw.githubusercontent.com", "a.b.githubusercontent.com"]
    hdr = struct.Struct("!HHHHHH")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("203.0.113.2", 53))
    s.settimeout(1.0)
    lat, failures, slow = [], [], []
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds and not os.path.exists(stop_file):
        i += 1
        name = names[i % len(names)]
        qid = random.randrange(65536)
        q = hdr.pack(qid, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0\0\1\0\1"
        start = time.monotonic()
        s.send(q)
        try:
            while True:
                a = s.recv(4096)
                if struct.unpack("!H", a[:2])[0] == qid:
                    break
            rc, ancount = a[3] & 15, struct.unpack("!H", a[6:8])[0]
            if rc != 0 or ancount == 0:
                failures.append(f"{name}: rcode {rc}, {ancount} answers")
            else:
                lat.append(time.monotonic() - start)
                if lat[-1] > 0.1:
                    slow.append((round(start - t0, 2), round(lat[-1], 3)))
        except OSError as e:
            failures.append(f"{name}: {e!r} after {time.monotonic() - start:.3f}s")
        time.sleep(0.01)
    print(json.dumps({"latencies": lat, "failures": failures, "slow": slow[:20]}))
    """
)

# w1: n new flows (UDP, one datagram each) to denied addresses and ports, as fast as the socket
# takes them; bounded by count and by time. A rejected flow is never confirmed in conntrack, so
# every datagram is a new flow that meets the log rule.
STORM = textwrap.dedent(
    r"""
    import json, socket, sys, time
    n, seconds = int(sys.argv[1]), float(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    t0 = time.monotonic()
    while sent < n and (sent & 1023 or time.monotonic() - t0 < seconds):
        try:
            s.sendto(b"x", ("192.0.2.%d" % (100 + sent % 50), 20000 + sent % 1000))
        except OSError:
            pass
        sent += 1
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}))
    """
)


class FloodEnv:
    def __init__(self, lab: Lab, daemon: DaemonProc, config, collector: CollectorProc) -> None:
        self.lab, self.daemon, self.config, self.collector = lab, daemon, config, collector
        self.w1, self.w2 = lab.workloads[:2]
        self.pid = daemon.proc.pid

    def api(self, method: str, path: str, body=None, timeout: float = 10) -> tuple[int, object]:
        return call(str(self.config.parent / "api.sock"), method, path, body, timeout=timeout)

    def status(self) -> dict:
        code, body = self.api("GET", "/api/2.0/status")
        assert code == 200, body
        return body

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.api("GET", "/metrics")
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.split(" ")[0] == want:
                return float(line.split()[-1])
        return 0.0

    def rss_kb(self, key: str = "VmRSS") -> int:
        """VmRSS (or VmHWM, the peak) of the daemon process, in kB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def udp_rcvbuf_errors(self) -> int:
        """UDP datagrams the node namespace dropped because a socket's receive queue was full."""
        snmp = self.lab.run(self.lab.node_ns, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        names, values = [line.split() for line in snmp if line.startswith("Udp:")][:2]
        return int(values[names.index("RcvbufErrors")])

    def settle(self, timeout: float = 30) -> dict:
        """Wait until every event is delivered to the collector; return the status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["collector"]["backlog"] == 0 or time.monotonic() > deadline:
                return st
            time.sleep(0.25)


@pytest.fixture(scope="module")
def fenv():
    with Lab(workloads=2, records=world.records(race=0), cnames=world.CNAMES) as lab:
        collector = CollectorProc(lab)
        collector.start()
        config = world.write_config(lab, collector_url=collector.url)
        daemon = DaemonProc(lab, config)
        daemon.start()
        try:
            env = FloodEnv(lab, daemon, config, collector)
            # `ip netns exec` execs: the Popen's pid is the daemon itself, not a wrapper.
            with open(f"/proc/{env.pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            assert b"egressd.cli" in cmdline and b"run" in cmdline, cmdline
            for tid in os.listdir(f"/proc/{env.pid}/task"):  # nice is per thread on Linux
                os.setpriority(os.PRIO_PROCESS, int(tid), DAEMON_NICE)
            code, body = env.api("PUT", "/api/2.0/workspaces/1002/network", {"network_policy_id": "restricted-etl"})
            assert code == 200, body
            assert env.lab.dig(env.w2, "evil.example").status == "NXDOMAIN"  # w2 is enforced, not dry run
            assert env.lab.dig(env.w2, "pypi.org").status == "NOERROR"
            yield env
        finally:
            daemon.stop()
            collector.stop()


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class Sampler(threading.Thread):
    """Every 50 ms: time GET /api/2.0/status (a failure counts as 10 s) and sample the RSS."""

    def __init__(self, env: FloodEnv) -> None:
        super().__init__(daemon=True)
        self.env = env
        self.api: list[float] = []
        self.rss_peak = env.rss_kb()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            try:
                code, _ = self.env.api("GET", "/api/2.0/status", timeout=5)
                self.api.append(time.monotonic() - t if code == 200 else 10.0)
            except OSError:
                self.api.append(10.0)
            self.rss_peak = max(self.rss_peak, self.env.rss_kb())
            self._halt.wait(0.05)

    def finish(self) -> None:
        self._halt.set()
        self.join(15)


def _say(config: pytest.Config, text: str) -> None:
    """Print past pytest's capture (the measurements are part of the result)."""
    with config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(text)


def dns_flood(env: FloodEnv, n: int, seconds: float, rate: float, config: pytest.Config) -> dict:
    """w1 floods n unique names while w2 resolves allowed names; returns the measurements."""
    tag = f"fl{uuid.uuid4().hex[:6]}"
    assert env.lab.dig(env.w1, f"warm.{tag}.evil.example").status == "NXDOMAIN"
    time.sleep(max(BURST / QPS, 1.0))  # w1's bucket is full again
    env.settle()
    rss0, cpu0, drops0 = env.rss_kb(), env.cpu_seconds(), env.udp_rcvbuf_errors()
    limited0 = env.metric("egressd_dns_rate_limited_total", workspace_id="1001")
    kdrop0 = env.metric("egressd_dns_flood_drops_total")
    queries0 = env.status()["shim"]["stats"].get("queries", 0)
    stop_file = env.lab.tmpdir / f"{tag}.stop"
    probe = env.lab.popen(env.w2.netns, [sys.executable, "-c", PROBE, str(seconds + 10), str(stop_file)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(env)
    sampler.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    flood = env.lab.popen(env.w1.netns, [sys.executable, "-c", FLOOD, str(n), str(seconds), tag, str(rate)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = flood.communicate(timeout=seconds + 15)
    finally:
        flood.kill()
        stop_file.touch()
        sampler.finish()
    wall = time.monotonic() - t0
    pout, perr = probe.communicate(timeout=15)
    assert flood.returncode == 0, err
    assert probe.returncode == 0, perr
    f, p = json.loads(out), json.loads(pout)
    cpu = env.cpu_seconds() - cpu0
    assert env.daemon.proc.poll() is None, env.daemon.log()
    st = env.settle()
    rss1 = env.rss_kb()
    (row,) = env.collector.sql(
        f"select count(*) as n from system.access.outbound_network where destination like '%.{tag}.evil.example'")
    lat = p["latencies"]
    r = {
        "flood_sent": f["sent"], "flood_seconds": round(f["seconds"], 2), "flood_qps": round(f["sent"] / f["seconds"]),
        "wall_seconds": round(wall, 2),
        "shim_queries": st["shim"]["stats"]["queries"] - queries0,
        "dropped_at_shim_socket": env.udp_rcvbuf_errors() - drops0,
        "rate_limited": int(env.metric("egressd_dns_rate_limited_total", workspace_id="1001") - limited0),
        "kernel_dropped": int(env.metric("egressd_dns_flood_drops_total") - kdrop0),
        "answers_seen_by_w1": f["answers"], "events_stored": row["n"] - 1,  # minus the warm-up name
        "rss_mb_before": round(rss0 / 1024, 1), "rss_mb_peak": round(sampler.rss_peak / 1024, 1),
        "rss_mb_after": round(rss1 / 1024, 1), "rss_mb_hwm": round(env.rss_kb("VmHWM") / 1024, 1),
        "daemon_cpu_seconds": round(cpu, 2),
        "w2_answers": len(lat), "w2_failures": len(p["failures"]), "w2_failure_samples": p["failures"][:3],
        "w2_p50_ms": _ms(_pct(lat, 50)), "w2_p99_ms": _ms(_pct(lat, 99)), "w2_max_ms": _ms(max(lat, default=0)), "w2_slow": p["slow"],
        "api_polls": len(sampler.api), "api_p50_ms": _ms(_pct(sampler.api, 50)), "api_p99_ms": _ms(_pct(sampler.api, 99)),
        "api_max_ms": _ms(max(sampler.api, default=0)),
        "collector": {k: st["collector"][k] for k in ("queued", "backlog", "spool_events", "spooled_bytes", "dropped_oldest", "dropped_newest")},
        "reporter": st["events"],
    }
    r["_api"] = sampler.api
    _say(config, f"\nDNS flood (rate {rate or 'max'}): " + json.dumps({k: v for k, v in r.items() if not k.startswith("_")}))
    return r


@pytest.fixture(scope="module")
def full_flood(fenv, request):
    return dns_flood(fenv, FLOOD_NAMES, FLOOD_SECONDS, 0, request.config)


def test_a_million_names_leave_rss_bounded(full_flood):
    r = full_flood
    assert r["flood_sent"] == FLOOD_NAMES or r["flood_seconds"] >= FLOOD_SECONDS - 1
    assert (r["rss_mb_peak"] - r["rss_mb_before"]) < 100 and r["rss_mb_after"] < 200
    assert r["rss_mb_hwm"] < 200


def test_the_flood_is_refused_cheaply_and_makes_bounded_events(full_flood):
    r = full_flood
    # Everything past the bucket got a fast REFUSED; only what fit the limit reached the policy.
    admitted_max = BURST + QPS * (r["wall_seconds"] + 1)
    w1_queries = r["shim_queries"] - r["w2_answers"] - r["w2_failures"]  # w2's are counted too
    assert r["rate_limited"] >= w1_queries - admitted_max
    assert r["rate_limited"] > 0.5 * r["shim_queries"] > 0
    assert 0 < r["events_stored"] <= admitted_max
    assert r["answers_seen_by_w1"].get("5", 0) > 0  # REFUSED reached the flooder
    # The pipeline stayed bounded: all delivered, nothing spooled, nothing dropped.
    c = r["collector"]
    assert c["backlog"] == 0 and c["spool_events"] == 0 and c["dropped_oldest"] == 0 and c["dropped_newest"] == 0


def test_the_api_answers_during_the_flood(full_flood):
    r = full_flood
    assert r["api_polls"] > 20
    assert max(r["_api"]) < 1.0  # every poll answered (a failed one counts as 10 s), within 1 s


def test_w2_recovers_at_once_after_the_flood(fenv, full_flood):
    t = time.monotonic()
    r = fenv.lab.dig(fenv.w2, "files.pythonhosted.org", timeout=1)
    assert r.status == "NOERROR" and r.addresses and time.monotonic() - t < 1.0


def test_w2_during_a_full_speed_flood(full_flood):
    r = full_flood
    # The kernel's per-source budget (4 x rate_limit_qps) drops most of the flood before the shim.
    assert r["kernel_dropped"] > 0.5 * r["flood_sent"], r
    assert r["dropped_at_shim_socket"] == 0
    assert r["w2_failures"] == 0 and r["w2_p99_ms"] < 200, r["w2_failure_samples"]


def test_w2_is_served_during_a_flood_the_shim_absorbs(fenv, request):
    """5,000 unique names per second from w1 for 20 s, ten times its limit: nothing of w2's is
    dropped or fails, and its latency stays far below a resolver's timeout."""
    r = dns_flood(fenv, int(PACED_QPS * PACED_SECONDS), PACED_SECONDS + 5, PACED_QPS, request.config)
    assert r["flood_sent"] == PACED_QPS * PACED_SECONDS
    assert r["dropped_at_shim_socket"] == 0  # nobody's query was lost in front of the shim
    assert r["w2_failures"] == 0 and r["w2_answers"] > 200, r["w2_failure_samples"]
    assert r["w2_p50_ms"] < 50 and r["w2_p99_ms"] < 200, r["w2_slow"]
    # Past the budget: dropped by the kernel (over 4 x the limit) or refused by the shim.
    assert r["rate_limited"] + r["kernel_dropped"] >= r["flood_sent"] - (BURST + QPS * (r["wall_seconds"] + 1))
    assert r["kernel_dropped"] <= r["flood_sent"] - 4 * QPS * PACED_SECONDS * 0.9
    assert r["rss_mb_peak"] - r["rss_mb_before"] < 100
    assert 0 < r["events_stored"] <= BURST + QPS * (r["wall_seconds"] + 1)


def test_over_the_limit_is_refused_at_once_with_ede_and_only_for_that_workload(fenv):
    """While w1 sends 1,900 queries/s (almost four times its limit, just under the kernel's budget
    of four times: every query reaches the shim, and its bucket stays about empty), its queries
    get REFUSED with EDE 0 "rate limited" at once; w2 and the node itself are answered as usual. A
    token refilled at 500/s waits a little for the flood to take it (longer when the sender or the
    shim was descheduled), so now and then one of w1's digs finds one: hence thirty-two, twelve
    refused at least (21 and 24 of 32 in two timed runs here, about 1.3 s of digs within the 4 s
    flood; with sixteen and eight, 7 of 16 was seen once in CI)."""
    env = fenv
    limited0 = env.metric("egressd_dns_rate_limited_total", workspace_id="1001")
    kdrop0 = env.metric("egressd_dns_flood_drops_total")
    flood = env.lab.popen(env.w1.netns, [sys.executable, "-c", FLOOD, "20000", "4", f"ede{uuid.uuid4().hex[:6]}", "1900"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the burst of 1,000 is gone after 0.7 s at 1,900/s (refilled at 500/s)
        w1 = [env.lab.dig(env.w1, "pypi.org", extra=["+edns=0"]) for _ in range(32)]
        r2 = env.lab.dig(env.w2, "pypi.org")
        node = env.lab.run(env.lab.node_ns, ["dig", "@127.0.0.1", "-p", "10053", "+time=2", "+tries=1",
                                              "+noall", "+answer", "+comments", "pypi.org", "A"], timeout=10)
    finally:
        _, err = flood.communicate(timeout=20)
    assert flood.returncode == 0, err
    refused = [r for r in w1 if r.status == "REFUSED"]
    assert len(refused) >= 12 and {r.status for r in w1} <= {"REFUSED", "NOERROR"}, [r.output for r in w1]
    for r in refused:
        assert r.elapsed < 1.0 and r.ede is not None, r.output
        assert r.ede[0] == 0 and "rate limited" in r.ede[1] and "ws1-notebook" in r.ede[1], r.output
    assert r2.status == "NOERROR" and r2.addresses
    rn = parse_dig(node.stdout + node.stderr, 0.0)
    assert rn.status == "NOERROR" and rn.addresses, rn.output
    assert env.metric("egressd_dns_rate_limited_total", workspace_id="1001") - limited0 > 1000
    assert env.metric("egressd_dns_rate_limited_total", workspace_id="1002") == 0
    assert env.metric("egressd_dns_flood_drops_total") == kdrop0  # under the kernel's budget


def test_nflog_storm_is_bounded_by_the_kernel_log_limit(fenv, request):
    env = fenv
    env.settle()
    where = "destination_type = 'IP' and workload_id = 'ws1-notebook'"
    (row,) = env.collector.sql(f"select count(*) as n from system.access.outbound_network where {where}")
    stored0 = row["n"]
    suppressed0 = env.metric("egressd_log_suppressed_packets_total", workspace_id="1001")
    received0 = env.status()["packet_log"]["received"]
    cpu0 = env.cpu_seconds()
    sampler = Sampler(env)
    sampler.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    storm = env.lab.popen(env.w1.netns, [sys.executable, "-c", STORM, str(STORM_PACKETS), str(STORM_SECONDS)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = storm.communicate(timeout=STORM_SECONDS + 15)
    finally:
        storm.kill()
    t1 = time.monotonic()
    time.sleep(1.0)  # the last log messages reach the daemon; keep polling meanwhile
    sampler.finish()
    cpu = env.cpu_seconds() - cpu0
    assert storm.returncode == 0, err
    s = json.loads(out)
    st = env.settle()
    received = st["packet_log"]["received"] - received0
    suppressed = int(env.metric("egressd_log_suppressed_packets_total", workspace_id="1001") - suppressed0)
    (row,) = env.collector.sql(f"select count(*) as n from system.access.outbound_network where {where}")
    stored = row["n"] - stored0
    storm_s = t1 - t0
    bound = LOG_BURST + LOG_RATE * storm_s
    report = {
        "sent": s["sent"], "storm_seconds": round(s["seconds"], 2), "pps": round(s["sent"] / s["seconds"]),
        "log_messages": received, "log_bound": round(bound), "suppressed": suppressed, "ip_events_stored": stored,
        "nflog": st["packet_log"], "daemon_cpu_seconds": round(cpu, 2),
        "daemon_cpu_percent": round(100 * cpu / (storm_s + 1.3), 1),
        "api_polls": len(sampler.api), "api_p50_ms": _ms(_pct(sampler.api, 50)), "api_p99_ms": _ms(_pct(sampler.api, 99)),
        "api_max_ms": _ms(max(sampler.api, default=0)), "rss_mb": round(env.rss_kb() / 1024, 1),
    }
    _say(request.config, "\nNFLOG storm: " + json.dumps(report))
    assert s["sent"] == STORM_PACKETS or s["seconds"] >= STORM_SECONDS
    assert env.daemon.proc.poll() is None
    # The kernel's per-source bucket bounds the log; what it held back is counted, not lost.
    assert 0 < received <= bound * 1.05 + 5
    assert 0 < stored <= received
    assert received + suppressed <= s["sent"]
    assert suppressed >= 0.9 * s["sent"] - received
    # The daemon stayed responsive and nearly idle.
    assert len(sampler.api) > 10 and max(sampler.api) < 0.2
    assert cpu < 0.25 * (storm_s + 1.3)


def test_the_shim_listener_buffer_passes_over_a_stock_rmem_max(scratch_ns):
    """The shim's UDP listener asks for 4 MiB of queued queries (8 MiB as the kernel counts it).
    A plain SO_RCVBUF is capped by net.core.rmem_max: at its default (212,992), 425,984 bytes.
    This VM raises the maxima, so the flood tests above never saw the cap; the shim forces the
    size (CAP_NET_ADMIN) instead."""
    with stock_socket_maxima(), entered(scratch_ns.name):
        sock = shim_bind("127.0.0.1", 0, socket.SOCK_DGRAM)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 8 * 1024 * 1024
    finally:
        sock.close()
