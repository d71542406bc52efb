"""The markdown report of a benchmark run (bench/run.py's JSON document → bench/results/latest.md)."""

from __future__ import annotations


def _f(v, nd: int = 0, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        s = f"{v:,.{nd}f}"
    else:
        s = str(v)
    return s + unit


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def _floor(mix: dict, key: str, unit: str) -> str:
    """The bare uvloop server's figure (bench/floor_server.py), when the run had it."""
    side = mix.get("floor")
    if not isinstance(side, dict):
        return ""
    return f" (bare uvloop floor: {_f(side[key], 3 if unit else 0)}{unit})"


def _rows(doc: dict) -> list[tuple[str, str, str, str, str]]:
    R = doc.get("results", {})
    rows: list[tuple[str, str, str, str, str]] = []
    a = R.get("a")
    if a:
        U, H, r = a["unique"], a["hot"], a["ratios"]
        ue, he = a["unique_equal_load"], a["hot_equal_load"]
        rows += [
            ("a", "DNS, unique names (every answer programmed): QPS",
             (f"egressd {_f(U['egressd']['qps_median'])} vs dnsmasq+nftset {_f(U['dnsmasq_nftset']['qps_median'])} "
             f"= **{r['unique_qps_vs_dnsmasq_nftset']}×** (dnsmasq without nftset {_f(U['dnsmasq']['qps_median'])})"),
             "≥ 4×", _met(r["unique_qps_vs_dnsmasq_nftset"] >= 4)),
            ("a", "DNS, hot set of 1,000 names: QPS",
             (f"egressd {_f(H['egressd']['qps_median'])} vs dnsmasq cache hits {_f(H['dnsmasq_nftset']['qps_median'])} "
             f"= **{r['hot_qps_vs_dnsmasq_cache']}×**" + _floor(H, "qps_median", "")), "≥ 0.75×",
             _met(r["hot_qps_vs_dnsmasq_cache"] >= 0.75)),
            ("a", f"DNS, unique: mean latency at equal load ({_f(ue['qps_limit'])} qps)",
             (f"egressd {_f(ue['egressd']['latency_mean_ms_median'], 3)} ms vs dnsmasq+nftset "
             f"{_f(ue['dnsmasq_nftset']['latency_mean_ms_median'], 3)} ms"), "≤ dnsmasq's",
             _met(r["unique_latency_vs_dnsmasq_nftset_equal_load"] is not None and r["unique_latency_vs_dnsmasq_nftset_equal_load"] <= 1)),
            ("a", f"DNS, hot: mean latency at equal load ({_f(he['qps_limit'])} qps)",
             (f"egressd {_f(he['egressd']['latency_mean_ms_median'], 3)} ms vs dnsmasq "
             f"{_f(he['dnsmasq_nftset']['latency_mean_ms_median'], 3)} ms" + _floor(he, "latency_mean_ms_median", " ms")),
             "≤ dnsmasq's",
             _met(r["hot_latency_vs_dnsmasq_equal_load"] is not None and r["hot_latency_vs_dnsmasq_equal_load"] <= 1)),
        ]
        for frac, hc in a.get("hot_latency_curve", {}).items():
            rows.append(("a", f"DNS, hot: mean latency at {float(frac):.0%} of the lower QPS ({_f(hc['qps_limit'])} qps)",
                         (f"egressd {_f(hc['egressd']['latency_mean_ms_median'], 3)} ms vs dnsmasq "
                          f"{_f(hc['dnsmasq_nftset']['latency_mean_ms_median'], 3)} ms"
                          + _floor(hc, "latency_mean_ms_median", " ms")), "— (beside the row above)", "—"))
    b = R.get("b")
    if b:
        rows.append(("b", f"race: {_f(b['names'])} fresh names, each then a TCP connect",
                     (f"**{b['failures']} failures** of {_f(b['attempted'])} ({b['resolve_failures']} resolve failures; "
                     f"{_f(b['per_second'])} names/s, {b['workers']} workers)"), "0 failures", _met(b["failures"] == 0 and b["attempted"] == b["names"])))
    c = R.get("c")
    if c:
        for case in c:
            d, w, ms = case["destinations"], case["workloads"], case["put_to_active_ms_median"]
            target, ok = "—", None
            if w == 1 and d == 2000:
                target, ok = "≤ 50 ms", ms <= 50
            elif w == 1 and d == 100_000:
                target, ok = "≤ 1 s", ms <= 1000
            what = f"apply PUT → active: {_f(d)} destinations" + (f", {_f(w)} workloads" if w > 1 else "")
            if case.get("change") == "all":
                what += ", every destination changed"
            elif w == 1 and d > 10:
                what += " (a new version: every name changed, ranges kept)"
            scope = f"; applied as {case['scope']}" if case.get("scope") else ""
            rows.append(("c", what, (f"**{_f(ms, 1)} ms** (min {_f(case['put_to_active_ms_min'], 1)}, "
                                    f"max {_f(case['put_to_active_ms_max'], 1)}; last apply {_f(case['kernel_apply_ms_last'], 1)} ms{scope})"),
                         target, _met(ok)))
    d = R.get("d")
    if d:
        e, n, r = d["egressd"], d["no_table"], d["ratios"]
        ref = d.get("conntrack_only")
        rows += [
            ("d", f"datapath: iperf3 TCP throughput, {_f(d['set_ips'])} IPs in the set",
             f"{_f(e['gbit_per_s_median'], 2)} vs {_f(n['gbit_per_s_median'], 2)} Gbit/s without the table = **{r['throughput']}×**"
             + (f" (conntrack-only table: {_f(ref['gbit_per_s_median'], 2)})" if ref else ""),
             "≥ 0.95×", _met(r["throughput"] >= 0.95)),
            ("d", "datapath: new TCP connections per second",
             f"{_f(e['conn_per_s_median'])} vs {_f(n['conn_per_s_median'])} /s = **{r['conn_per_s']}×**"
             + (f" (conntrack-only table: {_f(ref['conn_per_s_median'])}/s)" if ref else ""),
             "≥ 0.95×", _met(r["conn_per_s"] >= 0.95)),
        ]
    e = R.get("e")
    if e:
        rows += [
            ("e", "denials sustained without loss (highest rate tried with every event stored)",
             f"**{_f(e['sustained_without_loss_per_s'])}/s** (rates tried: "
             f"{', '.join(_f(x) for x in [e['p99_rate_per_s'], *(x['rate_per_s'] for x in e['ladder'])])} /s"
             + "".join(f"; {_f(x['rate_per_s'])}/s lost {_f(x['lost'])} of {_f(x['sent'])}" for x in e["ladder"])
             + ("; every denial the shim answered was stored" if all(x["stored"] >= x["answered"] for x in e["ladder"] + e["runs"]) else "")
             + ")",
             "—", "—"),
            ("e", f"denial → queryable at {_f(e['p99_rate_per_s'])}/s: p99",
             f"**{_f(e['p99_ms_median'])} ms** (p50 {_f(e['p50_ms_median'])} ms; lost {e['lost_total_at_p99_rate']})",
             "≤ 1 s", _met(e["p99_ms_median"] is not None and e["p99_ms_median"] <= 1000 and e["lost_total_at_p99_rate"] == 0)),
        ]
    f = R.get("f")
    if f:
        rows.append(("f", f"daemon RSS with {_f(f['allowed_ips'])} cached IPs and {_f(f['status_workloads'])} workloads",
                     (f"**{_f(f['rss_mb'], 1)} MB** (peak {_f(f['rss_peak_mb'], 1)}; baseline {_f(f['baseline_rss_mb'], 1)}, "
                     f"IPs alone {_f(f['rss_mb_after_ips'], 1)}; after a restart {_f(f['restart_rss_mb'], 1)})"),
                     "≤ 100 MB", _met(f["rss_mb"] <= 100)))
    return rows


def _details(doc: dict) -> list[str]:
    R = doc.get("results", {})
    out: list[str] = []
    a = R.get("a")
    if a:
        out += ["", "### a: DNS (medians; NOERROR answers per second; mean latency)", "",
                "| mix | side | QPS | mean latency ms | runs (QPS) |", "|---|---|---:|---:|---|"]
        mixes = [(m, a[m]) for m in ("unique", "unique_equal_load", "hot", "hot_equal_load")]
        mixes += [(f"hot at {float(f):.0%}", hc) for f, hc in a.get("hot_latency_curve", {}).items()]
        for mix, sides in mixes:
            for side, s in sides.items():
                if not isinstance(s, dict):
                    continue
                runs = ", ".join(_f(r["qps_noerror"]) for r in s["runs"])
                out.append(f"| {mix} | {side} | {_f(s['qps_median'])} | {_f(s['latency_mean_ms_median'], 3)} | {runs} |")
        out.append(f"\nSet sizes at the end: {a.get('set_sizes')}; egressd counters: {a.get('egressd_counters')}.")
    d = R.get("d")
    if d:
        out += ["", "### d: datapath (medians)", "", "| side | Gbit/s | conn/s | connect failures |", "|---|---:|---:|---:|"]
        for side in ("egressd", "no_table", "conntrack_only"):
            if side in d:
                s = d[side]
                out.append(f"| {side} | {_f(s['gbit_per_s_median'], 2)} | {_f(s['conn_per_s_median'])} | {s['connect_failures']} |")
        out.append(f"\nRatios: {d['ratios']}; filling {_f(d['set_ips'])} IPs took {d['fill_seconds_median']} s (median).")
    f = R.get("f")
    if f:
        out += ["", "### f: memory and scale", ""]
        out += [f"- {k}: {v}" for k, v in f.items()]
    p = R.get("profile")
    if p:
        out += ["", "### Shim profile (py-spy; shares of the event loop's busy samples)", ""]
        for mix, r in p.items():
            out.append(f"- **{mix}** ({_f(r['dnsperf_qps'])} qps under the profiler, daemon CPU {r['cpu_percent']} % of a core): "
                       + "; ".join(f"{k} {pct} %" for k, pct, _n in r["categories"][:6]))
        out.append("\nFlame graphs: `bench/results/profile-unique.svg`, `profile-hot.svg`; tables: `profile-*.md`.")
    return out


def markdown(doc: dict) -> str:
    m = doc.get("machine", {})
    lines = [
        f"# egressd benchmarks{' (quick)' if doc.get('quick') else ''}", "",
        f"{m.get('date')} · {m.get('nproc')} cores, {m.get('cpu_model')}, {m.get('memory_gb')} GB · kernel {m.get('kernel')} · "
        f"Python {m.get('python')} · {m.get('nft')} · git {m.get('git_commit')}"
        + (f" (+{m['git_modified_files']} modified files)" if m.get("git_modified_files") else "")
        + f" · load average {' '.join(m.get('loadavg_start', []))} → {' '.join(m.get('loadavg_end', []))}"
        + f" · {doc.get('total_seconds')} s", "",
        "| # | benchmark | measured | target | met |", "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {w} | {v} | {t} | {ok} |" for k, w, v, t, ok in _rows(doc)]
    for k, err in doc.get("errors", {}).items():
        lines.append(f"| {k} | **failed** | `{err.strip().splitlines()[-1][:200]}` | | **no** |")
    lines += _details(doc)
    return "\n".join(lines) + "\n"
