"""A throw-away lab of network namespaces for egressd tests and ``egressd demo``.

Layout (``p`` is a unique prefix such as ``egl3fa9c1``)::

    {p}-w1  eth0 10.77.1.2/24 2001:db8:77:1::2/64 ─┐
    {p}-w2  eth0 10.77.2.2/24 2001:db8:77:2::2/64 ─┤ (node side: "w1", "w2", ... = .1 / ::1)
    ...                                            │
                                  {p}-node  (forwarding on, no NAT; egressd runs here)
                                     "uplink" 10.99.0.1/30 2001:db8:99::1/64
                                                   │
                                  {p}-inet "eth0" 10.99.0.2/30 2001:db8:99::2/64
                                     AnyIP: 192.0.2.0/24 198.51.100.0/24 203.0.113.0/24
                                            10.200.0.0/16 2001:db8:ff::/48 are all local
                                     dnsmasq on 203.0.113.2 / 2001:db8:ff::53 port 53
                                     web: TCP 80 + 853 (HTTP), UDP 7 + 853 (echo) on every address

Every workload (and the node and inet namespaces) gets ``/etc/netns/{ns}/resolv.conf``
pointing at 203.0.113.2, so glibc tools run through ``ip netns exec`` (getent, curl)
resolve lab names through the upstream (or through whatever intercepts port 53 on the
node).  Everything is removed again on exit.

Only documentation ranges and 10.x addresses are used, and only inside the lab's own
namespaces: the root namespace's interfaces, routes and nftables are never touched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dnsmasq import Dnsmasq, validate_cnames, validate_records

__all__ = [
    "Lab", "WorkloadHost", "DigResult", "LabError", "cleanup_stale",
    "DNS_V4", "DNS_V6", "PREFIX_BASE",
]

PREFIX_BASE = "egl"
NETNS_ETC = Path("/etc/netns")
OWNER_DIR = Path("/run/egressd-lab")  # {prefix}.owner = "pid starttime"

DNS_V4 = "203.0.113.2"
DNS_V6 = "2001:db8:ff::53"

NODE_UPLINK_V4 = "10.99.0.1"
INET_V4 = "10.99.0.2"
NODE_UPLINK_V6 = "2001:db8:99::1"
INET_V6 = "2001:db8:99::2"
WORKLOAD_NET_V4 = "10.77.0.0/16"
WORKLOAD_NET_V6 = "2001:db8:77::/48"
ANYIP_V4 = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "10.200.0.0/16")
ANYIP_V6 = ("2001:db8:ff::/48",)
WEB_TCP_PORTS = (80, 853)
WEB_UDP_PORTS = (7, 853)

NODE_UPLINK_IF = "uplink"
INET_IF = "eth0"
WORKLOAD_IF = "eth0"

_SYSCTL_COMMON = [
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.dad_transmits=0",
    "net.ipv6.conf.default.dad_transmits=0",
    "net.ipv6.conf.all.accept_ra=0",
    "net.ipv6.conf.default.accept_ra=0",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
]
_SYSCTL_NODE = [
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.default.forwarding=1",
]

_live_lock = threading.Lock()
_live_prefixes: set[str] = set()
_sigterm_refs = 0
_sigterm_prev: Any = None


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class WorkloadHost:
    name: str          # "w1"
    netns: str         # "{prefix}-w1"
    ipv4: str          # "10.77.1.2"
    ipv6: str          # "2001:db8:77:1::2"
    node_ifname: str = ""   # node-side veth ("w1")
    gw4: str = ""           # "10.77.1.1" (node side)
    gw6: str = ""           # "2001:db8:77:1::1"


@dataclass
class DigResult:
    status: str | None                    # NOERROR / NXDOMAIN / SERVFAIL / REFUSED / ...; None = no answer
    answers: list[tuple[str, str, str]]   # (name, type, data); names and CNAME targets without trailing dot
    ede: tuple[int, str] | None           # Extended DNS Error (info code, text) if present
    elapsed: float                        # seconds, wall clock (includes ip netns exec)
    ttls: list[int] = field(default_factory=list)     # parallel to answers
    flags: frozenset[str] = frozenset()              # header flags (qr, aa, rd, ra, tc, ...)
    output: str = ""                                 # raw dig stdout + stderr

    @property
    def addresses(self) -> list[str]:
        return [d for _n, t, d in self.answers if t in ("A", "AAAA")]

    @property
    def ede_code(self) -> int | None:
        return self.ede[0] if self.ede else None


# --------------------------------------------------------------------------- helpers

def _ip(args: Sequence[str], *, timeout: float = 10, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(["ip", *args], input=input, capture_output=True, text=True,
                        timeout=timeout)
    if check and cp.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed ({cp.returncode}): {cp.stderr.strip()}"
                       + (f"\ninput:\n{input}" if input else ""))
    return cp


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    if not lines:
        return
    args = (["-n", netns] if netns else []) + ["-batch", "-"]
    _ip(args, input="\n".join(lines) + "\n")


def _netns_list() -> list[str]:
    cp = _ip(["netns", "list"], check=False)
    return [ln.split()[0] for ln in cp.stdout.splitlines() if ln.strip()]


def _netns_pids(ns: str) -> list[int]:
    cp = _ip(["netns", "pids", ns], check=False, timeout=5)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the comm field may contain spaces, so split after ')'
    rest = stat.rsplit(")", 1)[-1].split()
    return rest[19] if len(rest) > 19 else None


def _owner_alive(prefix: str) -> bool:
    try:
        pid_s, start = (OWNER_DIR / f"{prefix}.owner").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_starttime(pid) == start


def _kill_ns_processes(ns: str, timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process whose network namespace is ``ns``."""
    me = os.getpid()
    pids = [p for p in _netns_pids(ns) if p != me]
    if not pids:
        return
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if _proc_starttime(p) is not None and not _is_zombie(p)]:
            return
        time.sleep(0.02)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    rest = stat.rsplit(")", 1)[-1].split()
    return bool(rest) and rest[0] in ("Z", "X")


