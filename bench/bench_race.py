"""(b) The race between a DNS answer and its set entry: names never resolved before, each followed
at once by a TCP connect to the address it resolved to, from restricted workload w1 through glibc
(getaddrinfo → the redirected shim → the bench upstream), then a connect to port 80 of that
address (the lab's web server, on every address of the inet namespace).

    sudo .venv/bin/python bench/bench_race.py [--names 10000] [--workers 4] [--json out.json]

A connect that fails means the answer left the shim before its IP was in the set: the target is 0.
``workers`` threads run side by side (each strictly resolve → connect), so the shim also programs
while other answers are in flight."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from benchlab import BenchLab, routed_ip, routed_name

SCRIPT = textwrap.dedent(
    """
    import socket, sys, threading, time
    first, n, workers, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    deadline = time.monotonic() + budget
    lock = threading.Lock()
    state = {"next": first, "done": 0, "failures": 0, "wrong_ip": 0, "resolve_failures": 0}
    errors = []
    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = state["next"]
                if i >= first + n:
                    return
                state["next"] += 1
            name = f"n-{i}.r.bench.test"
            ok = True
            try:
                ip = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            except OSError as e:
                ok = False
                with lock:
                    state["resolve_failures"] += 1
                    errors.append(f"resolve {name}: {e}")
            else:
                try:
                    s = socket.create_connection((ip, 80), timeout=2)
                    s.close()
                except OSError as e:
                    ok = False
                    with lock:
                        errors.append(f"connect {name} {ip}: {e}")
            with lock:
                state["done"] += 1
                state["failures"] += 0 if ok else 1
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(workers)]
    for t in ts: t.start()
    for t in ts: t.join()
    state["seconds"] = time.monotonic() - t0
    print(" ".join(errors[:20]), file=sys.stderr)
    print(state["done"], state["failures"], state["resolve_failures"], round(state["seconds"], 3))
    """
)


CONTROL = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], 80), timeout=2).close()
        print("connected")
    except OSError:
        print("blocked")
    """
)


def run(names: int = 10_000, workers: int = 4, budget: float = 240, log=print) -> dict:
    with BenchLab() as bl:
        bl.start_daemon()
        # Control: an address never resolved must be refused, or the race proves nothing.
        control = routed_ip(bl.routed.take(1)[0])
        ctl = bl.lab.run(bl.w1, [sys.executable, "-c", CONTROL, control], timeout=10)
        if ctl.stdout.strip() != "blocked":
            raise RuntimeError(f"control connect to unresolved {control} was not blocked: {ctl.stdout} {ctl.stderr}")
        block = bl.routed.take(names)
        assert routed_ip(block[0]).startswith("10.19") and routed_name(block[0]).endswith(".r.bench.test")
        cp = bl.lab.run(bl.w1, [sys.executable, "-c", SCRIPT, str(block[0]), str(names), str(workers), str(budget)],
                        timeout=budget + 30)
        try:
            done, failures, resolve_failures, secs = cp.stdout.split()
        except ValueError:
            raise RuntimeError(f"race script failed: {cp.stdout[-500:]} {cp.stderr[-2000:]}")
        status = bl.api("GET", "/api/2.0/status")[1]
    res = {"names": names, "workers": workers, "control_unresolved_ip_blocked": True, "attempted": int(done), "failures": int(failures),
           "resolve_failures": int(resolve_failures), "seconds": float(secs),
           "per_second": round(int(done) / float(secs), 1) if float(secs) else None,
           "first_errors": cp.stderr.strip()[:1500],
           "shim_stats": (status or {}).get("shim", {}).get("stats", {}) if isinstance(status, dict) else {}}
    log(f"  race: {res['attempted']}/{names} names, {res['failures']} failures "
        f"({res['resolve_failures']} resolve), {res['seconds']:.1f} s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    res = run(args.names, args.workers)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
