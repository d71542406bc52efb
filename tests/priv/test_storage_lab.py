"""Storage destinations and workspace connections in the lab: the implicit allow list."""

from __future__ import annotations


P = "/api/2.0"


def call(env, method, path, body=None):
    return env.api(method, path, body)


def test_allowed_azure_dfs_account_is_reachable(env):
    assert env.lab.curl(env.w1, "http://lake1.dfs.core.windows.net/")[0] == 200


def test_other_account_on_another_ip_is_denied(env):
    r = env.lab.dig(env.w1, "lake2.dfs.core.windows.net")
    assert r.status == "NXDOMAIN" and r.ede and r.ede[0] == 15
    assert env.lab.curl(env.w1, "http://198.51.100.41/")[0] is None
    rows, _ = env.collector.wait_rows(
        "select * from outbound_network where destination_type = 'STORAGE' and destination = 'lake2.dfs.core.windows.net'",
        lambda r: len(r) >= 1,
    )
    assert rows[0]["storage_event"]["rejection_reason"] == "storage-account-not-allowed"


def test_s3_bucket_host_is_reachable_and_other_buckets_are_not(env):
    assert env.lab.curl(env.w1, "http://my-bucket.s3.us-west-2.amazonaws.com/")[0] == 200
    assert env.lab.curl(env.w1, "http://my-bucket.s3.amazonaws.com/")[0] == 200
    assert env.lab.dig(env.w1, "other-bucket.s3.amazonaws.com").status == "NXDOMAIN"


def test_verify_explains_storage_matches(env):
    s, body = call(env, "POST", f"{P}/verify", {"workspace_id": "1001", "destination": "abfss://c@lake1.dfs.core.windows.net/x"})
    assert s == 200 and body["verdict"] == "ALLOW"
    assert body["reason"] == "allowed by allowed_storage_destinations[0] (AZURE_STORAGE lake1/dfs)"
    assert body["destination_type"] == "STORAGE"


def test_connection_and_external_location_hosts_only_in_their_workspace(env):
    # w3's workspace 1003 gets the same restricted policy, but not the connections of 1001.
    assert call(env, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "restricted-etl"})[0] == 200
    try:
        doc = {
            "connections": [{"name": "pg", "connection_type": "POSTGRESQL", "host": "db.conn.example", "port": 80}],
            "external_locations": [{"name": "lake", "url": "abfss://raw@extlake.dfs.core.windows.net/tables"}],
        }
        s, body = call(env, "PUT", f"{P}/workspaces/1001/connections", doc)
        assert s == 200, body
        for host in ("db.conn.example", "extlake.dfs.core.windows.net"):
            assert env.lab.curl(env.w1, f"http://{host}/")[0] == 200, host
            assert env.lab.dig(env.w3, host).status == "NXDOMAIN", host
        ip = {"db.conn.example": "198.51.100.50", "extlake.dfs.core.windows.net": "198.51.100.51"}
        for host, addr in ip.items():
            assert env.lab.curl(env.w3, f"http://{addr}/")[0] is None
        s, body = call(env, "POST", f"{P}/verify", {"workspace_id": "1001", "destination": "db.conn.example"})
        assert body["verdict"] == "ALLOW" and body["matched"] == "connections[0] (pg: POSTGRESQL db.conn.example:80)"
        # removing them closes the names again
        assert call(env, "PUT", f"{P}/workspaces/1001/connections", {"connections": [], "external_locations": []})[0] == 200
        assert env.lab.dig(env.w1, "db.conn.example").status == "NXDOMAIN"
    finally:
        call(env, "PUT", f"{P}/workspaces/1003/network", {"network_policy_id": "default-policy"})


def test_connections_over_max_destinations_are_refused_whole(env):
    before = env.nft("list", "table", "inet", "egressd")
    doc = {"connections": [{"name": f"c{i}", "connection_type": "MYSQL", "host": f"h{i}.conn.example", "port": 3306} for i in range(1995)]}
    s, body = call(env, "PUT", f"{P}/workspaces/1001/connections", doc)
    assert s == 400 and "max_destinations=2000" in body["message"]
    assert call(env, "GET", f"{P}/workspaces/1001/connections")[1]["connections"] == []
    after = env.nft("list", "table", "inet", "egressd")
    strip = lambda t: "\n".join(l for l in t.splitlines() if "expires" not in l and "counter" not in l and "packets" not in l)
    assert strip(after) == strip(before)