def _remove_ns(names: Sequence[str]) -> list[str]:
    errors = []
    existing = set(_netns_list())
    for ns in names:
        if ns in existing:
            try:
                _kill_ns_processes(ns)
            except Exception as exc:  # keep tearing down
                errors.append(f"kill processes in {ns}: {exc}")
    todel = [ns for ns in names if ns in existing]
    if todel:
        cp = _ip(["-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in todel),
                 check=False)
        if cp.returncode != 0:
            errors.append(f"netns del: {cp.stderr.strip()}")
    for ns in names:
        d = NETNS_ETC / ns
        if d.exists():
            try:
                shutil.rmtree(d)
            except OSError as exc:
                errors.append(f"rm {d}: {exc}")
    return errors


def cleanup_stale(prefix_glob: str = PREFIX_BASE, *, force: bool = False) -> list[str]:
    """Delete leftover lab namespaces (and their ``/etc/netns`` dirs, processes and owner
    files) from crashed runs.  Returns the namespaces removed.

    A namespace is "a lab namespace" when its name matches ``{prefix_glob}*-*``; its lab
    prefix is the part before the last ``-``.  It is left alone when the prefix belongs to a
    live :class:`Lab` of *this* process, or - unless ``force`` - when the process that
    created it (recorded in ``/run/egressd-lab/{prefix}.owner``) is still running, so that
    parallel test runs on the same machine never destroy each other's labs.
    """
    with _live_lock:
        live = set(_live_prefixes)
    pattern = f"{prefix_glob}*-*"
    by_prefix: dict[str, list[str]] = {}
    for ns in _netns_list():
        if fnmatch.fnmatchcase(ns, pattern):
            by_prefix.setdefault(ns.rsplit("-", 1)[0], []).append(ns)
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if fnmatch.fnmatchcase(d.name, pattern):
                lst = by_prefix.setdefault(d.name.rsplit("-", 1)[0], [])
                if d.name not in lst:
                    lst.append(d.name)
    if OWNER_DIR.is_dir():
        for f in OWNER_DIR.glob("*.owner"):
            if fnmatch.fnmatchcase(f.stem, f"{prefix_glob}*"):
                by_prefix.setdefault(f.stem, [])
    removed: list[str] = []
    for prefix, names in sorted(by_prefix.items()):
        if prefix in live or (not force and _owner_alive(prefix)):
            continue
        _remove_ns(names)
        with contextlib.suppress(OSError):
            (OWNER_DIR / f"{prefix}.owner").unlink()
        for d in Path(tempfile.gettempdir()).glob(f"egressd-lab-{prefix}-*"):
            shutil.rmtree(d, ignore_errors=True)
        removed.extend(names)
    return removed


_closing = 0                  # labs currently tearing down (in this process)
_pending_sigterm = False      # SIGTERM that arrived during a teardown


def _sigterm_handler(signum, frame):  # pragma: no cover - exercised by signal delivery
    global _pending_sigterm
    if _closing:
        # Do not interrupt a teardown halfway; Lab.close() raises SystemExit when done.
        _pending_sigterm = True
        return
    raise SystemExit(128 + signum)


def _install_sigterm() -> None:
    global _sigterm_refs, _sigterm_prev
    if threading.current_thread() is not threading.main_thread():
        return
    with _live_lock:
        if _sigterm_refs == 0:
            cur = signal.getsignal(signal.SIGTERM)
            if cur is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _sigterm_handler)
                _sigterm_prev = cur
            else:
                _sigterm_prev = None  # somebody else handles SIGTERM: leave it
        _sigterm_refs += 1


