"""(d) The datapath through the node: iperf3 TCP throughput and new TCP connections per second from
restricted workload w1 to the inet namespace, with egressd running and 100,000 IPs in workspace
1001's timeout set, against the same lab with no egressd table (daemon stopped,
``egressd uninstall-rules --yes``). The two sides alternate within the run.

    sudo .venv/bin/python bench/bench_datapath.py [--seconds 10] [--conn-seconds 5] [--rounds 3] [--json out.json]

The connection-rate client (Python, in w1) connects and closes (SO_LINGER 0: an RST, no TIME_WAIT)
in a loop for a fixed time; the sink in the inet namespace accepts and closes. Both sides of the
comparison run the same client and sink, so their own cost cancels out of the ratio."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchlab import BenchLab, alternate, median, rnd, routed_ip, unique_ip

SINK_PORT = 7100
SINK = textwrap.dedent(
    """
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", PORT))
    s.listen(4096)
    while True:
        try:
            c, _ = s.accept()
            c.close()
        except OSError:
            pass
    """
).replace("PORT", str(SINK_PORT))
CLIENT = textwrap.dedent(
    """
    import socket, struct, sys, time
    ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    linger = struct.pack("ii", 1, 0)
    ok = fail = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(1)
        try:
            s.connect((ip, port))
            ok += 1
        except OSError:
            fail += 1
        s.close()
    print(ok, fail, time.monotonic() - t0)
    """
)


CT_ONLY = """table inet benchct {
 chain forward { type filter hook forward priority filter; policy accept; ct state established,related accept; }
}
"""


def _fill(bl: BenchLab, ips: list[str], chunk: int = 5000) -> float:
    """Put IPs into workspace 1001's timeout set (one nft transaction); seconds taken."""
    lines = []
    for i in range(0, len(ips), chunk):
        elems = ", ".join(f"{ip} timeout 3600s" for ip in ips[i:i + chunk])
        lines.append(f"add element inet egressd ws_1001_dyn4 {{ {elems} }}")
    t0 = time.monotonic()
    bl.nft_node("\n".join(lines) + "\n", timeout=120)
    return time.monotonic() - t0


def _set_count(bl: BenchLab) -> int:
    cp = bl.lab.run(bl.lab.node_ns, ["nft", "-j", "list", "set", "inet", "egressd", "ws_1001_dyn4"], timeout=60)
    for o in json.loads(cp.stdout or "{}").get("nftables", []):
        if "set" in o:
            return len(o["set"].get("elem", []))
    return 0


def _table_exists(bl: BenchLab) -> bool:
    return bl.lab.run(bl.lab.node_ns, ["nft", "list", "table", "inet", "egressd"]).returncode == 0


def run(seconds: float = 10, conn_seconds: float = 5, rounds: int = 3, ips: int = 100_000,
        reference: bool = True, log=print) -> dict:
    with BenchLab() as bl:
        lab = bl.lab
        server = routed_ip(bl.routed.take(1)[0] + 10)  # local to the inet namespace
        filler = [unique_ip(i) for i in bl.unique.take(ips - 1)] + [server]
        lab.popen(lab.inet_ns, ["iperf3", "-s", "-p", "5201"], stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        lab.popen(lab.inet_ns, [sys.executable, "-c", SINK], stdin=subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.3)
        fills: list[float] = []

        def measure(side: str) -> dict:
            ip = lab.run(bl.w1, ["iperf3", "-c", server, "-p", "5201", "-t", f"{seconds:g}", "-J"],
                         timeout=seconds + 30)
            try:
                doc = json.loads(ip.stdout)
                gbps = doc["end"]["sum_received"]["bits_per_second"] / 1e9
                retr = doc["end"]["sum_sent"].get("retransmits")
            except (ValueError, KeyError) as exc:
                raise RuntimeError(f"iperf3 failed ({exc}): {ip.stdout[-800:]} {ip.stderr[-800:]}")
            cp = lab.run(bl.w1, [sys.executable, "-c", CLIENT, server, str(SINK_PORT), str(conn_seconds)],
                         timeout=conn_seconds + 30)
            ok, fail, secs = cp.stdout.split()
            res = {"gbit_per_s": gbps, "retransmits": retr, "connections": int(ok),
                   "connect_failures": int(fail), "conn_per_s": int(ok) / float(secs)}
            log(f"  datapath {side:8s} {gbps:6.2f} Gbit/s  {res['conn_per_s']:8.0f} conn/s  failures={fail}")
            return res

        def with_egressd(_r: int) -> dict:
            bl.start_daemon()
            fills.append(_fill(bl, filler))
            n = _set_count(bl)
            if n < ips:
                raise RuntimeError(f"set holds {n} IPs, expected {ips}")
            res = measure("egressd")
            res["set_ips"] = n
            bl.stop_daemon()  # the table stays (fail closed); the other side removes it
            return res

        def without(_r: int) -> dict:
            bl.stop_daemon()
            if _table_exists(bl):
                bl.uninstall_rules()
            if _table_exists(bl):
                raise RuntimeError("egressd table still present")
            return measure("no-table")

        def conntrack_only(_r: int) -> dict:
            # Reference: no egressd table, only a stateful forward hook (what any stateful firewall
            # costs), to tell conntrack's share of the gap from egressd's own lookups.
            bl.stop_daemon()
            if _table_exists(bl):
                bl.uninstall_rules()
            bl.nft_node(CT_ONLY)
            try:
                return measure("ct-only")
            finally:
                bl.nft_node("delete table inet benchct\n")

        sides = {"egressd": with_egressd, "no_table": without}
        if reference:
            sides["conntrack_only"] = conntrack_only
        runs = alternate(sides, rounds)
    out: dict = {"seconds": seconds, "conn_seconds": conn_seconds, "rounds": rounds, "set_ips": ips,
                 "fill_seconds_median": rnd(median(fills), 3)}
    for side, rs in runs.items():
        out[side] = {"gbit_per_s_median": rnd(median(r["gbit_per_s"] for r in rs), 2),
                     "conn_per_s_median": rnd(median(r["conn_per_s"] for r in rs), 0),
                     "connect_failures": sum(r["connect_failures"] for r in rs), "runs": rs}
    e, n = out["egressd"], out["no_table"]
    out["ratios"] = {"throughput": round(e["gbit_per_s_median"] / n["gbit_per_s_median"], 3),
                     "conn_per_s": round(e["conn_per_s_median"] / n["conn_per_s_median"], 3)}
    if "conntrack_only" in out:
        c = out["conntrack_only"]
        out["ratios"]["throughput_vs_conntrack_only"] = round(e["gbit_per_s_median"] / c["gbit_per_s_median"], 3)
        out["ratios"]["conn_per_s_vs_conntrack_only"] = round(e["conn_per_s_median"] / c["conn_per_s_median"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--conn-seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ips", type=int, default=100_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = run(args.seconds, args.conn_seconds, args.rounds, args.ips)
    print(json.dumps({k: v for k, v in res.items() if k not in ("egressd", "no_table")} |
                     {k: {kk: vv for kk, vv in res[k].items() if kk != "runs"} for k in ("egressd", "no_table", "conntrack_only") if k in res}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
