"""Workloads and bindings: parsing, overlap checks, the source-address index."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.workloads import (
    PRODUCTS,
    Workload,
    WorkloadIndex,
    WorkspaceBinding,
    check_overlaps,
    overlap_pairs,
    overlaps_with,
    parse_binding,
    parse_workload,
)
from egressd.errors import ValidationError


def wl(wid: str, *sources: str, ws: str = "1001", product: str = "APPS") -> Workload:
    return Workload(wid, ws, product, tuple(ip_network(s) for s in sources))


def api(**over) -> dict:
    doc = {"workload_id": "w1", "workspace_id": "1001", "product": "DBSQL", "sources": ["10.0.0.2/32"]}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not ...}


def errors_of(fn, *args, **kw) -> dict[str, str]:
    with pytest.raises(ValidationError) as ei:
        fn(*args, **kw)
    return {e.path: e.message for e in ei.value.errors}


# --- parse_workload ---------------------------------------------------------------------------

def test_parse_workload_api_shape_round_trips():
    doc = {"workload_id": "nb-1", "workspace_id": "1001", "product": "GENERAL_COMPUTE",
           "sources": ["10.77.1.2/32", "2001:db8:77:1::2/128", "10.78.0.0/16"]}
    w = parse_workload(doc)
    assert w == Workload("nb-1", "1001", "GENERAL_COMPUTE", (
        ip_network("10.77.1.2/32"), ip_network("2001:db8:77:1::2/128"), ip_network("10.78.0.0/16")))
    assert w.to_dict() == doc
    assert parse_workload(w.to_dict()) == w


@pytest.mark.parametrize("source,expected", [
    ("10.0.0.2", "10.0.0.2/32"),
    ("2001:db8::2", "2001:db8::2/128"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_parse_workload_sources(source, expected):
    assert parse_workload(api(sources=[source])).sources == (ip_network(expected),)


def test_parse_workload_config_shape_uses_id():
    w = parse_workload({"id": "a", "workspace_id": "7", "product": "APPS", "sources": ["10.0.0.1"]},
                       "workloads[3]", id_key="id")
    assert w.workload_id == "a"
    assert w.to_dict()["workload_id"] == "a"


def test_parse_workload_accepts_integer_workspace_id():
    assert parse_workload(api(workspace_id=1001)).workspace_id == "1001"


@pytest.mark.parametrize("product", PRODUCTS)
def test_parse_workload_every_product(product):
    assert parse_workload(api(product=product)).product == product


@pytest.mark.parametrize("over,path,fragment", [
    ({"workload_id": ...}, "workload_id", "is required"),
    ({"workspace_id": ...}, "workspace_id", "is required"),
    ({"product": ...}, "product", "is required"),
    ({"sources": ...}, "sources", "is required"),
    ({"workload_id": ""}, "workload_id", "not a valid workload id"),
    ({"workload_id": "a b"}, "workload_id", "not a valid workload id"),
    ({"workload_id": "x" * 65}, "workload_id", "not a valid workload id"),
    ({"workload_id": "a\n"}, "workload_id", "not a valid workload id"),
    ({"workload_id": 7}, "workload_id", "must be a string"),
    ({"workspace_id": "ws/1"}, "workspace_id", "not a valid workspace id"),
    ({"workspace_id": True}, "workspace_id", "must be a string"),
    ({"workspace_id": -1}, "workspace_id", "must be a string"),
    ({"workspace_id": None}, "workspace_id", "must be a string"),
    ({"product": "dbsql"}, "product", "not a product"),
    ({"product": ["DBSQL"]}, "product", "not a product"),
    ({"sources": []}, "sources", "at least one"),
    ({"sources": "10.0.0.1"}, "sources", "must be a list"),
    ({"sources": ["10.0.0.1", 5]}, "sources[1]", "must be a string"),
    ({"sources": ["10.0.0.1/24"]}, "sources[0]", "host bits set (did you mean 10.0.0.0/24?)"),
    ({"sources": ["2001:db8::1/64"]}, "sources[0]", "host bits set"),
    ({"sources": ["10.0.0.300"]}, "sources[0]", "not an IP address or CIDR"),
    ({"sources": ["example.com"]}, "sources[0]", "not an IP address or CIDR"),
    ({"sources": ["10.0.0.0/33"]}, "sources[0]", "not an IP address or CIDR"),
    ({"sources": ["::ffff:10.0.0.1"]}, "sources[0]", "IPv4-mapped"),
    ({"sources": ["10.0.0.1", "10.0.0.1/32"]}, "sources[1]", "overlaps sources[0]"),
    ({"sources": ["10.0.0.1", "10.0.0.0/24"]}, "sources[1]", "overlaps sources[0]"),
    ({"color": "red"}, "color", "unknown key"),
    ({"id": "w1"}, "id", "unknown key"),
])
def test_parse_workload_errors(over, path, fragment):
    errs = errors_of(parse_workload, api(**over))
    assert path in errs, errs
    assert fragment in errs[path]


def test_parse_workload_collects_all_errors_with_prefix():
    errs = errors_of(parse_workload, {"id": "", "product": "X", "sources": ["a", "10.0.0.1/8"], "z": 1},
                     "workloads[2]", id_key="id")
    assert set(errs) == {"workloads[2].id", "workloads[2].product", "workloads[2].sources[0]",
                         "workloads[2].sources[1]", "workloads[2].z", "workloads[2].workspace_id"}


@pytest.mark.parametrize("obj", [None, [], "w1", 3])
def test_parse_workload_not_an_object(obj):
    assert errors_of(parse_workload, obj, "workloads[0]") == {"workloads[0]": "must be an object"}


# --- parse_binding ----------------------------------------------------------------------------

def test_parse_binding():
    b = parse_binding({"workspace_id": "1001", "network_policy_id": "restricted-etl"})
    assert b == WorkspaceBinding("1001", "restricted-etl")
    assert b.to_dict() == {"workspace_id": "1001", "network_policy_id": "restricted-etl"}
    assert parse_binding({"id": 42, "network_policy_id": "p"}, id_key="id") == WorkspaceBinding("42", "p")


@pytest.mark.parametrize("obj,path,fragment", [
    ({"id": "1"}, "workspaces[0].network_policy_id", "is required"),
    ({"network_policy_id": "p"}, "workspaces[0].id", "is required"),
    ({"id": "1", "network_policy_id": "p" * 33}, "workspaces[0].network_policy_id", "not a valid"),
    ({"id": "1", "network_policy_id": "a/b"}, "workspaces[0].network_policy_id", "not a valid"),
    ({"id": "1", "network_policy_id": 5}, "workspaces[0].network_policy_id", "must be a string"),
    ({"id": "w s", "network_policy_id": "p"}, "workspaces[0].id", "not a valid workspace id"),
    ({"id": False, "network_policy_id": "p"}, "workspaces[0].id", "must be a string"),
    ({"id": "1", "network_policy_id": "p", "policy": "p"}, "workspaces[0].policy", "unknown key"),
    ({"workspace_id": "1", "network_policy_id": "p"}, "workspaces[0].workspace_id", "unknown key"),
    ("1001", "workspaces[0]", "must be an object"),
])
def test_parse_binding_errors(obj, path, fragment):
    errs = errors_of(parse_binding, obj, "workspaces[0]", id_key="id")
    assert path in errs, errs
    assert fragment in errs[path]


# --- overlaps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [
    ("10.0.0.1/32", "10.0.0.1/32"),              # identical v4
    ("10.0.0.0/24", "10.0.0.77/32"),             # containing v4
    ("10.0.0.77/32", "10.0.0.0/24"),             # contained v4, other order
    ("0.0.0.0/0", "192.0.2.1/32"),
    ("2001:db8::1/128", "2001:db8::1/128"),      # identical v6
    ("2001:db8::/32", "2001:db8:1::/48"),        # containing v6
    ("2001:db8:1::/48", "2001:db8::/32"),
])
def test_check_overlaps_found(a, b):
    ws = [wl("first", "fd99::1/128", a), wl("second", b)]
    errs = check_overlaps(ws)
    assert len(errs) == 1
    assert errs[0].path == "workloads[1].sources[0]"
    assert "'first'" in errs[0].message and "'second'" in errs[0].message
    assert "workloads[0].sources[1]" in errs[0].message


@pytest.mark.parametrize("a,b", [
    ("10.0.0.1/32", "10.0.0.2/32"),
    ("10.0.0.0/25", "10.0.0.128/25"),
    ("10.0.0.0/8", "11.0.0.0/8"),
    ("2001:db8::/33", "2001:db8:8000::/33"),
    ("10.0.0.1/32", "::a00:1/128"),               # same bits, different families
    ("0.0.0.0/0", "::/0"),
])
def test_check_overlaps_disjoint(a, b):
    assert check_overlaps([wl("a", a), wl("b", b)]) == []


def test_check_overlaps_custom_paths_and_nesting():
    ws = [wl("outer", "10.0.0.0/8"), wl("mid", "10.1.0.0/16"), wl("inner", "10.1.2.3/32")]
    errs = check_overlaps(ws, ["workloads[4]", "workloads[7]", "workloads[9]"])
    assert [e.path for e in errs] == ["workloads[7].sources[0]", "workloads[9].sources[0]"]
    assert "'outer'" in errs[0].message and "'mid'" in errs[1].message


def test_check_overlaps_within_one_workload():
    errs = check_overlaps([wl("a", "10.0.0.0/24", "10.0.0.5/32")])
    assert [e.path for e in errs] == ["workloads[0].sources[1]"]


def test_overlaps_with_replaces_same_id():
    existing = [wl("a", "10.0.0.1/32"), wl("b", "10.0.1.0/24")]
    assert overlaps_with(wl("a", "10.0.0.1/32"), existing) == []
    errs = overlaps_with(wl("c", "10.2.0.9/32", "10.0.0.0/16"), existing)
    assert [e.path for e in errs] == ["sources[1]", "sources[1]"]
    assert "'a'" in errs[0].message + errs[1].message and "'b'" in errs[0].message + errs[1].message
    assert {e.path for e in overlaps_with(wl("c", "10.0.1.9/32"), existing, "workload")} == \
        {"workload.sources[0]"}
    inner = overlaps_with(wl("c", "10.3.0.0/16", "10.3.0.1/32"), existing)
    assert [e.path for e in inner] == ["sources[1]"] and "this workload" in inner[0].message


def test_check_overlaps_10000_workloads_is_fast():
    ws = [wl(f"w{i}", f"10.{i >> 8}.{i & 255}.1/32", f"fd00:{i:x}::/64") for i in range(10_000)]
    start = time.perf_counter()
    assert check_overlaps(ws) == []
    ws.append(wl("late", "10.39.15.0/24"))  # contains w9999's 10.39.15.1
    errs = check_overlaps(ws)
    assert time.perf_counter() - start < 2.0
    assert len(errs) == 1 and "'w9999'" in errs[0].message and errs[0].path == "workloads[10000].sources[0]"


def _nets(version: int):
    bits = 32 if version == 4 else 128
    # Small address space so overlaps are frequent.
    base = 0x0A000000 if version == 4 else 0xFD00 << 112
    return st.tuples(st.integers(0, 255), st.integers(bits - 8, bits)).map(
        lambda t: ip_network(((base + t[0]) >> (bits - t[1]) << (bits - t[1]), t[1]))
    )


workload_sets = st.lists(
    st.lists(st.one_of(_nets(4), _nets(6)), min_size=1, max_size=4), min_size=1, max_size=12
).map(lambda groups: [Workload(f"w{i}", "1", "APPS", tuple(g)) for i, g in enumerate(groups)])


@given(workload_sets)
def test_overlap_pairs_match_brute_force(ws):
    srcs = [(wi, si, n) for wi, w in enumerate(ws) for si, n in enumerate(w.sources)]
    brute = {
        frozenset({(a, b), (c, d)})
        for i, (a, b, n) in enumerate(srcs) for (c, d, m) in srcs[i + 1:]
        if n.version == m.version and n.overlaps(m)
    }
    pairs = list(overlap_pairs(ws))
    for x, y in pairs:
        assert frozenset({x, y}) in brute
    involved = {s for pair in brute for s in pair}
    assert {s for pair in pairs for s in pair} == involved
    assert (check_overlaps(ws) == []) == (not brute)


# --- WorkloadIndex ----------------------------------------------------------------------------

@pytest.fixture
def index() -> WorkloadIndex:
    return WorkloadIndex([
        wl("host4", "10.77.1.2/32", "2001:db8:77:1::2/128"),
        wl("net4", "10.78.0.0/16"),
        wl("net6", "2001:db8:99::/48"),
        wl("mixed", "192.0.2.0/24", "198.51.100.7/32"),
    ])


@pytest.mark.parametrize("ip,expected", [
    ("10.77.1.2", "host4"),
    ("2001:db8:77:1::2", "host4"),
    ("10.78.200.3", "net4"),
    ("10.78.0.0", "net4"),
    ("10.78.255.255", "net4"),
    ("2001:db8:99:ffff::1", "net6"),
    ("192.0.2.200", "mixed"),
    ("198.51.100.7", "mixed"),
    ("::ffff:10.77.1.2", "host4"),               # dual-stack socket
    ("::ffff:10.78.1.1", "net4"),
    ("::FFFF:198.51.100.7", "mixed"),
    ("2001:db8:77:1::2%eth0", "host4"),
    ("10.77.1.3", None),
    ("10.79.0.0", None),
    ("198.51.100.8", None),
    ("2001:db8:77:1::3", None),
    ("::a4d:102", None),                        # IPv4-compatible, not mapped
    ("::ffff:10.79.0.1", None),
    ("not-an-ip", None),
    ("", None),
])
def test_index_lookup(index, ip, expected):
    w = index.lookup(ip)
    assert (w.workload_id if w else None) == expected


def test_index_accepts_address_objects(index):
    assert index.lookup(IPv4Address("10.77.1.2")).workload_id == "host4"
    assert index.lookup(IPv6Address("::ffff:10.78.0.1")).workload_id == "net4"
    assert len(index) == 4
    assert WorkloadIndex([]).lookup("10.0.0.1") is None


def _disjoint(nets):
    kept = []
    for n in nets:
        if all(n.version != k.version or not n.overlaps(k) for k in kept):
            kept.append(n)
    return kept


@settings(max_examples=200)
@given(
    st.lists(st.one_of(_nets(4), _nets(6)), min_size=0, max_size=30),
    st.lists(st.integers(0, 3), min_size=30, max_size=30),
    st.lists(st.tuples(st.sampled_from(["v4", "v6", "mapped"]), st.integers(0, 300)), max_size=40),
)
def test_index_agrees_with_brute_force(nets, owner, probes):
    nets = _disjoint(nets)
    groups: dict[int, list] = {}
    for i, n in enumerate(nets):
        groups.setdefault(owner[i], []).append(n)
    ws = [Workload(f"w{k}", "1", "APPS", tuple(v)) for k, v in groups.items()]
    assert check_overlaps(ws) == []
    index = WorkloadIndex(ws)
    addrs = [str(n.network_address + (n.num_addresses - 1) // 2) for n in nets]
    for kind, off in probes:
        if kind == "v6":
            addrs.append(str(ip_address((0xFD00 << 112) + off)))
        else:
            v4 = ip_address(0x0A000000 + off)
            addrs.append(str(v4) if kind == "v4" else f"::ffff:{v4}")
    for a in addrs:
        ip = ip_address(a)
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        brute = [w for w in ws for n in w.sources if n.version == ip.version and ip in n]
        assert len(brute) <= 1
        assert index.lookup(a) == (brute[0] if brute else None)