def _restore_sigterm() -> None:
    global _sigterm_refs, _sigterm_prev
    if threading.current_thread() is not threading.main_thread():
        return
    with _live_lock:
        if _sigterm_refs == 0:
            return
        _sigterm_refs -= 1
        if _sigterm_refs == 0 and _sigterm_prev is not None:
            if signal.getsignal(signal.SIGTERM) is _sigterm_handler:
                signal.signal(signal.SIGTERM, _sigterm_prev)
            _sigterm_prev = None


_HEADER_RE = re.compile(r"->>HEADER<<-.*status: ([A-Z0-9]+)")
_FLAGS_RE = re.compile(r"^;; flags:([^;]*);", re.M)
_EDE_RE = re.compile(r"^; EDE: (\d+)(?: \(([^)]*)\))?(?:: (.*))?$", re.M)


def parse_dig(output: str, elapsed: float) -> DigResult:
    m = _HEADER_RE.search(output)
    status = m.group(1) if m else None
    fm = _FLAGS_RE.search(output)
    flags = frozenset(fm.group(1).split()) if fm else frozenset()
    ede = None
    em = _EDE_RE.search(output)
    if em:
        text = (em.group(3) or "").strip()
        if text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        ede = (int(em.group(1)), text)
    answers: list[tuple[str, str, str]] = []
    ttls: list[int] = []
    if status is not None:
        for line in output.splitlines():
            if not line or line.startswith(";"):
                continue
            parts = line.split(None, 4)
            if len(parts) < 5 or parts[2] not in ("IN", "CH", "HS") or not parts[1].isdigit():
                continue
            name, ttl, _cls, rtype, data = parts
            data = data.strip()
            if rtype in ("CNAME", "DNAME", "NS", "PTR"):
                data = data.rstrip(".")
            answers.append((name.rstrip("."), rtype, data))
            ttls.append(int(ttl))
    return DigResult(status=status, answers=answers, ede=ede, elapsed=elapsed, ttls=ttls,
                     flags=flags, output=output)


# --------------------------------------------------------------------------- the lab

