"""The daemon API through aiohttp's test client, against the real engine and a real kernel table
(in a scratch namespace), with the state dir on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from egressd.admin import Admin
from egressd.api.openapi import openapi_document
from egressd.api.server import make_app
from egressd.baked import Baked
from egressd.core.config import config_from_dict
from egressd.core.policy import default_policy, parse_policy
from egressd.engine import Engine, Target
from egressd.lab import world
from egressd.statestore import StateStore

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/api/2.0"


def make_baked(tmp_path: Path, max_destinations: int = 2000) -> Baked:
    cfg = config_from_dict({
        "account_id": "acct",
        "dns": {"upstreams": ["203.0.113.2:53"]},
        "state": {"dir": str(tmp_path / "state")},
        "policies": {"dir": str(tmp_path / "policies.d")},
        "limits": {"max_destinations": max_destinations},
        "workspaces": [{"id": "1001", "network_policy_id": "restricted-etl"}],
        "workloads": [{"id": "wl1", "workspace_id": "1001", "product": "GENERAL_COMPUTE", "sources": ["10.77.1.2/32"]}],
    })
    pols = {"restricted-etl": parse_policy(world.policy("restricted-etl")), "default-policy": default_policy()}
    return Baked(cfg, pols, {"1001": "restricted-etl"}, tuple(cfg.workloads))


class Api:
    def __init__(self, client, admin, ns, state_dir):
        self.client, self.admin, self.ns, self.state_dir = client, admin, ns, state_dir

    async def call(self, method, path, body=None, headers=AUTH):
        r = await self.client.request(method, path, json=body, headers=headers)
        return r.status, await r.json()

    def snapshot(self):
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(self.state_dir.glob("*"))}
        return self.ns.ruleset(), files


@pytest.fixture
async def api(aiohttp_client, scratch_ns, tmp_path):
    baked = make_baked(tmp_path)
    engine = Engine(baked.config, scratch_ns.nft)
    admin = Admin(engine, StateStore(baked.config.state.dir), baked)
    admin.start()
    app = make_app(admin, status=lambda: {"generation": engine.generation}, metrics=lambda: "", token=TOKEN)
    client = await aiohttp_client(app)
    return Api(client, admin, scratch_ns, Path(baked.config.state.dir))


def policy(pid, **kw):
    return world.policy(pid, **kw)


async def test_policy_lifecycle(api):
    s, body = await api.call("GET", f"{P}/network-policies")
    assert s == 200 and {p["network_policy_id"] for p in body["items"]} == {"default-policy", "restricted-etl"}
    assert {p["source"] for p in body["items"]} == {"image"}
    s, body = await api.call("POST", f"{P}/network-policies", policy("new-one"))
    assert s == 200 and body["source"] == "api"
    s, body = await api.call("POST", f"{P}/network-policies", policy("new-one"))
    assert s == 409 and body["error_code"] == "RESOURCE_ALREADY_EXISTS"
    s, body = await api.call("GET", f"{P}/network-policies/new-one")
    assert s == 200 and body["egress"]["network_access"]["restriction_mode"] == "RESTRICTED_ACCESS"
    # a GET answer can be PUT back as is (its "source" is ignored)
    body["egress"]["network_access"]["restriction_mode"] = "FULL_ACCESS"
    s, body = await api.call("PUT", f"{P}/network-policies/new-one", body)
    assert s == 200 and body["egress"]["network_access"]["restriction_mode"] == "FULL_ACCESS"
    s, _ = await api.call("DELETE", f"{P}/network-policies/new-one")
    assert s == 200
    s, body = await api.call("GET", f"{P}/network-policies/new-one")
    assert s == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"


async def test_pushed_policy_wins_over_baked_until_deleted(api):
    doc = policy("restricted-etl", dry_run=True)
    s, body = await api.call("PUT", f"{P}/network-policies/restricted-etl", doc)
    assert s == 200
    s, body = await api.call("GET", f"{P}/network-policies/restricted-etl")
    assert body["source"] == "api" and body["egress"]["network_access"]["policy_enforcement"]["enforcement_mode"] == "DRY_RUN"
    assert "goto ws_1001_dry" in api.ns.ruleset()
    s, _ = await api.call("DELETE", f"{P}/network-policies/restricted-etl")
    assert s == 200
    s, body = await api.call("GET", f"{P}/network-policies/restricted-etl")
    assert body["source"] == "image" and "goto ws_1001_enf" in api.ns.ruleset()


async def test_invalid_policy_names_the_field_and_changes_nothing(api):
    before = api.snapshot()
    doc = policy("bad")
    doc["egress"]["network_access"]["allowed_internet_destinations"][3]["destination"] = "*.*.com"
    s, body = await api.call("PUT", f"{P}/network-policies/bad", doc)
    assert s == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "egress.network_access.allowed_internet_destinations[3].destination" in body["message"]
    assert '"*.*.com"' in body["message"]
    assert api.snapshot() == before
    for junk in [None, [], "x", {"network_policy_id": "a b"}, {"network_policy_id": "x", "egress": 3}]:
        s, body = await api.call("PUT", f"{P}/network-policies/x", junk)
        assert s == 400, junk
    r = await api.client.put(f"{P}/network-policies/x", data=b"{not json", headers=AUTH)
    assert r.status == 400
    assert api.snapshot() == before


async def test_default_and_bound_policies_cannot_be_deleted(api):
    s, body = await api.call("DELETE", f"{P}/network-policies/default-policy")
    assert s == 409 and "default-policy" in body["message"]
    await api.call("POST", f"{P}/network-policies", policy("p2"))
    s, _ = await api.call("PUT", f"{P}/workspaces/2002/network", {"network_policy_id": "p2"})
    assert s == 200
    s, body = await api.call("DELETE", f"{P}/network-policies/p2")
    assert s == 409 and body["error_code"] == "RESOURCE_CONFLICT" and "2002" in body["message"]
    s, body = await api.call("PUT", f"{P}/workspaces/2002/network", {"network_policy_id": "nope"})
    assert s == 400 and "network_policy_id" in body["message"]


async def test_default_policy_can_be_edited(api):
    doc = policy("default-policy")
    s, _ = await api.call("PUT", f"{P}/network-policies/default-policy", doc)
    assert s == 200
    await api.call("PUT", f"{P}/workloads/wl9", {"workspace_id": "9999", "product": "APPS", "sources": ["10.77.9.2"]})
    assert "10.77.9.2 : goto ws_9999_enf" in api.ns.ruleset()


async def test_binding_over_max_destinations_is_refused(api):
    big = policy("big")
    big["egress"]["network_access"]["allowed_internet_destinations"] = [
        {"destination": f"h{i}.example.com", "internet_destination_type": "DNS_NAME"} for i in range(2001)
    ]
    s, _ = await api.call("POST", f"{P}/network-policies", big)
    assert s == 200  # bound to nothing: no workspace is over the limit
    before = api.snapshot()
    s, body = await api.call("PUT", f"{P}/workspaces/1001/network", {"network_policy_id": "big"})
    assert s == 400 and "max_destinations=2000" in body["message"] and "2003" in body["message"]  # 2001 + 2 storage
    assert api.snapshot() == before
    # connections count too
    ok = policy("ok")
    ok["egress"]["network_access"]["allowed_internet_destinations"] = big["egress"]["network_access"]["allowed_internet_destinations"][:1997]  # + 2 storage destinations = 1999
    await api.call("POST", f"{P}/network-policies", ok)
    s, _ = await api.call("PUT", f"{P}/workspaces/1001/network", {"network_policy_id": "ok"})
    assert s == 200
    conns = {"connections": [{"name": f"c{i}", "connection_type": "POSTGRESQL", "host": f"db{i}.example.com", "port": 5432} for i in range(2)]}
    s, body = await api.call("PUT", f"{P}/workspaces/1001/connections", conns)
    assert s == 400 and "2001" in body["message"]
    conns["connections"].pop()
    s, _ = await api.call("PUT", f"{P}/workspaces/1001/connections", conns)
    assert s == 200


async def test_tcp_request_without_token_gets_401(api):
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
        s, body = await api.call("GET", f"{P}/network-policies", headers=headers)
        assert s == 401 and body["error_code"] == "UNAUTHENTICATED"


async def test_workloads_come_and_go(api):
    s, body = await api.call("PUT", f"{P}/workloads/job-7", {"workspace_id": "1001", "product": "DBSQL", "sources": ["10.77.7.0/24", "2001:db8:77:7::/64"]})
    assert s == 200 and body["workload_id"] == "job-7"
    rs = api.ns.ruleset()
    assert "10.77.7.0/24 : goto ws_1001_enf" in rs and "2001:db8:77:7::/64 : goto ws_1001_enf" in rs
    s, body = await api.call("PUT", f"{P}/workloads/job-8", {"workspace_id": "1001", "product": "DBSQL", "sources": ["10.77.7.9"]})
    assert s == 400 and "overlap" in body["message"]
    s, body = await api.call("GET", f"{P}/workloads")
    assert {w["workload_id"]: w["source"] for w in body["items"]} == {"wl1": "image", "job-7": "api"}
    s, _ = await api.call("DELETE", f"{P}/workloads/job-7")
    assert s == 200 and "10.77.7.0/24" not in api.ns.ruleset()
    s, body = await api.call("DELETE", f"{P}/workloads/wl1")
    assert s == 409
    s, body = await api.call("GET", f"{P}/workspaces")
    ws = {w["workspace_id"]: w for w in body["items"]}
    assert ws["1001"]["network_policy_id"] == "restricted-etl" and ws["1001"]["workloads"] == ["wl1"]
    assert ws["1001"]["destination_count"] == 11  # 9 internet + 2 storage


async def test_fifty_concurrent_writers_leave_a_serial_state(api):
    gen0 = api.admin.engine.generation

    async def writer(i):
        if i % 2:
            return await api.call("PUT", f"{P}/workloads/c{i}", {"workspace_id": str(3000 + i % 5), "product": "APPS", "sources": [f"10.78.{i}.0/24"]})
        doc = policy(f"p{i}", dry_run=bool(i % 4))
        return await api.call("PUT", f"{P}/network-policies/p{i}", doc)

    results = await asyncio.gather(*(writer(i) for i in range(50)))
    assert all(s == 200 for s, _ in results), [b for s, b in results if s != 200]
    assert api.admin.engine.generation == gen0 + 50
    on_disk = json.loads((api.state_dir / "state.json").read_text())
    assert len(on_disk["workloads"]) == 25 and len(on_disk["policies"]) == 25
    assert on_disk == api.admin.pushed.to_json()
    rs = api.ns.ruleset()
    assert all(f"10.78.{i}.0/24 : accept" in rs for i in range(1, 50, 2))  # their workspaces are FULL_ACCESS
    assert f"egressd generation={gen0 + 50}" in rs


async def test_restart_restores_pushed_state(api, tmp_path, scratch_ns):
    await api.call("POST", f"{P}/network-policies", policy("kept"))
    await api.call("PUT", f"{P}/workspaces/5005/network", {"network_policy_id": "kept"})
    await api.call("PUT", f"{P}/workloads/k1", {"workspace_id": "5005", "product": "ML_SERVING", "sources": ["10.79.0.1"]})
    await api.call("PUT", f"{P}/workspaces/5005/connections", {"connections": [{"name": "pg", "connection_type": "POSTGRESQL", "host": "db.example.com", "port": 5432}]})
    baked = make_baked(tmp_path)
    engine = Engine(baked.config, scratch_ns.nft)
    engine.adopt()
    admin2 = Admin(engine, StateStore(baked.config.state.dir), baked)
    admin2.start()
    assert admin2.effective == api.admin.effective
    assert admin2.get_binding("5005")["network_policy_id"] == "kept"
    assert engine.generation == api.admin.engine.generation + 1


@pytest.mark.parametrize(
    "dest,verdict,reason",
    [
        ("pypi.org", "ALLOW", "allowed by allowed_internet_destinations[0] (pypi.org)"),
        ("https://raw.githubusercontent.com/x/y", "ALLOW", "allowed by allowed_internet_destinations[3] (*.githubusercontent.com)"),
        ("gist.githubusercontent.com", "DROP", "blocked by blocked_internet_destinations[0] (gist.githubusercontent.com)"),
        ("evil.example", "DROP", "no allowed destination matches"),
        ("203.0.113.200", "ALLOW", "allowed by allowed_internet_destinations[5] (203.0.113.128/25)"),
        ("[2001:db8:ff:8000::1]", "ALLOW", "allowed by allowed_internet_destinations[6] (2001:db8:ff:8000::/49)"),
        ("192.0.2.1", "DROP", None),
    ],
)
async def test_verify(api, dest, verdict, reason):
    s, body = await api.call("POST", f"{P}/verify", {"workspace_id": "1001", "product": "GENERAL_COMPUTE", "destination": dest})
    assert s == 200, body
    assert body["verdict"] == verdict and body["network_policy_id"] == "restricted-etl"
    if reason:
        assert body["reason"] == reason


async def test_verify_dry_run_product_and_errors(api):
    await api.call("PUT", f"{P}/network-policies/restricted-etl", policy("restricted-etl", dry_run=True, products=["DBSQL"]))
    s, body = await api.call("POST", f"{P}/verify", {"workspace_id": "1001", "product": "DBSQL", "destination": "evil.example"})
    assert body["verdict"] == "LOG_ONLY_DENIAL"
    s, body = await api.call("POST", f"{P}/verify", {"workspace_id": "1001", "product": "APPS", "destination": "evil.example"})
    assert body["verdict"] == "DROP"
    s, body = await api.call("POST", f"{P}/verify", {"workspace_id": "1001", "product": "NOPE"})
    assert s == 400 and "product" in body["message"] and "destination" in body["message"]


async def test_openapi_document_matches_the_routes(api):
    s, doc = await api.call("GET", f"{P}/openapi.json")
    assert s == 200 and doc == json.loads(json.dumps(openapi_document(doc["info"]["version"])))
    served = set()
    for route in api.client.server.app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            served.add((route.method.lower(), path))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    assert served == documented


async def test_unknown_route_and_method(api):
    s, body = await api.call("GET", f"{P}/nothing")
    assert s == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    s, body = await api.call("PATCH", f"{P}/network-policies/x", {})
    assert s == 405


async def test_reload_keeps_unchanged_policy_objects_and_their_cached_ips(api, tmp_path):
    """SIGHUP re-reads the image's policies: an equal one keeps its object, so the engine reuses
    its compiled form and the workspace's cached IPs without checking them again."""
    engine = api.admin.engine
    before = api.admin.effective.policies["restricted-etl"][0]
    await engine.program(Target("1001", "pypi.org"), (("198.51.100.77", 60),))
    table = engine.cache._ws["1001"]
    await api.admin.reload_baked(make_baked(tmp_path))
    assert api.admin.effective.policies["restricted-etl"][0] is before
    assert engine.cache._ws["1001"] is table
    assert "198.51.100.77" in api.ns.ruleset()
