"""`egressd demo`: a throw-away lab, the daemon running in it, real requests, a table of results.

It builds network namespaces (three workloads, the node, an "internet" with dnsmasq and web
servers), starts egressd in the node namespace, and runs curl and dig from the workloads. It exits
0 only when every request behaved as expected, and it removes everything it made, on failure and
Ctrl-C too."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .lab import Lab, world
from .lab.collectorproc import CollectorProc
from .lab.daemonproc import DaemonProc

SEED_SQL = (
    "select * from system.access.outbound_network where event_time >= current_timestamp() - interval 2 hour "
    "sort by event_time desc"
)


@dataclass
class Row:
    workload: str
    request: str
    expected: str
    got: str = ""
    ok: bool = False


def _http(lab, host, url, expect_ok: bool, **kw) -> tuple[str, bool]:
    code, _out, elapsed = lab.curl(host, url, **kw)
    got = f"HTTP {code}" if code else f"blocked ({elapsed * 1000:.0f} ms)"
    return got, (code == 200) == expect_ok


def _dns(lab, host, name, expect: str, **kw) -> tuple[str, bool]:
    r = lab.dig(host, name, **kw)
    got = r.status or "timeout"
    if r.status == "NOERROR" and r.answers:
        got += " " + r.answers[-1][2]
    if r.ede:
        got += f" EDE {r.ede[0]}"
    return got, (r.status or "timeout") == expect.split()[0] and ("EDE" not in expect or bool(r.ede))


def scenario(lab) -> list[tuple[Row, Callable[[], tuple[str, bool]]]]:
    w1, w2, w3 = lab.workloads[:3]
    r, d, f = "w1 ws 1001 restricted", "w2 ws 1002 dry-run", "w3 ws 1003 full access"
    return [
        (Row(r, "curl http://pypi.org/", "HTTP 200"), lambda: _http(lab, w1, "http://pypi.org/", True)),
        (Row(r, "dig evil.example", "NXDOMAIN EDE 15"), lambda: _dns(lab, w1, "evil.example", "NXDOMAIN EDE")),
        (Row(r, "curl http://192.0.2.99/ (IP not allowed)", "blocked"), lambda: _http(lab, w1, "http://192.0.2.99/", False)),
        (
            Row(r, "curl mirror.cohosted.example (shares pypi.org's IP)", "HTTP 200"),
            lambda: _http(lab, w1, "http://mirror.cohosted.example/", True, resolve="mirror.cohosted.example:80:198.51.100.10"),
        ),
        (Row(r, "curl http://raw.githubusercontent.com/ (*.)", "HTTP 200"), lambda: _http(lab, w1, "http://raw.githubusercontent.com/", True)),
        (Row(r, "dig githubusercontent.com (apex of *.)", "NXDOMAIN"), lambda: _dns(lab, w1, "githubusercontent.com", "NXDOMAIN")),
        (Row(r, "curl http://gist.githubusercontent.com/ (blocked)", "blocked"), lambda: _http(lab, w1, "http://gist.githubusercontent.com/", False)),
        (Row(r, "curl http://docs.pypi.org/ (CNAME to cdn)", "HTTP 200"), lambda: _http(lab, w1, "http://docs.pypi.org/", True)),
        (Row(r, "curl -6 http://files.pythonhosted.org/", "HTTP 200"), lambda: _http(lab, w1, "http://files.pythonhosted.org/", True, extra=["-6"])),
        (Row(r, "curl http://203.0.113.130/ (IP_RANGE)", "HTTP 200"), lambda: _http(lab, w1, "http://203.0.113.130/", True)),
        (Row(r, "dig @198.51.100.99 evil.example (other resolver)", "NXDOMAIN EDE 15"), lambda: _dns(lab, w1, "evil.example", "NXDOMAIN EDE", server="198.51.100.99")),
        (Row(r, "dig +tcp evil.example", "NXDOMAIN EDE 15"), lambda: _dns(lab, w1, "evil.example", "NXDOMAIN EDE", tcp=True)),
        (Row(r, "TCP 853 (DNS over TLS) to an allowed IP", "blocked"), lambda: _http(lab, w1, "http://198.51.100.10:853/", False)),
        (Row(r, "curl http://lake1.dfs.core.windows.net/ (storage)", "HTTP 200"), lambda: _http(lab, w1, "http://lake1.dfs.core.windows.net/", True)),
        (Row(r, "dig lake2.dfs.core.windows.net (other account)", "NXDOMAIN EDE 15"), lambda: _dns(lab, w1, "lake2.dfs.core.windows.net", "NXDOMAIN EDE")),
        (Row(d, "curl http://evil.example/ (log only)", "HTTP 200"), lambda: _http(lab, w2, "http://evil.example/", True)),
        (Row(d, "curl http://192.0.2.99/ (log only)", "HTTP 200"), lambda: _http(lab, w2, "http://192.0.2.99/", True)),
        (Row(f, "curl http://evil.example/", "HTTP 200"), lambda: _http(lab, w3, "http://evil.example/", True)),
    ]


def _print_table(rows: list[Row]) -> None:
    cols = [("workload", 24), ("request", 52), ("expected", 16), ("got", 26), ("", 4)]
    print("  ".join(name.ljust(w) for name, w in cols))
    print("  ".join("-" * w for _, w in cols))
    for r in rows:
        vals = [r.workload, r.request, r.expected, r.got, "ok" if r.ok else "FAIL"]
        print("  ".join(v[:w].ljust(w) for v, (_, w) in zip(vals, cols)))


def _print_log(collector) -> int:
    """The denials as an operator reads them: the seed's SQL, verbatim, against egress-collector."""
    expect = lambda rows: sum(r["access_type"] == "LOG_ONLY_DENIAL" for r in rows) >= 2 and len(rows) >= 8
    rows, _ = collector.wait_rows(SEED_SQL, expect, timeout=3)
    print(f"\nDenial log ({len(rows)} rows), from egress-collector with the seed's query:\n  {SEED_SQL}\n")
    cols = [("event_time", 24), ("access_type", 16), ("ws", 5), ("product", 16), ("type", 8), ("destination", 30), ("detail", 34)]
    print("  ".join(n.ljust(w) for n, w in cols))
    print("  ".join("-" * w for _, w in cols))
    for r in rows:
        if r["ip_event"]:
            ip = r["ip_event"]
            detail = f"{ip['protocol']} {ip['source_ip']} -> :{ip['destination_port']}"
        else:
            detail = f"rcode {r['dns_event']['rcode']}" + (f", {r['storage_event']['rejection_reason']}" if r["storage_event"] else "")
        vals = [r["event_time"], r["access_type"], r["workspace_id"], r["network_source_type"] or "", r["destination_type"],
                r["destination"], detail]
        print("  ".join(str(v)[:w].ljust(w) for v, (_, w) in zip(vals, cols)))
    return len(rows)


