"""Shared pieces of the benchmark suite: a namespace lab with a fast bench upstream, the daemon
with a policy that allows the bench names, dnsperf, alternation of the two sides of a
comparison, and medians.

The bench upstream is a second dnsmasq in the lab's inet namespace, on 203.0.113.3:53, without
query logging (the lab's own dnsmasq logs every query synchronously, which would make the
upstream the bottleneck). It synthesises an A record for every name of two ranges:

    n-<i>.u.bench.test  ->  10.128.0.0 + i   (i < 2**22: unique names, unique IPs; not routed)
    n-<i>.r.bench.test  ->  10.192.0.0 + i   (i < 2**20: local to the inet namespace, so a TCP
                                              connect to it reaches the lab's web server)

Everything stays inside the lab's namespaces; every address is 10.x or a documentation range."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from egressd.core.config import DnsConfig
from egressd.lab import Lab, world
from egressd.lab.apiclient import call
from egressd.lab.collectorproc import CollectorProc
from egressd.lab.daemonproc import DaemonProc

BENCH_UPSTREAM = "203.0.113.3"
UPSTREAM_TTL = 300
UNIQUE_BASE = ipaddress.IPv4Address("10.128.0.0")
UNIQUE_SIZE = 1 << 22
ROUTED_BASE = ipaddress.IPv4Address("10.192.0.0")
ROUTED_SIZE = 1 << 20
ROUTED_NET = "10.192.0.0/12"
RESTRICTED_WS = "1001"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def renice(pid: int, nice: int) -> None:
    """Set every thread of ``pid`` to ``nice`` (threads made later inherit it from their maker)."""
    for t in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(t.name), nice)


def unique_name(i: int) -> str:
    return f"n-{i}.u.bench.test"


def unique_ip(i: int) -> str:
    return str(UNIQUE_BASE + i)


def routed_name(i: int) -> str:
    return f"n-{i}.r.bench.test"


def routed_ip(i: int) -> str:
    return str(ROUTED_BASE + i)


class Block:
    """Hands out fresh, never-used index ranges of one synthesised domain."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next = 0

    def take(self, n: int) -> range:
        if self.next + n > self.size:
            raise RuntimeError(f"out of synthesised names ({self.next} + {n} > {self.size})")
        r = range(self.next, self.next + n)
        self.next += n
        return r


# ------------------------------------------------------------------------------- statistics

def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def rnd(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def alternate(sides: dict[str, Callable[[int], dict]], rounds: int) -> dict[str, list[dict]]:
    """Run every side once per round, alternating within the run: A B, B A, A B … (the order
    flips every round, so drift over time — a warming cache, a noisy neighbour — hits both)."""
    order = list(sides)
    out: dict[str, list[dict]] = {k: [] for k in order}
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            out[k].append(sides[k](r))
    return out


# ------------------------------------------------------------------------------- dnsperf

_NUM = r"([0-9.]+)"
_DNSPERF = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "runtime_s": re.compile(r"Run time \(s\):\s+" + _NUM),
    "qps": re.compile(r"Queries per second:\s+" + _NUM),
    "latency_mean_s": re.compile(r"Average Latency \(s\):\s+" + _NUM),
    "latency_max_s": re.compile(r"Average Latency \(s\):.*max " + _NUM),
    "latency_stddev_s": re.compile(r"Latency StdDev \(s\):\s+" + _NUM),
}
_RCODES = re.compile(r"Response codes:\s+(.*)")


