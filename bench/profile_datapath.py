"""Where a new connection's time goes: ``perf record -a -g`` during benchmark d's connection loop,
with egressd (100,000 IPs in the set), with a conntrack-only table, and with no table, alternated.

    sudo .venv/bin/python bench/profile_datapath.py [--conn-seconds 5] [--rounds 3] [--out FILE.md]

The loop is bench d's: a Python client in workload w1 connects to a sink in the inet namespace and
closes with an RST, as fast as one core lets it. The kernel handles each connection's packets in
the client's and the sink's system calls (veth delivers inline), so every CPU's samples count.
For each side: connections per second, and the CPU per connection (microseconds, every CPU, idle
left out) in all, in netfilter's hooks (``nf_hook_slow``, inclusive), and in the parts below,
each inclusive of what it calls: a sample counts once for a part when any of its symbols is in
the sample's call chain (``perf script``). The parts overlap where one calls another (a ``fib``
lookup inside rule evaluation). Then the self time
by the symbol's family (conntrack, NAT, nftables, netfilter core, other kernel, user space), and
the symbols whose self time grew most from no table to egressd. A VM samples with a timer, so
work done with interrupts off is counted where they come back on: trust the inclusive rows more.
``--out`` writes the table (markdown) and the runs beside it (.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_datapath import CLIENT, CT_ONLY, SINK, SINK_PORT, _fill, _table_exists
from benchlab import BenchLab, alternate, median, routed_ip, unique_ip

PERF_HZ = 1999
KERNEL_BASE = 0xFFFF800000000000  # x86-64: addresses from here up are the kernel's
# (label, symbols: a sample counts once for a part when any of them is in its call chain)
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("netfilter hooks, all (nf_hook_slow)", ("nf_hook_slow",)),
    ("conntrack: lookup and new entries (nf_conntrack_in)", ("nf_conntrack_in",)),
    ("conntrack: confirm (__nf_conntrack_confirm)", ("__nf_conntrack_confirm",)),
    ("NAT hook (nf_nat_inet_fn)", ("nf_nat_inet_fn",)),
    ("nftables rule evaluation (nft_do_chain)", ("nft_do_chain",)),
    ("  of which fib lookups (antispoof: nft_fib4_eval, nft_fib6_eval)", ("nft_fib4_eval", "nft_fib6_eval")),
    ("  of which set lookups (nft_lookup_eval, nft_vmap...)", ("nft_lookup_eval",)),
    ("conntrack entry teardown (nf_ct_delete, destroy_conntrack)", ("nf_ct_delete", "destroy_conntrack")),
    ("set element collection (nft_rhash_gc)", ("nft_rhash_gc",)),
]


FAMILIES: list[tuple[str, re.Pattern[str]]] = [  # self time, by the symbol's name; first match wins
    ("conntrack", re.compile(r"^(__)?(nf_conntrack|nf_ct_|nf_confirm|init_conntrack|hash_conntrack|"
                             r"nf_tcp_|tcp_packet|tcp_in_window|ipv[46]_conntrack|nf_conn)")),
    ("NAT", re.compile(r"^(__)?(nf_nat|nft_nat|nft_redir|nf_xfrm)")),
    ("nftables", re.compile(r"^(__)?nft_")),
    ("netfilter core", re.compile(r"^(__)?(nf_hook|nf_defrag|ipv4_defrag|ipv6_defrag|nf_ip_checksum|nf_checksum)")),
]


def _perf_samples(data: Path) -> list[tuple[str, bool, frozenset[str]]]:
    """Each sample of a perf.data file (recorded with -g): (its leaf symbol, whether that is the
    kernel's, every symbol of its call chain)."""
    cp = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym"], capture_output=True,
                        text=True, timeout=600)
    out = []
    for block in cp.stdout.split("\n\n"):
        frames = [line.split(None, 1) for line in block.splitlines() if line.strip()]
        if frames:
            leaf = frames[0]
            out.append((leaf[1] if len(leaf) > 1 else "[unknown]", int(leaf[0], 16) >= KERNEL_BASE,
                        frozenset(f[1] for f in frames if len(f) > 1)))
    if cp.returncode != 0 or not out:
        raise RuntimeError(f"perf script gave no samples: {cp.stderr[-500:]}")
    return out


def _family(sym: str, kernel: bool) -> str:
    if not kernel:
        return "user space"
    return next((name for name, rx in FAMILIES if rx.match(sym)), "other kernel")