class Lab:
    """Network-namespace lab.  Use as a context manager::

        with Lab(workloads=2, records={"a.example": ["198.51.100.10", "2001:db8:ff::10"]}) as lab:
            status, body, _ = lab.curl("w1", "http://a.example/")

    ``__enter__`` builds everything (if building fails halfway it tears down what was made
    and re-raises); ``__exit__`` always tears everything down.  While a lab is live, SIGTERM
    (if it had the default disposition) raises SystemExit so teardown still runs.
    """

    dns_v4 = DNS_V4
    dns_v6 = DNS_V6
    node_uplink_v4 = NODE_UPLINK_V4
    node_uplink_v6 = NODE_UPLINK_V6
    inet_v4 = INET_V4
    inet_v6 = INET_V6
    node_uplink_if = NODE_UPLINK_IF

    def __init__(self, *, workloads: int = 3, records: Mapping[str, Sequence[str]] | None = None,
                 cnames: Mapping[str, str] | None = None, prefix: str | None = None,
                 web: bool = True) -> None:
        if not 1 <= workloads <= 250:
            raise ValueError("workloads must be 1..250")
        self.prefix = prefix or f"{PREFIX_BASE}{secrets.token_hex(3)}"
        if not re.fullmatch(r"[a-z][a-z0-9]{1,10}", self.prefix):
            raise ValueError(f"bad lab prefix {self.prefix!r} (a-z0-9, 2..11 chars)")
        self.inet_ns = f"{self.prefix}-inet"
        self.node_ns = f"{self.prefix}-node"
        self.workloads: list[WorkloadHost] = []
        for k in range(1, workloads + 1):
            self.workloads.append(WorkloadHost(
                name=f"w{k}", netns=f"{self.prefix}-w{k}",
                ipv4=f"10.77.{k}.2", ipv6=f"2001:db8:77:{k:x}::2",
                node_ifname=f"w{k}", gw4=f"10.77.{k}.1", gw6=f"2001:db8:77:{k:x}::1"))
        self._records = validate_records(records or {})
        self._cnames = validate_cnames(cnames or {})
        self._with_web = web
        self.tmpdir: Path = Path()
        self.dns: Dnsmasq | None = None
        self.web_proc: subprocess.Popen | None = None
        self.build_seconds: float | None = None
        self._procs: list[subprocess.Popen] = []
        self._created_ns: list[str] = []
        self._entered = False
        self._closed = False

    # ------------------------------------------------------------------ naming
    @property
    def namespaces(self) -> list[str]:
        return [self.inet_ns, self.node_ns, *(w.netns for w in self.workloads)]

    def workload(self, w: WorkloadHost | str) -> WorkloadHost:
        if isinstance(w, WorkloadHost):
            return w
        for wh in self.workloads:
            if w in (wh.name, wh.netns):
                return wh
        raise KeyError(f"no workload {w!r}")

    def ns(self, ns: WorkloadHost | str) -> str:
        """Full namespace name for a WorkloadHost, a full name, or a short role
        ("inet", "node", "w1")."""
        if isinstance(ns, WorkloadHost):
            return ns.netns
        if ns in self.namespaces:
            return ns
        full = f"{self.prefix}-{ns}"
        if full in self.namespaces:
            return full
        raise KeyError(f"{ns!r} is not a namespace of lab {self.prefix}")

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def start(self) -> Lab:
        if self._entered:
            raise LabError("a Lab can only be started once")
        if os.geteuid() != 0:
            raise PermissionError("egressd.lab.Lab needs root (network namespaces)")
        self._entered = True
        with _live_lock:
            _live_prefixes.add(self.prefix)
        _install_sigterm()
        t0 = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Tear everything down.  Idempotent; collects errors and raises LabError at the end
        only if something could not be removed."""
        global _closing, _pending_sigterm
        if self._closed or not self._entered:
            return
        self._closed = True
        errors: list[str] = []
        _closing += 1
        try:
            self._stop_processes(errors)
            errors.extend(_remove_ns(self.namespaces))
            if self.tmpdir != Path() and self.tmpdir.exists():
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (OWNER_DIR / f"{self.prefix}.owner").unlink()
        finally:
            _closing -= 1
            with _live_lock:
                _live_prefixes.discard(self.prefix)
            _restore_sigterm()
        if _pending_sigterm and not _closing:
            _pending_sigterm = False
            raise SystemExit(128 + signal.SIGTERM)
        if errors and sys.exc_info()[0] is None:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def _stop_processes(self, errors: list[str]) -> None:
        if self.dns is not None:
            try:
                self.dns.stop(timeout=2)
            except Exception as exc:
                errors.append(f"dnsmasq stop: {exc}")
        procs = [p for p in self._procs if p.poll() is None]
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        deadline = time.monotonic() + 3
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(Exception):
                    p.kill()
        for p in procs:
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {p.pid} did not die")
        for p in self._procs:
            for s in (p.stdin, p.stdout, p.stderr):
                if s is not None:
                    with contextlib.suppress(Exception):
                        s.close()

    # ------------------------------------------------------------------- build
    def _build(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"egressd-lab-{self.prefix}-"))
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / f"{self.prefix}.owner").write_text(
            f"{os.getpid()} {_proc_starttime(os.getpid())}\n")

        existing = set(_netns_list())
        clash = [ns for ns in self.namespaces if ns in existing]
        if clash:
            raise LabError(f"namespaces already exist: {clash}")

        # 1. namespaces.  Record them as created *before* creating, so a failure halfway
        #    removes whatever got made (removal skips names that do not exist).
        self._created_ns = list(self.namespaces)
        _ip_batch([f"netns add {ns}" for ns in self.namespaces])

        # 2. resolv.conf for `ip netns exec` (bind-mounted over /etc/resolv.conf).
        resolv = f"nameserver {DNS_V4}\noptions timeout:1 attempts:1\n"
        for ns in self.namespaces:
            d = NETNS_ETC / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolv.conf").write_text(resolv)

        # 3. sysctls (DAD off, forwarding on the node) before any veth exists, so every
        #    interface inherits them from "default".
        procs = []
        for ns in self.namespaces:
            keys = _SYSCTL_COMMON + (_SYSCTL_NODE if ns == self.node_ns else [])
            procs.append((ns, subprocess.Popen(
                ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *keys],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for ns, p in procs:
            out, _ = p.communicate(timeout=10)
            if p.returncode != 0:
                raise LabError(f"sysctl in {ns} failed: {out.strip()}")

        # 4. links + addresses + routes.  All veths are created from the node namespace
        #    with the peer placed directly in its own namespace.
        node = [
            "link set lo up",
            f"link add {NODE_UPLINK_IF} type veth peer name {INET_IF} netns {self.inet_ns}",
            f"addr add {NODE_UPLINK_V4}/30 dev {NODE_UPLINK_IF}",
            f"addr add {NODE_UPLINK_V6}/64 dev {NODE_UPLINK_IF} nodad",
        ]
        for w in self.workloads:
            node += [
                f"link add {w.node_ifname} type veth peer name {WORKLOAD_IF} netns {w.netns}",
                f"addr add {w.gw4}/24 dev {w.node_ifname}",
                f"addr add {w.gw6}/64 dev {w.node_ifname} nodad",
            ]
        node.append(f"link set {NODE_UPLINK_IF} up")
        node += [f"link set {w.node_ifname} up" for w in self.workloads]
        node += [
            f"route add default via {INET_V4} dev {NODE_UPLINK_IF}",
            f"route add default via {INET_V6} dev {NODE_UPLINK_IF}",
        ]
        _ip_batch(node, self.node_ns)

        inet = [
            "link set lo up",
            f"addr add {DNS_V4}/32 dev lo",
            f"addr add {DNS_V6}/128 dev lo nodad",
            f"addr add {INET_V4}/30 dev {INET_IF}",
            f"addr add {INET_V6}/64 dev {INET_IF} nodad",
            f"link set {INET_IF} up",
            *[f"route add local {net} dev lo" for net in ANYIP_V4],
            *[f"route add local {net} dev lo" for net in ANYIP_V6],
            f"route add {WORKLOAD_NET_V4} via {NODE_UPLINK_V4} dev {INET_IF}",
            f"route add {WORKLOAD_NET_V6} via {NODE_UPLINK_V6} dev {INET_IF}",
        ]
        _ip_batch(inet, self.inet_ns)
        for w in self.workloads:
            _ip_batch([
                "link set lo up",
                f"addr add {w.ipv4}/24 dev {WORKLOAD_IF}",
                f"addr add {w.ipv6}/64 dev {WORKLOAD_IF} nodad",
                f"link set {WORKLOAD_IF} up",
                f"route add default via {w.gw4} dev {WORKLOAD_IF}",
                f"route add default via {w.gw6} dev {WORKLOAD_IF}",
            ], w.netns)

        # 5. start the servers while the links come up.
        self.dns = Dnsmasq(self.inet_ns, self.tmpdir, [DNS_V4, DNS_V6], probe=self._probe_dns)
        self.dns.records = dict(self._records)
        self.dns.cnames = dict(self._cnames)
        web_ready = self.tmpdir / "web.ready"
        if self._with_web:
            self.web_proc = self._start_web(web_ready)
        self._wait_links_up()
        self.dns.start()
        if self._with_web:
            self._wait_file(web_ready, self.web_proc, "web server", self.tmpdir / "web.log")

    def _start_web(self, ready: Path) -> subprocess.Popen:
        pkg_root = str(Path(__file__).resolve().parents[2])  # .../daemon
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "egressd.lab.web"]
        for p in WEB_TCP_PORTS:
            argv += ["--port", str(p)]
        for p in WEB_UDP_PORTS:
            argv += ["--udp-echo", str(p)]
        argv += ["--ready-file", str(ready)]
        log = open(self.tmpdir / "web.log", "ab")
        try:
            return self.popen(self.inet_ns, argv, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=log, env=env, start_new_session=True)
        finally:
            log.close()

    @staticmethod
    def _wait_file(path: Path, proc: subprocess.Popen | None, what: str, log: Path,
                   timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.01)
        try:
            tail = log.read_text(errors="replace")[-800:]
        except OSError:
            tail = ""
        raise LabError(f"{what} did not become ready: {tail}")

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        import json
        want = {NODE_UPLINK_IF, *(w.node_ifname for w in self.workloads)}
        deadline = time.monotonic() + timeout
        down: set[str] = set(want)
        while True:
            cp = _ip(["-n", self.node_ns, "-j", "link", "show"], check=False)
            try:
                links = json.loads(cp.stdout or "[]")
            except ValueError:
                links = []
            down = {ln.get("ifname") for ln in links
                    if ln.get("ifname") in want and ln.get("operstate") != "UP"}
            down |= want - {ln.get("ifname") for ln in links}
            if not down or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if down:
            raise LabError(f"links not up after {timeout}s: {sorted(down)}")

    def _probe_dns(self, name: str) -> bool:
        try:
            cp = self.run(self.inet_ns, ["dig", f"@{DNS_V4}", "+time=1", "+tries=1", "+short",
                                         name, "A"], timeout=3)
        except subprocess.TimeoutExpired:
            return False
        return cp.returncode == 0 and bool(cp.stdout.strip())

    # ---------------------------------------------------------------- running
    def run(self, ns: WorkloadHost | str, argv: Sequence[str], *, timeout: float = 10,
            check: bool = False, env: Mapping[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` (``ip netns exec``), text output captured.
        Raises subprocess.TimeoutExpired (after killing it) if it runs longer than ``timeout``."""
        return subprocess.run(["ip", "netns", "exec", self.ns(ns), *argv], capture_output=True,
                              text=True, timeout=timeout, check=check,
                              env=dict(env) if env is not None else None, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, ns: WorkloadHost | str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in namespace ``ns``; the process is terminated on teardown (and
        anything else still living in the lab's namespaces is killed)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(ns), *argv], **kw)
        self._procs.append(p)
        return p

    # ------------------------------------------------------------------- DNS
    def set_records(self, records: Mapping[str, Sequence[str]],
                    cnames: Mapping[str, str] | None = None) -> None:
        """Replace the upstream's records (and CNAMEs, if given) and wait until they are live."""
        self._records = validate_records(records)
        if cnames is not None:
            self._cnames = validate_cnames(cnames)
        if self.dns is not None:
            self.dns.update(self._records, self._cnames if cnames is not None else None)

    @property
    def records(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._records.items()}

    @property
    def cnames(self) -> dict[str, str]:
        return dict(self._cnames)

    def stop_dns(self, *, blackhole: bool = False) -> None:
        """Stop the upstream.  Without ``blackhole`` queries get ICMP port unreachable
        (fast failure); with it, an nftables rule *in the inet namespace* drops every
        packet to port 53 of the DNS addresses, so clients see timeouts."""
        if self.dns is not None:
            self.dns.stop()
        if blackhole:
            self._nft_inet(
                "table inet egl_lab_blackhole {\n"
                " chain input { type filter hook input priority -10; policy accept;\n"
                f"  ip daddr {DNS_V4} meta l4proto {{ tcp, udp }} th dport 53 drop\n"
                f"  ip6 daddr {DNS_V6} meta l4proto {{ tcp, udp }} th dport 53 drop\n"
                " }\n}\n")

    def start_dns(self) -> None:
        """(Re)start the upstream (and remove a blackhole) and wait until it answers."""
        self._nft_inet("delete table inet egl_lab_blackhole\n", check=False)
        if self.dns is None:
            raise LabError("lab not started")
        self.dns.start()

    def _nft_inet(self, script: str, check: bool = True) -> None:
        cp = self.run(self.inet_ns, ["nft", "-f", "-"], input=script, timeout=10)
        if check and cp.returncode != 0:
            raise LabError(f"nft in {self.inet_ns} failed: {cp.stderr.strip()}")

    @property
    def dns_running(self) -> bool:
        return self.dns is not None and self.dns.running

    def dns_queries(self) -> list[str]:
        """Names the upstream saw (in order, lab probes excluded) since the start or the last
        :meth:`clear_dns_queries`."""
        return [name for _t, name, _src in self.dns_query_log()]

    def dns_query_log(self) -> list[tuple[str, str, str]]:
        """(qtype, name, source address) for every query the upstream saw."""
        return self.dns.query_log() if self.dns is not None else []

    def clear_dns_queries(self) -> None:
        if self.dns is not None:
            self.dns.clear_log()

    def set_resolv_conf(self, nameservers: Sequence[str],
                        workloads: Sequence[WorkloadHost | str] | None = None) -> None:
        """Rewrite ``/etc/netns/{ns}/resolv.conf`` of some (default: all) workloads, e.g. to
        point them at a DNS shim instead of the upstream.  Takes effect for new commands."""
        text = "".join(f"nameserver {ns}\n" for ns in nameservers)
        text += "options timeout:1 attempts:1\n"
        for w in (self.workloads if workloads is None else [self.workload(x) for x in workloads]):
            (NETNS_ETC / w.netns / "resolv.conf").write_text(text)

    # ----------------------------------------------------------- client tools
    def curl(self, workload: WorkloadHost | str, url: str, *, timeout: float = 3,
             resolve: str | None = None, extra: Sequence[str] = ()
             ) -> tuple[int | None, str, float]:
        """curl ``url`` from a workload: (HTTP status or None on failure, body + stderr, seconds).
        ``resolve`` is passed as ``--resolve`` (e.g. ``"a.example:80:198.51.100.10"``)."""
        marker = "\n@@EGL_HTTP_CODE@@"
        argv = ["curl", "-sS", "--max-time", f"{timeout:g}", "--connect-timeout", f"{timeout:g}",
                "-w", marker + "%{http_code}"]
        if resolve:
            argv += ["--resolve", resolve]
        argv += [*extra, url]
        t0 = time.monotonic()
        try:
            cp = self.run(self.workload(workload), argv, timeout=timeout + 5)
        except subprocess.TimeoutExpired as exc:
            return None, f"curl did not finish: {exc}", time.monotonic() - t0
        elapsed = time.monotonic() - t0
        out, found, code = cp.stdout.rpartition(marker)
        if not found:
            out, code = cp.stdout, ""
        code = code.strip()
        status = int(code) if cp.returncode == 0 and code.isdigit() and int(code) > 0 else None
        text = out + (cp.stderr or "")
        return status, text, elapsed

    def dig(self, workload: WorkloadHost | str, name: str, *, server: str | None = None,
            qtype: str = "A", tcp: bool = False, timeout: float = 3,
            extra: Sequence[str] = ()) -> DigResult:
        """dig from a workload.  ``server=None`` uses the workload's resolv.conf
        (203.0.113.2 unless changed).  Status is None when no answer arrived."""
        secs = max(1, int(timeout + 0.999))
        argv = ["dig", f"+time={secs}", "+tries=1", "+retry=0", "+noall", "+answer", "+comments"]
        if tcp:
            argv.append("+tcp")
        argv += list(extra)
        if server:
            argv.append(f"@{server}")
        argv += [name, qtype]
        t0 = time.monotonic()
        try:
            cp = self.run(self.workload(workload), argv, timeout=secs + 5)
            output = cp.stdout + cp.stderr
        except subprocess.TimeoutExpired:
            output = ""
        return parse_dig(output, time.monotonic() - t0)

    def getent(self, workload: WorkloadHost | str, name: str, *, timeout: float = 10) -> list[str]:
        """``getent ahosts name`` through glibc in the workload: unique addresses, [] on failure."""
        try:
            cp = self.run(self.workload(workload), ["getent", "ahosts", name], timeout=timeout)
        except subprocess.TimeoutExpired:
            return []
        if cp.returncode != 0:
            return []
        out: list[str] = []
        for line in cp.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] not in out:
                out.append(parts[0])
        return out

    def ping(self, workload: WorkloadHost | str, addr: str, *, count: int = 1,
             timeout: float = 2) -> bool:
        """One bounded ping from a workload; True if a reply came back."""
        try:
            cp = self.run(self.workload(workload),
                          ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}", addr],
                          timeout=timeout * count + 5)
        except (subprocess.TimeoutExpired, FileNotFoundError):
            return False
        return cp.returncode == 0

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} workloads={len(self.workloads)}>"