def parse_dnsperf(out: str) -> dict:
    res: dict = {}
    for k, rx in _DNSPERF.items():
        m = rx.search(out)
        res[k] = float(m.group(1)) if m else None
    rc: dict[str, int] = {}
    m = _RCODES.search(out)
    if m:
        for name, n in re.findall(r"([A-Z]+) (\d+)", m.group(1)):
            rc[name] = int(n)
    res["rcodes"] = rc
    if res["qps"] is None or res["completed"] is None:
        raise RuntimeError(f"dnsperf gave no statistics:\n{out[-2000:]}")
    ok = rc.get("NOERROR", 0)
    # Only NOERROR answers count as served: a SERVFAIL is fast but not an answer.
    res["qps_noerror"] = res["qps"] * ok / res["completed"] if res["completed"] else 0.0
    res["latency_mean_ms"] = res["latency_mean_s"] * 1000 if res["latency_mean_s"] is not None else None
    return res


def write_queries(path: Path, names: Iterable[str]) -> Path:
    path.write_text("".join(f"{n} A\n" for n in names))
    return path


def dnsperf(lab: Lab, ns: str, server: str, port: int, datafile: Path, seconds: float, *,
            once: bool, qps: float | None = None, outstanding: int = 100, clients: int = 1,
            timeout_s: float = 2.0) -> dict:
    """One bounded dnsperf run from namespace ``ns``; parsed statistics."""
    argv = ["dnsperf", "-s", server, "-p", str(port), "-d", str(datafile), "-l", f"{seconds:g}",
            "-q", str(outstanding), "-c", str(clients), "-t", f"{timeout_s:g}"]
    if once:
        argv += ["-n", "1"]
    if qps:
        argv += ["-Q", str(int(qps))]
    cp = lab.run(ns, argv, timeout=seconds + timeout_s + 30)
    res = parse_dnsperf(cp.stdout + cp.stderr)
    res["qps_limit"] = int(qps) if qps else None
    res["loadavg1"] = os.getloadavg()[0]  # the machine's load when the run ended (noise indicator)
    return res


# ------------------------------------------------------------------------------- the lab

