"""Failure modes, each with a real trigger in the lab: a full state disk (a small tmpfs), a kernel
that refuses egressd's transaction (the netfilter hook limit), and an invalid config at start.

Failure modes tested elsewhere:
- the daemon crashes: test_service.py::test_kill_9_keeps_restricted_closed_and_resolved_ips_open,
  test_restart.py::test_restart_keeps_restricted_closed_and_resolved_ips_open
- the collector is down: test_logs.py::test_collector_down_30s_while_5000_denials_happen_loses_nothing,
  test_logs.py::test_collector_kill_9_mid_inserts_no_loss_no_duplicates
- every upstream is down: test_enforce.py::test_upstream_down_gives_servfail_within_2s,
  test_enforce.py::test_blackholed_upstream_gives_servfail_within_2s
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egressd.lab import Lab, world
from egressd.lab.apiclient import call
from egressd.lab.daemonproc import DaemonProc, DaemonStartError

P = "/api/2.0"
DENIED_IP4 = "192.0.2.99"  # served by the lab's web server, allowed by no policy


@pytest.fixture
def lab():
    with Lab(workloads=3, records=world.records(race=0), cnames=world.CNAMES) as lab:
        yield lab


def api(config: Path, method: str, path: str, body=None):
    return call(str(config.parent / "api.sock"), method, path, body)


def table(lab) -> str:
    """`nft list table inet egressd` without what moves on its own (timeouts, counters)."""
    out = lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
    out = re.sub(r" expires \S+", "", out)
    return re.sub(r"packets \d+ bytes \d+", "packets N bytes N", out)


def generation(lab) -> int:
    out = lab.run(lab.node_ns, ["nft", "list", "table", "inet", "egressd"], check=True).stdout
    return int(re.search(r'comment "egressd generation=(\d+)"', out).group(1))


def metric(config: Path, name: str, **labels: str) -> float:
    status, text = api(config, "GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def logged(d: DaemonProc, event: str, **fields) -> bool:
    """Did the daemon log ``event`` (a structlog JSON line) with these fields?"""
    for line in d.log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event and all(rec.get(k) == v for k, v in fields.items()):
            return True
    return False


def blocked(lab, host) -> bool:
    code, _out, elapsed = lab.curl(host, f"http://{DENIED_IP4}/", timeout=3)
    return code is None and elapsed < 2.5


@contextmanager
def tmpfs(path: Path, size: str):
    """A real, small filesystem at ``path``, unmounted (lazily if still busy) on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write one file until the filesystem is full (ENOSPC); bounded to 64 MiB."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        for _ in range(16384):
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return filler
    raise AssertionError(f"{directory} never filled up")


# --- the state (and spool) disk is full ------------------------------------------------------

def test_full_state_disk_refuses_writes_cleanly_and_keeps_serving(lab):
    config = world.write_config(lab)  # no collector is listening: events go to the spool
    state = config.parent / "state"
    w1, w3 = lab.workloads[0], lab.workloads[2]
    with tmpfs(state, "256k"):
        d = DaemonProc(lab, config)
        d.start()
        try:
            status, body = api(config, "PUT", f"{P}/network-policies/before", world.policy("before"))
            assert status == 200, body
            saved = (state / "state.json").read_bytes()
            filler = fill(state)
            before, gen = table(lab), generation(lab)

            # A new policy, and a binding that would change the kernel: both refused, clearly.
            status, body = api(config, "PUT", f"{P}/network-policies/after", world.policy("after"))
            assert status == 500 and body["error_code"] == "INTERNAL_ERROR", body
            assert "No space left on device" in body["message"] and str(state) in body["message"], body
            print("full disk:", body["message"])
            status, body = api(config, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "before"})
            assert status == 500 and "No space left on device" in body["message"], body

            # Nothing changed: kernel, disk, memory.
            assert table(lab) == before and generation(lab) == gen
            assert (state / "state.json").read_bytes() == saved
            assert not list(state.glob(".state.json.*")), "a temporary file was left behind"
            assert api(config, "GET", f"{P}/network-policies/after")[0] == 404
            assert api(config, "GET", f"{P}/workspaces/1003/network")[1]["network_policy_id"] == "default-policy"
            assert not blocked(lab, w3) and blocked(lab, w1)
            assert logged(d, "api_change_failed", step="write_state", object="after"), d.log()

            # Denials under a full disk: DNS keeps being served; the events that cannot be
            # spooled are dropped and counted.
            dropped0 = metric(config, "egressd_events_dropped_total", reason="newest")
            for i in range(20):
                assert lab.dig(w1, f"n{i}.evil.example").status == "NXDOMAIN"
            deadline = time.monotonic() + 15
            while metric(config, "egressd_events_dropped_total", reason="newest") <= dropped0:
                assert time.monotonic() < deadline, f"no event counted as dropped:\n{d.log()}"
                time.sleep(0.2)
            assert logged(d, "spool_write_failed"), d.log()
            assert lab.dig(w1, "pypi.org").status == "NOERROR"
            assert lab.curl(w1, "http://pypi.org/")[0] == 200
            assert d.proc.poll() is None and api(config, "GET", f"{P}/status")[0] == 200

            # Space again: the same write goes through.
            filler.unlink()
            status, body = api(config, "PUT", f"{P}/network-policies/after", world.policy("after"))
            assert status == 200, body
            assert generation(lab) == gen + 1
            assert b'"after"' in (state / "state.json").read_bytes()
        finally:
            d.stop()


