import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressd.core.connections import location_hosts, parse_connections
from egressd.core.policy import parse_policy
from egressd.core.verdict import CompiledPolicy
from egressd.errors import ValidationError
from egressd.lab import world


def conns(**kw):
    return {"connections": kw.get("c", []), "external_locations": kw.get("e", [])}


PG = {"name": "pg", "connection_type": "POSTGRESQL", "host": "DB.Example.com.", "port": 5432}


def test_connection_host_name_and_ip():
    c = parse_connections(conns(c=[PG, {"name": "ip", "connection_type": "MYSQL", "host": "198.51.100.7", "port": 3306}]))
    names, nets = c.extras()
    assert names == [("db.example.com", "connections[0] (pg: POSTGRESQL db.example.com:5432)")]
    assert nets == [("198.51.100.7", "connections[1] (ip: MYSQL 198.51.100.7:3306)")]
    assert c.destination_count() == 2
    assert parse_connections(c.to_dict()) == c


@pytest.mark.parametrize(
    "url,hosts",
    [
        ("abfss://raw@extlake.dfs.core.windows.net/a/b", ("extlake.dfs.core.windows.net",)),
        ("gs://my-gcs/x", ("storage.googleapis.com", "my-gcs.storage.googleapis.com")),
    ],
)
def test_location_hosts(url, hosts):
    assert location_hosts(url) == hosts


def test_s3_location_covers_global_and_regional_endpoints():
    hosts = location_hosts("s3://my-bucket/prefix/")
    assert "my-bucket.s3.amazonaws.com" in hosts
    assert "my-bucket.s3.us-west-2.amazonaws.com" in hosts
    assert "my-bucket.s3.dualstack.eu-central-1.amazonaws.com" in hosts


@pytest.mark.parametrize(
    "doc,path",
    [
        (conns(c=[{**PG, "connection_type": "ORACLE"}]), "connections[0].connection_type"),
        (conns(c=[{**PG, "host": "*.x.com"}]), "connections[0].host"),
        (conns(c=[{**PG, "port": 0}]), "connections[0].port"),
        (conns(c=[{**PG, "port": True}]), "connections[0].port"),
        (conns(c=[{**PG, "name": "a b"}]), "connections[0].name"),
        (conns(c=[PG, PG]), "connections[1].name"),
        (conns(c=[{**PG, "extra": 1}]), "connections[0].extra"),
        (conns(e=[{"name": "l", "url": "https://x/y"}]), "external_locations[0].url"),
        (conns(e=[{"name": "l", "url": "abfss://nocontainer.dfs.core.windows.net/"}]), "external_locations[0].url"),
        (conns(e=[{"name": "l", "url": "abfss://c@acct.blob.core.windows.net/"}]), "external_locations[0].url"),
        (conns(e=[{"name": "l"}]), "external_locations[0].url"),
        ({"connections": "x"}, "connections"),
        ([], ""),
    ],
)
def test_errors_name_their_path(doc, path):
    with pytest.raises(ValidationError) as e:
        parse_connections(doc)
    assert any(fe.path == path for fe in e.value.errors), e.value.errors


def test_connections_allow_their_hosts_in_a_restricted_policy():
    pol = parse_policy(world.policy("p"))
    c = parse_connections(conns(c=[PG], e=[{"name": "lake", "url": "abfss://c@extlake.dfs.core.windows.net/p"}]))
    cp = CompiledPolicy(pol, *c.extras())
    d = cp.decide_name("db.example.com", "APPS")
    assert d.verdict == "ALLOW" and d.matched == "connections[0] (pg: POSTGRESQL db.example.com:5432)"
    d = cp.decide_name("extlake.dfs.core.windows.net", "APPS")
    assert d.verdict == "ALLOW" and d.destination_type == "STORAGE" and "external_locations[0]" in d.matched
    d = cp.decide_name("lake1.dfs.core.windows.net", "APPS")
    assert d.verdict == "ALLOW" and d.reason == "allowed by allowed_storage_destinations[0] (AZURE_STORAGE lake1/dfs)"
    assert cp.decide_name("lake2.dfs.core.windows.net", "APPS").destination_type == "STORAGE"
    assert CompiledPolicy(pol).decide_name("db.example.com", "APPS").verdict == "DROP"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=12), ch, max_size=4), max_leaves=20))
def test_junk_raises_only_validation_error(doc):
    try:
        parse_connections(doc)
    except ValidationError:
        pass