def run(conn_seconds: float = 5, rounds: int = 3, ips: int = 100_000, log=print) -> dict:
    if shutil.which("perf") is None:
        raise SystemExit("profile_datapath.py: needs perf (apt-get install linux-perf)")
    tmp = Path(tempfile.mkdtemp(prefix="egressd-perf-"))
    with BenchLab() as bl:
        lab = bl.lab
        server = routed_ip(bl.routed.take(1)[0] + 10)
        filler = [unique_ip(i) for i in bl.unique.take(ips - 1)] + [server]
        lab.popen(lab.inet_ns, [sys.executable, "-c", SINK], stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.3)
        count = 0

        def loop(side: str) -> dict:
            nonlocal count
            count += 1
            data = tmp / f"{side}-{count}.data"
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(PERF_HZ), "-o", str(data), "--",
                                     "sleep", str(conn_seconds + 1.5)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            cp = lab.run(bl.w1, [sys.executable, "-c", CLIENT, server, str(SINK_PORT), str(conn_seconds)],
                         timeout=conn_seconds + 30)
            perf.wait(timeout=60)
            ok, fail, secs = cp.stdout.split()
            conns = int(ok)
            samples = [x for x in _perf_samples(data) if "do_idle" not in x[2]]  # the idle loop left out
            # The recording is 1.5 s longer than the loop; those moments are idle (left out) but
            # for the machine's background work, which the figures then include.
            us = 1e6 / PERF_HZ / max(conns, 1)
            selfs: dict[str, float] = {}
            fam: dict[str, float] = {}
            for leaf, kernel, _chain in samples:
                selfs[leaf] = selfs.get(leaf, 0.0) + us
                f = _family(leaf, kernel)
                fam[f] = fam.get(f, 0.0) + us
            res = {"connections": conns, "failures": int(fail), "conn_per_s": conns / float(secs),
                   "busy_us_per_conn": len(samples) * us,
                   "parts_us_per_conn": {label: sum(1 for x in samples if not x[2].isdisjoint(syms)) * us
                                         for label, syms in PARTS},
                   "self_us_per_conn": selfs, "families_us_per_conn": fam}
            data.unlink()
            log(f"  {side:15s} {res['conn_per_s']:7.0f} conn/s  busy {res['busy_us_per_conn']:6.1f} us/conn"
                f"  netfilter {res['parts_us_per_conn'][PARTS[0][0]]:5.1f} us/conn")
            return res

        def with_egressd(_r: int) -> dict:
            bl.start_daemon()
            _fill(bl, filler)
            try:
                return loop("egressd")
            finally:
                bl.stop_daemon()

        def clear() -> None:
            bl.stop_daemon()
            if _table_exists(bl):
                bl.uninstall_rules()

        def conntrack_only(_r: int) -> dict:
            clear()
            bl.nft_node(CT_ONLY)
            try:
                return loop("conntrack_only")
            finally:
                bl.nft_node("delete table inet benchct\n")

        def no_table(_r: int) -> dict:
            clear()
            return loop("no_table")

        runs = alternate({"egressd": with_egressd, "conntrack_only": conntrack_only, "no_table": no_table}, rounds)
    tmp.rmdir()
    out: dict = {"conn_seconds": conn_seconds, "rounds": rounds, "set_ips": ips, "perf_hz": PERF_HZ}
    for side, rs in runs.items():
        out[side] = {"conn_per_s_median": round(median(r["conn_per_s"] for r in rs)),
                     "busy_us_per_conn_median": round(median(r["busy_us_per_conn"] for r in rs), 1),
                     "parts_us_per_conn_median": {label: round(median(r["parts_us_per_conn"][label] for r in rs), 2)
                                                  for label, _ in PARTS},
                     "families_us_per_conn_median": {f: round(median(r["families_us_per_conn"].get(f, 0.0) for r in rs), 2)
                                                     for f in [n for n, _ in FAMILIES] + ["other kernel", "user space"]},
                     "self_us_per_conn_mean": {sym: round(sum(r["self_us_per_conn"].get(sym, 0.0) for r in rs) / len(rs), 3)
                                               for sym in {k for r in rs for k in r["self_us_per_conn"]}
                                               if sum(r["self_us_per_conn"].get(sym, 0.0) for r in rs) / len(rs) >= 0.02},
                     "runs": [{k: v for k, v in r.items() if k != "self_us_per_conn"} for r in rs]}
    return out


def markdown(out: dict) -> str:
    sides = ("egressd", "conntrack_only", "no_table")
    lines = ["| | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides),
             "| connections per second | " + " | ".join(f"{out[s]['conn_per_s_median']:,}" for s in sides) + " |",
             "| CPU per connection, every CPU, idle left out (µs) | "
             + " | ".join(f"{out[s]['busy_us_per_conn_median']}" for s in sides) + " |"]
    lines.append("| *inclusive, by entry point* | | | |")
    for label, _ in PARTS:
        lines.append(f"| {label} (µs) | " + " | ".join(f"{out[s]['parts_us_per_conn_median'][label]:.2f}" for s in sides) + " |")
    lines.append("| *self time, by the symbol's family* | | | |")
    for f in out["egressd"]["families_us_per_conn_median"]:
        lines.append(f"| {f} (µs) | " + " | ".join(f"{out[s]['families_us_per_conn_median'][f]:.2f}" for s in sides) + " |")
    e, n = out["egressd"]["self_us_per_conn_mean"], out["no_table"]["self_us_per_conn_mean"]
    diff = sorted(((e.get(k, 0.0) - n.get(k, 0.0), k) for k in set(e) | set(n)), reverse=True)[:15]
    lines += ["", "Symbols whose self time per connection grew most from no table to egressd (µs, mean of the rounds):",
              "", "| symbol | egressd | no table | more |", "|---|---:|---:|---:|"]
    lines += [f"| `{k}` | {e.get(k, 0.0):.2f} | {n.get(k, 0.0):.2f} | {d:+.2f} |" for d, k in diff]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conn-seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ips", type=int, default=100_000)
    ap.add_argument("--out", type=Path, help="write the table here (markdown), and the runs beside it (.json)")
    a = ap.parse_args()
    out = run(a.conn_seconds, a.rounds, a.ips)
    md = markdown(out)
    print(md)
    if a.out:
        a.out.write_text(md)
        a.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