# --- the kernel refuses the transaction -----------------------------------------------------

FILL_TABLE = "egtfill"


def fill_forward_hook(lab, limit: int = 1100) -> int:
    """Register empty accept-all base chains on the forward hook, in a table of their own, until
    the kernel refuses one more (netfilter allows 1024 hook entries per hook point: E2BIG).
    Returns how many were added."""
    lab.run(lab.node_ns, ["nft", "add", "table", "inet", FILL_TABLE], check=True)
    added = 0
    for size in (256, 64, 16, 4, 1):
        while added + size <= limit:
            chains = "\n".join(
                f"add chain inet {FILL_TABLE} c{i} {{ type filter hook forward priority 0; policy accept; }}"
                for i in range(added, added + size))
            r = lab.run(lab.node_ns, ["nft", "-f", "-"], input=chains)
            if r.returncode != 0:
                assert "Argument list too long" in r.stderr, r.stderr
                break
            added += size
    return added


def test_kernel_refusal_changes_nothing_and_dns_keeps_working(lab):
    config = world.write_config(lab)
    state = config.parent / "state"
    w1, w3 = lab.workloads[0], lab.workloads[2]
    d = DaemonProc(lab, config)
    d.start()
    try:
        status, body = api(config, "PUT", f"{P}/network-policies/before", world.policy("before"))
        assert status == 200, body
        saved = (state / "state.json").read_bytes()
        added = fill_forward_hook(lab)
        assert 900 < added < 1024, added  # the limit was reached by our chains, not before
        before, gen = table(lab), generation(lab)

        # Binding w3's workspace to a restricted policy needs a new transaction: refused.
        status, body = api(config, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "restricted-etl"})
        assert status == 500 and body["error_code"] == "INTERNAL_ERROR", body
        assert "Argument list too long" in body["message"], body  # nft's own message
        print(f"kernel refusal after {added} filler chains:", body["message"])

        assert table(lab) == before and generation(lab) == gen
        assert (state / "state.json").read_bytes() == saved
        assert not list(state.glob(".state.json.*"))
        assert api(config, "GET", f"{P}/workspaces/1003/network")[1]["network_policy_id"] == "default-policy"
        assert api(config, "GET", f"{P}/network-policies/after")[0] == 404
        assert logged(d, "api_change_failed", step="apply", action="assign_policy"), d.log()

        # The old rules enforce, and DNS works, all along.
        assert lab.dig(w1, "pypi.org").status == "NOERROR"
        assert lab.dig(w1, "evil.example").status == "NXDOMAIN"
        assert lab.curl(w1, "http://pypi.org/")[0] == 200
        assert blocked(lab, w1) and not blocked(lab, w3)
        assert d.proc.poll() is None

        # A policy that no workspace uses needs no new rules: it goes in as a delta (the
        # generation marker only), which the kernel still takes.
        status, body = api(config, "PUT", f"{P}/network-policies/after", world.policy("after"))
        assert status == 200, body
        assert generation(lab) == gen + 1 and logged(d, "ruleset_applied", scope="delta"), d.log()
        assert blocked(lab, w1) and not blocked(lab, w3)

        # Room again: the same change goes through and w3 is restricted.
        lab.run(lab.node_ns, ["nft", "delete", "table", "inet", FILL_TABLE], check=True)
        status, body = api(config, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "restricted-etl"})
        assert status == 200, body
        assert generation(lab) == gen + 2 and blocked(lab, w3)
    finally:
        d.stop()
        lab.run(lab.node_ns, ["nft", "delete", "table", "inet", FILL_TABLE])


# --- the config is invalid at start -----------------------------------------------------------

@pytest.mark.parametrize("old,new,expect", [
    ("min_ttl = 30", "min_ttl = -5", "dns.min_ttl"),
    ('deny_action = "reject"', 'deny_action = "maybe"', "enforcement.deny_action"),
    ("[enforcement]", "[enforcement", "invalid TOML"),
], ids=["bad-value", "bad-choice", "toml-syntax"])
def test_invalid_config_at_start_refuses_and_the_old_rules_stay(lab, old, new, expect):
    config = world.write_config(lab)
    w1, w3 = lab.workloads[0], lab.workloads[2]
    d = DaemonProc(lab, config)
    d.start()
    assert lab.dig(w1, "pypi.org").status == "NOERROR"
    d.stop()
    before, gen = table(lab), generation(lab)

    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    d2 = DaemonProc(lab, config, name="egressd-bad")
    with pytest.raises(DaemonStartError):
        d2.start(timeout=15)
    assert d2.proc.returncode == 2, d2.log()
    assert expect in d2.log() and "error:" in d2.log(), d2.log()
    assert "Traceback" not in d2.log()
    print("refused start:", d2.log().strip().splitlines()[-1])

    # The rules of the previous run stay: w1 restricted, its resolved IP still open, w3 open.
    assert table(lab) == before and generation(lab) == gen
    assert blocked(lab, w1) and not blocked(lab, w3)
    assert lab.curl(w1, "http://198.51.100.10/")[0] == 200
    assert os.path.exists(config)
