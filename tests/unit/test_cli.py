"""`egressd check-config` as an operator runs it: a real process, real files."""

from __future__ import annotations

import json
import subprocess
import sys

from egressd.lab import world


def check(path):
    return subprocess.run([sys.executable, "-m", "egressd.cli", "check-config", str(path)], capture_output=True, text=True, timeout=30)


def write(tmp_path, body, policies=None):
    pol = tmp_path / "policies.d"
    pol.mkdir()
    for name, doc in (policies or {}).items():
        (pol / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    cfg = tmp_path / "egressd.toml"
    cfg.write_text(body.replace("POLDIR", str(pol)))
    return cfg


GOOD = """
account_id = "acct"
[dns]
upstreams = ["203.0.113.2:53"]
[policies]
dir = "POLDIR"
[[workspaces]]
id = "1001"
network_policy_id = "restricted-etl"
[[workloads]]
id = "wl1"
workspace_id = "1001"
product = "GENERAL_COMPUTE"
sources = ["10.77.1.2/32"]
"""


def test_valid_config_exits_0(tmp_path):
    r = check(write(tmp_path, GOOD, {"r.json": world.policy("restricted-etl")}))
    assert r.returncode == 0, r.stderr
    assert "2 policies, 1 workspace bindings, 1 workloads" in r.stdout


def test_each_error_is_printed_with_its_key_path_and_exit_2(tmp_path):
    body = GOOD.replace('upstreams = ["203.0.113.2:53"]', 'upstreams = ["203.0.113.2:99999"]\ndeny_rcode = "SERVFAIL"')
    body = body.replace('product = "GENERAL_COMPUTE"', 'product = "SPARK"')
    r = check(write(tmp_path, body, {"r.json": world.policy("restricted-etl")}))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert any(l.startswith("error: dns.upstreams[0]") for l in lines), r.stderr
    assert any(l.startswith("error: dns.deny_rcode") for l in lines), r.stderr
    assert any(l.startswith("error: workloads[0].product") for l in lines), r.stderr


def test_bad_policy_file_is_named_with_its_field_path(tmp_path):
    doc = world.policy("restricted-etl")
    doc["egress"]["network_access"]["allowed_internet_destinations"][3]["destination"] = "*.*.com"
    r = check(write(tmp_path, GOOD, {"r.json": doc}))
    assert r.returncode == 2
    assert "r.json: egress.network_access.allowed_internet_destinations[3].destination" in r.stderr


def test_binding_to_an_unknown_policy_and_missing_file(tmp_path):
    r = check(write(tmp_path, GOOD))
    assert r.returncode == 2 and "workspaces[0].network_policy_id" in r.stderr
    r = check(tmp_path / "nope.toml")
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_default_policy_file_in_dir_or_absolute(tmp_path):
    doc = world.policy("default-policy")
    cfg = write(tmp_path, GOOD, {"r.json": world.policy("restricted-etl"), "default-policy.json": doc})
    assert check(cfg).returncode == 0
    other = tmp_path / "elsewhere.json"
    other.write_text(__import__("json").dumps(world.policy("not-default")))
    body = cfg.read_text().replace('[policies]', f'[policies]\ndefault_policy = "{other}"')
    cfg.write_text(body)
    (tmp_path / "policies.d" / "default-policy.json").unlink()
    r = check(cfg)
    assert r.returncode == 2 and "must hold 'default-policy'" in r.stderr


def test_all_three_commands_print_their_version():
    from egressd import __version__

    for mod, name in (("egressd.cli", "egressd"), ("egressd.ctl", "egressctl"), ("egressd.collector.cli", "egress-collector")):
        r = subprocess.run([sys.executable, "-m", mod, "--version"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == f"{name} {__version__}", (mod, r.stdout, r.stderr)
