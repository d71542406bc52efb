"""The lab's authoritative "upstream" DNS server: dnsmasq in the inet namespace.

dnsmasq answers from an ``addn-hosts`` file that the lab writes (name -> IPv4/IPv6
addresses) plus ``--cname`` entries, and NXDOMAIN for everything else.

Flags that matter (dnsmasq 2.90):

* ``--local=/#/`` makes *every* domain local.  Without it, a name that is not in
  the hosts file gets REFUSED ("no upstream servers configured") instead of
  NXDOMAIN.
* ``--bind-interfaces`` + ``--listen-address`` need the address on an interface,
  so the lab puts 203.0.113.2/32 and 2001:db8:ff::53/128 on ``lo`` of the inet
  namespace (the AnyIP ``local`` routes alone are not enough for bind-interfaces).
* ``--conf-file=/dev/null`` so a host ``/etc/dnsmasq.conf`` never leaks in,
  ``--pid-file=`` (no pid file), ``--user=root`` because the hosts file lives in a
  0700 temp dir and is re-read on SIGHUP after privileges would have been dropped.
* ``--log-queries --log-facility=<file>``: every query is logged synchronously,
  which :meth:`Dnsmasq.queries` parses.

Changing records is a SIGHUP (re-reads addn-hosts, clears the cache); changing
CNAMEs needs a restart (they are command-line options).  Either way the caller
waits until a per-generation probe name answers, so the new data is live.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DNSMASQ = "/usr/sbin/dnsmasq"
PROBE_SUFFIX = ".lab-probe.invalid"
PROBE_ADDR = "192.0.2.254"
LOCAL_TTL = 60

_QUERY_RE = re.compile(r"dnsmasq\[\d+\]: query\[([A-Za-z0-9]+)\] (\S+) from (\S+)")


def validate_records(records: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, addrs in records.items():
        name = _norm_name(name)
        if isinstance(addrs, str):
            addrs = [addrs]
        clean = []
        for a in addrs:
            clean.append(str(ipaddress.ip_address(a)))  # raises ValueError on junk
        out[name] = clean
    return out


def validate_cnames(cnames: Mapping[str, str]) -> dict[str, str]:
    return {_norm_name(a): _norm_name(t) for a, t in cnames.items()}


def _norm_name(name: str) -> str:
    n = name.strip().rstrip(".").lower()
    if not n or any(c.isspace() or c in ",/#" for c in n):
        raise ValueError(f"bad DNS name {name!r}")
    return n


class Dnsmasq:
    """One dnsmasq process, (re)started inside ``ns`` via ``ip netns exec``.

    ``probe`` is a callable ``probe(name) -> bool`` that returns True when the
    name answers NOERROR with an address (the lab runs dig in the inet namespace).
    """

    def __init__(self, ns: str, workdir: Path, listen: Sequence[str], *,
                 probe: Callable[[str], bool], port: int = 53) -> None:
        self.ns = ns
        self.workdir = Path(workdir)
        self.listen = list(listen)
        self.port = port
        self.hosts_file = self.workdir / "dnsmasq.hosts"
        self.log_file = self.workdir / "dnsmasq.log"
        self.stderr_file = self.workdir / "dnsmasq.stderr"
        self._probe = probe
        self.records: dict[str, list[str]] = {}
        self.cnames: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self._generation = 0
        self._log_offset = 0

    # ---------------------------------------------------------------- config
    @property
    def probe_name(self) -> str:
        return f"probe-{self._generation}{PROBE_SUFFIX}"

    def _write_hosts(self) -> None:
        self._generation += 1
        lines = [f"{PROBE_ADDR} {self.probe_name}"]
        for name, addrs in self.records.items():
            for a in addrs:
                lines.append(f"{a} {name}")
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.hosts_file)

    def argv(self) -> list[str]:
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            *[f"--listen-address={a}" for a in self.listen],
            f"--port={self.port}",
            "--local=/#/",
            f"--local-ttl={LOCAL_TTL}",
            f"--addn-hosts={self.hosts_file}",
            "--log-queries",
            f"--log-facility={self.log_file}",
            "--pid-file=",
            "--user=root",
            "--group=root",
        ]
        for alias, target in self.cnames.items():
            argv.append(f"--cname={alias},{target}")
        return argv

    # --------------------------------------------------------------- control
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        if self.running:
            return
        self._write_hosts()
        err = open(self.stderr_file, "ab")
        try:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.argv()],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
            )
        finally:
            err.close()
        self._wait_probe(timeout)

    def stop(self, timeout: float = 3.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def update(self, records: Mapping[str, Sequence[str]], cnames: Mapping[str, str] | None,
               timeout: float = 5.0) -> None:
        self.records = validate_records(records)
        restart = False
        if cnames is not None:
            new = validate_cnames(cnames)
            restart = new != self.cnames
            self.cnames = new
        if not self.running:
            return  # applied on the next start()
        if restart:
            self.stop()
            self.start(timeout)
            return
        self._write_hosts()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self._wait_probe(timeout)

    def _wait_probe(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        name = self.probe_name
        for _ in range(200):  # bounded; each probe is itself time-limited
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"dnsmasq exited with {self.proc.returncode}: {self._tail(self.stderr_file)}"
                    f" {self._tail(self.log_file)}")
            if self._probe(name):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        raise TimeoutError(f"dnsmasq in {self.ns} did not answer {name} within {timeout}s: "
                           f"{self._tail(self.log_file)}")

    @staticmethod
    def _tail(path: Path, n: int = 600) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ log
    def query_log(self) -> list[tuple[str, str, str]]:
        """(qtype, name, source) of every client query since the last clear, probes excluded."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                data = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        for m in _QUERY_RE.finditer(data):
            qtype, name, src = m.group(1), m.group(2), m.group(3)
            if name.lower().endswith(PROBE_SUFFIX):
                continue
            out.append((qtype, name, src))
        return out

    def clear_log(self) -> None:
        try:
            self._log_offset = self.log_file.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