def main() -> int:
    if os.geteuid() != 0:
        print("egressd demo needs root: it creates network namespaces and nftables rules.", file=sys.stderr)
        return 2
    print("Building the lab: 3 workloads, a node, an internet with dnsmasq and web servers …", flush=True)
    t0 = time.monotonic()
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        collector = CollectorProc(lab)
        collector.start()
        config = world.write_config(lab, collector_url=collector.url)
        daemon = DaemonProc(lab, config)
        try:
            ready = daemon.start()
            print(f"egressd ready in {ready:.2f}s (lab built in {time.monotonic() - t0 - ready:.2f}s).")
            print("Policies: ws 1001 restricted-etl (ENFORCED), ws 1002 restricted-dryrun (DRY_RUN), ws 1003 default-policy (FULL_ACCESS)")
            print("Allowed: pypi.org, files.pythonhosted.org, docs.pypi.org, *.githubusercontent.com, 203.0.113.128/25; blocked: gist.githubusercontent.com\n")
            rows = []
            for row, check in scenario(lab):
                row.got, row.ok = check()
                rows.append(row)
            _print_table(rows)
            logged = _print_log(collector)
            failed = [r for r in rows if not r.ok]
            if not logged:
                failed.append(Row("collector", "denials logged", ">= 1 row"))
            print(f"\n{len(rows) - len(failed)} of {len(rows)} requests behaved as expected.")
            if failed:
                print("\negressd log (tail):\n" + daemon.log()[-3000:], file=sys.stderr)
            result = 1 if failed else 0
        finally:
            daemon.stop()
            collector.stop()
    print("Lab removed: namespaces, processes and files are gone.")
    return result
