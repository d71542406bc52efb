"""The lab's little internet and the policies the demo and the tests apply to it.

Every address is in a documentation range or in 10.200.0.0/16, all of them local to the lab's
"internet" namespace; nothing here is ever sent outside the namespaces the lab creates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

RACE_NAMES = 1000

RECORDS: dict[str, list[str]] = {
    "pypi.org": ["198.51.100.10", "2001:db8:ff::10"],
    "files.pythonhosted.org": ["198.51.100.11", "2001:db8:ff::11"],
    # Shares pypi.org's addresses: reachable by IP once pypi.org is resolved (co-hosting).
    "mirror.cohosted.example": ["198.51.100.10", "2001:db8:ff::10"],
    "githubusercontent.com": ["198.51.100.24", "2001:db8:ff::24"],
    "raw.githubusercontent.com": ["198.51.100.21", "2001:db8:ff::21"],
    "a.b.githubusercontent.com": ["198.51.100.23", "2001:db8:ff::23"],
    "gist.githubusercontent.com": ["198.51.100.22", "2001:db8:ff::22"],
    "evil.example": ["192.0.2.66", "2001:db8:ff::66"],
    "cdn.edge.example": ["198.51.100.30", "2001:db8:ff::30"],
    "ranged.example": ["203.0.113.130"],
    # storage endpoints and connection hosts
    "lake1.dfs.core.windows.net": ["198.51.100.40"],
    "lake2.dfs.core.windows.net": ["198.51.100.41"],
    "my-bucket.s3.us-west-2.amazonaws.com": ["198.51.100.42"],
    "my-bucket.s3.amazonaws.com": ["198.51.100.42"],
    "other-bucket.s3.amazonaws.com": ["198.51.100.43"],
    "db.conn.example": ["198.51.100.50"],
    "extlake.dfs.core.windows.net": ["198.51.100.51"],
}
CNAMES: dict[str, str] = {
    # An allowed name whose CNAME chain ends outside the allow list.
    "docs.pypi.org": "cdn.edge.example",
}


def race_name(i: int) -> str:
    return f"r{i:05d}.race.test"


def race_ip(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 2}"


def records(race: int = RACE_NAMES) -> dict[str, list[str]]:
    out = dict(RECORDS)
    out.update({race_name(i): [race_ip(i)] for i in range(race)})
    return out


def _dest(name: str, kind: str = "DNS_NAME") -> dict:
    return {"destination": name, "internet_destination_type": kind}


ALLOWED = [
    _dest("pypi.org"),
    _dest("files.pythonhosted.org"),
    _dest("docs.pypi.org"),
    _dest("*.githubusercontent.com"),
    _dest("*.race.test"),
    _dest("203.0.113.128/25", "IP_RANGE"),
    _dest("2001:db8:ff:8000::/49", "IP_RANGE"),
    # single addresses: a hash set of their own in the table
    _dest("192.0.2.237/32", "IP_RANGE"),
    _dest("2001:db8:ff:1::237/128", "IP_RANGE"),
]
BLOCKED = [_dest("gist.githubusercontent.com")]
STORAGE = [
    {"storage_destination_type": "AZURE_STORAGE", "azure_storage_account": "lake1", "azure_storage_service": "dfs"},
    {"storage_destination_type": "AWS_S3", "bucket_name": "my-bucket", "region": "us-west-2"},
]


def policy(pid: str, *, dry_run: bool = False, products: list[str] | None = None) -> dict:
    """A fresh policy document (callers may edit it)."""
    enforcement: dict = {"enforcement_mode": "DRY_RUN" if dry_run else "ENFORCED"}
    if dry_run and products:
        enforcement["dry_run_mode_product_filter"] = products
    return {
        "network_policy_id": pid,
        "egress": {
            "network_access": {
                "restriction_mode": "RESTRICTED_ACCESS",
                "allowed_internet_destinations": copy.deepcopy(ALLOWED),
                "blocked_internet_destinations": copy.deepcopy(BLOCKED),
                "allowed_storage_destinations": copy.deepcopy(STORAGE),
                "policy_enforcement": enforcement,
            }
        },
    }


# workspace -> (policy id, policy document or None for default-policy)
WORKSPACES = {
    "1001": "restricted-etl",
    "1002": "restricted-dryrun",
    "1003": "default-policy",
}
# workload host index (w1, w2, w3) -> (workload id, workspace, product)
WORKLOADS = [
    ("ws1-notebook", "1001", "GENERAL_COMPUTE"),
    ("ws2-warehouse", "1002", "DBSQL"),
    ("ws3-app", "1003", "APPS"),
]


def write_config(
    lab,
    *,
    deny_action: str = "reject",
    upstreams: list[str] | None = None,
    api_socket: str | None = None,
    socket_group: str = "egressd",
    collector_url: str | None = None,
    tcp_listen: str | None = None,
    token_file: str | None = None,
    metrics_listen: str | None = None,
) -> Path:
    """Write the policies and egressd.toml for this lab into lab.tmpdir; return the config path."""
    root = Path(lab.tmpdir) / "egressd"
    pol_dir = root / "policies.d"
    pol_dir.mkdir(parents=True, exist_ok=True)
    (pol_dir / "restricted-etl.json").write_text(json.dumps(policy("restricted-etl"), indent=2))
    (pol_dir / "restricted-dryrun.json").write_text(json.dumps(policy("restricted-dryrun", dry_run=True), indent=2))
    ups = upstreams or [f"{lab.dns_v4}:53", f"[{lab.dns_v6}]:53"]
    lines = [
        'account_id = "lab-account"',
        'node = "lab-node-1"',
        "[dns]",
        f"upstreams = {json.dumps(ups)}",
        "min_ttl = 30",
        "listen_port = 10053",
        "[enforcement]",
        f'deny_action = "{deny_action}"',
        "[api]",
        f'socket = "{api_socket or root / "api.sock"}"',
        f'socket_group = "{socket_group}"',
        *([f'tcp_listen = "{tcp_listen}"', f'token_file = "{token_file}"'] if tcp_listen else []),
        *([f'metrics_listen = "{metrics_listen}"'] if metrics_listen else []),
        "[collector]",
        f'url = "{collector_url or "http://127.0.0.1:9180"}"',
        "[state]",
        f'dir = "{root}/state"',
        "[policies]",
        f'dir = "{pol_dir}"',
    ]
    for ws, pid in WORKSPACES.items():
        if pid != "default-policy":
            lines += ["[[workspaces]]", f'id = "{ws}"', f'network_policy_id = "{pid}"']
    for host, (wid, ws, product) in zip(lab.workloads, WORKLOADS):
        lines += [
            "[[workloads]]",
            f'id = "{wid}"',
            f'workspace_id = "{ws}"',
            f'product = "{product}"',
            f'sources = ["{host.ipv4}/32", "{host.ipv6}/128"]',
        ]
    path = root / "egressd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