class BenchLab:
    """A lab (w1 restricted in workspace 1001), the bench upstream, optionally egress-collector,
    and the daemon configured to forward to the bench upstream and to allow ``*.bench.test``."""

    def __init__(self, *, workloads: int = 1, collector: bool = False,
                 extra_toml: Sequence[str] = (), upstream_cache: bool = False) -> None:
        self.lab = Lab(workloads=workloads, records=world.records(race=0), cnames=world.CNAMES)
        self.want_collector = collector
        self.extra_toml = list(extra_toml)
        self.collector: CollectorProc | None = None
        self.daemon: DaemonProc | None = None
        self.upstream: subprocess.Popen | None = None
        self.config: Path | None = None
        self._drainer: _NotifyDrainer | None = None
        self.unique = Block(UNIQUE_SIZE)
        self.routed = Block(ROUTED_SIZE)
        self._files = 0

    # -- lifecycle
    def __enter__(self) -> Self:
        self.lab.__enter__()
        try:
            self._start_upstream()
            if self.want_collector:
                self.collector = CollectorProc(self.lab)
                self.collector.start()
            self.config = self._write_config()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop_daemon()
            if self.collector is not None:
                self.collector.stop()
        finally:
            self.lab.__exit__(*exc)

    @property
    def w1(self):
        return self.lab.workloads[0]

    def _start_upstream(self) -> None:
        lab = self.lab
        lab.run(lab.inet_ns, ["ip", "addr", "add", f"{BENCH_UPSTREAM}/32", "dev", "lo"], check=True)
        lab.run(lab.inet_ns, ["ip", "route", "add", "local", ROUTED_NET, "dev", "lo"], check=True)
        last_u = UNIQUE_BASE + UNIQUE_SIZE - 1
        last_r = ROUTED_BASE + ROUTED_SIZE - 1
        self.upstream = lab.popen(lab.inet_ns, [
            "/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={BENCH_UPSTREAM}",
            "--port=53", "--local=/#/", f"--local-ttl={UPSTREAM_TTL}", "--pid-file=",
            "--user=root", "--group=root", "--cache-size=0",
            f"--synth-domain=u.bench.test,{UNIQUE_BASE},{last_u},n-*",
            f"--synth-domain=r.bench.test,{ROUTED_BASE},{last_r},n-*",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            cp = lab.run(lab.inet_ns, ["dig", "+short", "+time=1", "+tries=1",
                                       f"@{BENCH_UPSTREAM}", unique_name(1), "A"], timeout=5)
            if cp.stdout.strip() == unique_ip(1):
                return
            time.sleep(0.05)
        raise RuntimeError("bench upstream dnsmasq did not answer")

    def _write_config(self) -> Path:
        url = self.collector.url if self.collector else None
        cfg = world.write_config(self.lab, upstreams=[f"{BENCH_UPSTREAM}:53"], collector_url=url)
        pol = cfg.parent / "policies.d" / "restricted-etl.json"
        doc = json.loads(pol.read_text())
        doc["egress"]["network_access"]["allowed_internet_destinations"].append(
            {"destination": "*.bench.test", "internet_destination_type": "DNS_NAME"})
        pol.write_text(json.dumps(doc, indent=2))
        if dataclasses.is_dataclass(DnsConfig) and "rate_limit_qps" in {f.name for f in dataclasses.fields(DnsConfig)}:
            # The per-workload DNS rate limit would cap one workload's load: the benchmarks measure
            # the shim, so it is off here.
            text = cfg.read_text()
            cfg.write_text(text.replace("[dns]\n", "[dns]\nrate_limit_qps = 0\n", 1))
        if self.extra_toml:
            with cfg.open("a") as f:
                f.write("\n".join(self.extra_toml) + "\n")
        return cfg

    # -- the daemon
    def start_daemon(self, timeout: float = 60.0) -> float:
        """Start egressd in the node namespace; seconds until READY=1."""
        assert self.config is not None
        self.daemon = DaemonProc(self.lab, self.config, python=os.environ.get("EGRESSD_BENCH_PYTHON"))
        ready = self.daemon.start(timeout=timeout)
        self._drainer = _NotifyDrainer(self.daemon)
        return ready

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            if self._drainer is not None:
                self._drainer.stop()
                self._drainer = None
            self.daemon.stop()
            self.daemon = None

    @property
    def daemon_pid(self) -> int:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc.pid  # `ip netns exec` execs: this is the Python process

    def api(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, object]:
        assert self.config is not None
        return call(str(self.config.parent / "api.sock"), method, path, body, timeout=timeout)

    def uninstall_rules(self) -> None:
        self.lab.run(self.lab.node_ns, [sys.executable, "-m", "egressd.cli", "uninstall-rules", "--yes"],
                     check=True, env=_pyenv())

    def nft_node(self, script: str, timeout: float = 60) -> None:
        cp = self.lab.run(self.lab.node_ns, ["nft", "-f", "-"], input=script, timeout=timeout)
        if cp.returncode != 0:
            raise RuntimeError(f"nft failed: {cp.stderr.strip()[:500]}")

    # -- files
    def tmpfile(self, stem: str) -> Path:
        self._files += 1
        return Path(self.lab.tmpdir) / f"bench-{self._files}-{stem}"


class _NotifyDrainer:
    """Reads the daemon's sd_notify datagrams for as long as it runs. DaemonProc reads them only
    while waiting for one; the datagram queue (net.unix.max_dgram_qlen, 10) then fills with the
    STATUS= sent every 10 s, and the daemon's blocking sendto() freezes its event loop after about
    two minutes. A daemon under systemd never sees this: systemd reads every datagram."""

    def __init__(self, daemon: DaemonProc) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-drainer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        d = self._daemon
        while not self._stop.is_set():
            try:
                d.wait_message("\0never", 0.2)
            except OSError:
                return
            del d.messages[:]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _pyenv() -> dict[str, str]:
    env = dict(os.environ)
    daemon_dir = str(Path(__file__).resolve().parents[1] / "daemon")
    env["PYTHONPATH"] = daemon_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon … of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
            out[k] = int(v.split()[0])
    return out
