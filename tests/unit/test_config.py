"""The TOML config: every key, its default, and every error with its key path."""

from __future__ import annotations

import copy
import re
from ipaddress import ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.config import (
    EXAMPLE_CONFIG,
    ApiConfig,
    CollectorConfig,
    Config,
    DnsConfig,
    EnforcementConfig,
    LimitsConfig,
    LogConfig,
    PoliciesConfig,
    StateConfig,
    config_from_dict,
    parse_config,
)
from egressd.core.workloads import Workload, WorkspaceBinding
from egressd.errors import ValidationError

MINIMAL = {"dns": {"upstreams": ["203.0.113.2:53"]}}


def with_(path: str, value) -> dict:
    """MINIMAL with ``value`` at dotted ``path`` (``...`` deletes the key)."""
    doc = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


def get(cfg: Config, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ValidationError) as ei:
        config_from_dict(doc)
    out: dict[str, str] = {}
    for e in ei.value.errors:
        out.setdefault(e.path, e.message)
    return out


# --- defaults ---------------------------------------------------------------------------------

def test_minimal_config_has_all_defaults():
    cfg = config_from_dict(MINIMAL)
    assert cfg == Config(
        account_id="node-1",
        node="",
        dns=DnsConfig(upstreams=(("203.0.113.2", 53),), deny_rcode="NXDOMAIN", min_ttl=30,
                      listen_port=10053, upstream_timeout_ms=1800, max_ips_per_name=64),
        enforcement=EnforcementConfig(deny_action="reject"),
        api=ApiConfig(socket="/run/egressd/api.sock", socket_group="egressd", tcp_listen=None,
                      token_file=None),
        collector=CollectorConfig(url="http://127.0.0.1:9180"),
        state=StateConfig(dir="/var/lib/egressd"),
        limits=LimitsConfig(max_destinations=2000),
        policies=PoliciesConfig(dir="/etc/egressd/policies.d", default_policy="default-policy.json"),
        log=LogConfig(level="info"),
        workspaces=(),
        workloads=(),
    )
    assert cfg.dns.deny_rcode_value == 3
    assert cfg.policies.default_policy_path == "/etc/egressd/policies.d/default-policy.json"


def test_example_config_parses_to_the_defaults():
    assert parse_config(EXAMPLE_CONFIG, "egressd.toml") == config_from_dict(MINIMAL)


def test_example_config_commented_examples_parse():
    """Uncommenting every example key (tcp_listen, token_file, [[workspaces]], [[workloads]])
    still gives a valid config."""
    text = re.sub(r"(?m)^# (?=\[\[|[a-z_]+ = )", "", EXAMPLE_CONFIG)
    assert text.count("\n[[") == 2
    cfg = parse_config(text)
    assert cfg.api.tcp_listen == ("127.0.0.1", 9181)
    assert cfg.api.token_file == "/etc/egressd/api.token"
    assert cfg.workspaces == (WorkspaceBinding("1001", "restricted-etl"),)
    assert cfg.workloads == (Workload("ws1-notebook", "1001", "GENERAL_COMPUTE", (
        ip_network("10.77.1.2/32"), ip_network("2001:db8:77:1::2/128"))),)


def test_example_config_mentions_every_key():
    for key in ("account_id", "node", "upstreams", "deny_rcode", "min_ttl", "listen_port",
                "upstream_timeout_ms", "max_ips_per_name", "deny_action", "socket", "socket_group",
                "tcp_listen", "token_file", "url", "dir", "max_destinations", "default_policy",
                "level", "[[workspaces]]", "[[workloads]]"):
        assert key in EXAMPLE_CONFIG


# --- every key: accepted values ---------------------------------------------------------------

@pytest.mark.parametrize("path,value,expected", [
    ("account_id", "0d4c9e7a-1b2c-4d5e-8f90-123456789abc", "0d4c9e7a-1b2c-4d5e-8f90-123456789abc"),
    ("node", "worker-7.example", "worker-7.example"),
    ("node", "", ""),
    ("dns.upstreams", ["203.0.113.2"], (("203.0.113.2", 53),)),
    ("dns.upstreams", ["203.0.113.2:5353"], (("203.0.113.2", 5353),)),
    ("dns.upstreams", ["[2001:db8::53]:53"], (("2001:db8::53", 53),)),
    ("dns.upstreams", ["[2001:DB8::53]"], (("2001:db8::53", 53),)),
    ("dns.upstreams", ["127.0.0.53", "[::1]:1053"], (("127.0.0.53", 53), ("::1", 1053))),
    ("dns.deny_rcode", "REFUSED", "REFUSED"),
    ("dns.min_ttl", 0, 0),
    ("dns.min_ttl", 86400, 86400),
    ("dns.listen_port", 53, 53),
    ("dns.upstream_timeout_ms", 100, 100),
    ("dns.upstream_timeout_ms", 2000, 2000),
    ("dns.max_ips_per_name", 1, 1),
    ("enforcement.deny_action", "drop", "drop"),
    ("api.socket", "/tmp/x/api.sock", "/tmp/x/api.sock"),
    ("api.socket_group", "wheel", "wheel"),
    ("api.socket_group", "1001", "1001"),
    ("collector.url", "https://collector.example:8443/base/", "https://collector.example:8443/base"),
    ("collector.url", "http://[::1]:9180", "http://[::1]:9180"),
    ("state.dir", "/srv/egressd", "/srv/egressd"),
    ("limits.max_destinations", 1, 1),
    ("policies.dir", "/opt/policies", "/opt/policies"),
    ("policies.default_policy", "", ""),
    ("log.level", "debug", "debug"),
    ("log.level", "error", "error"),
])
def test_key_values(path, value, expected):
    assert get(config_from_dict(with_(path, value)), path) == expected


def test_refused_rcode_value():
    assert config_from_dict(with_("dns.deny_rcode", "REFUSED")).dns.deny_rcode_value == 5


@pytest.mark.parametrize("name,expected", [
    ("", None),
    ("default-policy.json", "/etc/egressd/policies.d/default-policy.json"),
    ("/srv/dp.json", "/srv/dp.json"),
])
def test_default_policy_path(name, expected):
    assert config_from_dict(with_("policies.default_policy", name)).policies.default_policy_path == expected


@pytest.mark.parametrize("listen,expected", [
    ("127.0.0.1:9181", ("127.0.0.1", 9181)),
    ("[::1]:9181", ("::1", 9181)),
    ("localhost:9181", ("localhost", 9181)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
])
def test_tcp_listen(listen, expected):
    doc = with_("api.tcp_listen", listen)
    doc["api"]["token_file"] = "/etc/egressd/api.token"
    cfg = config_from_dict(doc)
    assert cfg.api.tcp_listen == expected and cfg.api.token_file == "/etc/egressd/api.token"


def test_token_file_without_tcp_listen_is_allowed():
    assert config_from_dict(with_("api.token_file", "/etc/t")).api.token_file == "/etc/t"


def test_workspaces_and_workloads():
    doc = copy.deepcopy(MINIMAL)
    doc["workspaces"] = [{"id": "1001", "network_policy_id": "etl"}, {"id": 1002, "network_policy_id": "x"}]
    doc["workloads"] = [
        {"id": "a", "workspace_id": "1001", "product": "DBSQL", "sources": ["10.0.0.1", "fd00::/64"]},
        {"id": "b", "workspace_id": "1003", "product": "APPS", "sources": ["10.0.1.0/24"]},
    ]
    cfg = config_from_dict(doc)
    assert cfg.workspaces == (WorkspaceBinding("1001", "etl"), WorkspaceBinding("1002", "x"))
    assert [w.workload_id for w in cfg.workloads] == ["a", "b"]
    assert cfg.workloads[0].sources == (ip_network("10.0.0.1/32"), ip_network("fd00::/64"))


# --- every key: errors, with their path -------------------------------------------------------

@pytest.mark.parametrize("path,value,fragment", [
    ("account_id", "", "not a valid account id"),
    ("account_id", "a b", "not a valid account id"),
    ("account_id", 12, "must be a string"),
    ("node", "a b", "not a valid node name"),
    ("node", None, "must be a string"),
    ("dns.upstreams", ..., "is required"),
    ("dns.upstreams", [], "at least one"),
    ("dns.upstreams", "203.0.113.2", "must be a list"),
    ("dns.deny_rcode", "nxdomain", "must be one of 'NXDOMAIN', 'REFUSED'"),
    ("dns.deny_rcode", "SERVFAIL", "must be one of"),
    ("dns.deny_rcode", 3, "must be one of"),
    ("dns.min_ttl", -1, "between 0 and 86400"),
    ("dns.min_ttl", 86401, "between 0 and 86400"),
    ("dns.min_ttl", 30.0, "must be an integer"),
    ("dns.min_ttl", "30", "must be an integer"),
    ("dns.min_ttl", True, "must be an integer"),
    ("dns.listen_port", 0, "between 1 and 65535"),
    ("dns.listen_port", 65536, "between 1 and 65535"),
    ("dns.upstream_timeout_ms", 99, "between 100 and 2000"),
    ("dns.upstream_timeout_ms", 2001, "between 100 and 2000"),
    ("dns.max_ips_per_name", 0, "between 1 and 4096"),
    ("dns.max_ips_per_name", False, "must be an integer"),
    ("enforcement.deny_action", "REJECT", "must be one of 'reject', 'drop'"),
    ("enforcement.deny_action", "accept", "must be one of"),
    ("api.socket", "api.sock", "absolute path"),
    ("api.socket", 1, "must be a string"),
    ("api.socket_group", "", "not a valid group name"),
    ("api.socket_group", "a b", "not a valid group name"),
    ("api.token_file", "token", "absolute path"),
    ("api.tcp_listen", "127.0.0.1", "a port is required"),
    ("api.tcp_listen", "127.0.0.1:0", "port must be a number from 1 to 65535"),
    ("api.tcp_listen", "127.0.0.1:99999", "port must be"),
    ("api.tcp_listen", "::1:9181", "in brackets"),
    ("api.tcp_listen", "[localhost]:9181", "must be \"host:port\""),
    ("api.tcp_listen", "bad_host!:9181", "must be \"host:port\""),
    ("api.tcp_listen", 9181, "must be a string"),
    ("collector.url", "ftp://127.0.0.1:9180", "not an http:// or https:// URL"),
    ("collector.url", "127.0.0.1:9180", "not an http"),
    ("collector.url", "http://", "not an http"),
    ("collector.url", "http://h:99999", "not an http"),
    ("collector.url", "http://h:x", "not an http"),
    ("collector.url", "http://h/ x", "not an http"),
    ("collector.url", "http://h/?q=1", "not an http"),
    ("collector.url", ["http://h"], "must be a string"),
    ("state.dir", "var/lib/egressd", "absolute path"),
    ("state.dir", "", "absolute path"),
    ("limits.max_destinations", 0, "between 1 and"),
    ("limits.max_destinations", "2000", "must be an integer"),
    ("policies.dir", "./policies", "absolute path"),
    ("policies.default_policy", 1, "must be a string"),
    ("log.level", "INFO", "must be one of 'debug', 'info', 'warning', 'error'"),
    ("log.level", "trace", "must be one of"),
])
def test_key_errors(path, value, fragment):
    errs = errors_of(with_(path, value))
    assert list(errs) == [path], errs
    assert fragment in errs[path]


@pytest.mark.parametrize("upstream,fragment", [
    ("ns1.example.com", "host names are not allowed"),
    ("ns1.example.com:53", "host names are not allowed"),
    ("2001:db8::53", "in brackets"),
    ("[203.0.113.2]:53", "[bracketed] IPv6"),
    ("[2001:db8::53", "missing ']'"),
    ("[2001:db8::53]53", "expected ':port'"),
    ("203.0.113.2:0", "port must be"),
    ("203.0.113.2:65536", "port must be"),
    ("203.0.113.2:+53", "port must be"),
    ("203.0.113.2: 53", "port must be"),
    ("203.0.113.2:", "port must be"),
    ("203.0.113.02", "host names are not allowed"),
    ("0.0.0.0", "not a unicast address"),
    ("[::]", "not a unicast address"),
    ("224.0.0.251", "not a unicast address"),
    ("", "host names are not allowed"),
])
def test_upstream_errors(upstream, fragment):
    errs = errors_of(with_("dns.upstreams", ["192.0.2.1", upstream]))
    assert list(errs) == ["dns.upstreams[1]"], errs
    assert fragment in errs["dns.upstreams[1]"]


def test_upstream_errors_are_all_collected():
    errs = errors_of(with_("dns.upstreams", [53, "ns.example", "192.0.2.1", "192.0.2.1:53"]))
    assert list(errs) == ["dns.upstreams[0]", "dns.upstreams[1]", "dns.upstreams[3]"]
    assert "duplicate" in errs["dns.upstreams[3]"]


@pytest.mark.parametrize("doc,path,fragment", [
    ({**MINIMAL, "acount_id": "x"}, "acount_id", "unknown key (did you mean 'account_id'?)"),
    ({**MINIMAL, "zzz": 1}, "zzz", "unknown key"),
    ({"dns": {"upstreams": ["192.0.2.1"], "min_tll": 5}}, "dns.min_tll", "did you mean 'min_ttl'?"),
    ({**MINIMAL, "api": {"sockets": "/x"}}, "api.sockets", "did you mean 'socket'?"),
    ({**MINIMAL, "workload": []}, "workload", "did you mean 'workloads'?"),
    ({**MINIMAL, "log": "info"}, "log", "must be a table"),
    ({"dns": ["192.0.2.1"]}, "dns", "must be a table"),
    ({}, "dns.upstreams", "is required"),
    ({**MINIMAL, "dns": {}}, "dns.upstreams", "is required"),
    ({**MINIMAL, "workspaces": {"id": "1"}}, "workspaces", "array of tables"),
    ({**MINIMAL, "workloads": "a"}, "workloads", "array of tables"),
    ({**MINIMAL, "api": {"tcp_listen": "127.0.0.1:9181"}}, "api.token_file",
     "is required when api.tcp_listen is set"),
])
def test_structure_errors(doc, path, fragment):
    errs = errors_of(doc)
    assert path in errs, errs
    assert fragment in errs[path]


WS = {"id": "1001", "network_policy_id": "etl"}
WL = {"id": "w", "workspace_id": "1001", "product": "APPS", "sources": ["10.0.0.1"]}


@pytest.mark.parametrize("key,items,path,fragment", [
    ("workspaces", [WS, {**WS, "network_policy_id": "other"}], "workspaces[1].id", "duplicate workspace id '1001'"),
    ("workspaces", [WS, {"id": "1002"}], "workspaces[1].network_policy_id", "is required"),
    ("workspaces", [WS, {**WS, "id": "1002", "policy": "x"}], "workspaces[1].policy", "unknown key"),
    ("workspaces", [WS, "1002"], "workspaces[1]", "must be an object"),
    ("workloads", [WL, {**WL, "sources": ["10.0.0.2"]}], "workloads[1].id", "duplicate workload id 'w'"),
    ("workloads", [WL, {**WL, "id": "v", "product": "SQL"}], "workloads[1].product", "not a product"),
    ("workloads", [WL, {**WL, "id": "v", "sources": ["10.0.0.2", "x"]}], "workloads[1].sources[1]",
     "not an IP address"),
    ("workloads", [WL, {**WL, "id": "v", "sources": []}], "workloads[1].sources", "at least one"),
    ("workloads", [WL, {**WL, "id": "v", "workload_id": "v"}], "workloads[1].workload_id", "unknown key"),
    ("workloads", [WL, {**WL, "id": "v", "sources": ["10.0.0.1"]}], "workloads[1].sources[0]",
     "overlaps source 10.0.0.1/32 of workload 'w' (workloads[0].sources[0])"),
    ("workloads", [WL, {**WL, "id": "v", "sources": ["10.0.0.0/30"]}], "workloads[1].sources[0]",
     "of workload 'v' overlaps source 10.0.0.1/32 of workload 'w'"),
    ("workloads", [{**WL, "sources": ["fd00::/48"]}, {**WL, "id": "v", "sources": ["fd00:0:0:1::9"]}],
     "workloads[1].sources[0]", "overlaps source fd00::/48"),
])
def test_array_errors(key, items, path, fragment):
    errs = errors_of({**MINIMAL, key: items})
    assert list(errs) == [path], errs
    assert fragment in errs[path]


def test_overlap_paths_skip_invalid_workloads():
    """Indices in overlap errors are the config's, even when an earlier workload is invalid."""
    items = [{**WL, "id": "bad", "product": "?"}, WL, {**WL, "id": "v", "sources": ["10.0.0.0/24"]}]
    errs = errors_of({**MINIMAL, "workloads": items})
    assert list(errs) == ["workloads[0].product", "workloads[2].sources[0]"]
    assert "(workloads[1].sources[0])" in errs["workloads[2].sources[0]"]


def test_all_errors_collected_at_once():
    doc = {
        "account_id": True,
        "dns": {"upstreams": ["ns.example"], "min_ttl": -5, "deny_rcode": "X"},
        "enforcement": {"deny_action": "maybe"},
        "api": {"tcp_listen": "x"},
        "log": {"level": 1, "colour": True},
        "workloads": [WL, WL],
        "extra": 1,
    }
    assert set(errors_of(doc)) == {
        "account_id", "dns.upstreams[0]", "dns.min_ttl", "dns.deny_rcode",
        "enforcement.deny_action", "api.tcp_listen", "log.level", "log.colour",
        "workloads[1].id", "extra",
    }


# --- TOML text --------------------------------------------------------------------------------

def test_parse_config_toml():
    cfg = parse_config("""
account_id = "acct"
[dns]
upstreams = ["203.0.113.2:53", "[2001:db8::53]"]
deny_rcode = "REFUSED"
[[workspaces]]
id = "1001"
network_policy_id = "restricted-etl"
[[workloads]]
id = "ws1-notebook"
workspace_id = "1001"
product = "GENERAL_COMPUTE"
sources = ["10.77.1.2/32", "2001:db8:77:1::2/128"]
""")
    assert cfg.account_id == "acct"
    assert cfg.dns.upstreams == (("203.0.113.2", 53), ("2001:db8::53", 53))
    assert cfg.dns.deny_rcode_value == 5
    assert cfg.workspaces[0].network_policy_id == "restricted-etl"
    assert cfg.workloads[0].workload_id == "ws1-notebook"


@pytest.mark.parametrize("text,fragment", [
    ("[dns\nupstreams = []", "line 1"),
    ("account_id = \"x\"\n[dns]\nupstreams = [\"1.2.3.4\",\n", "invalid TOML"),
    ("a = 1\na = 2\n", "line 2"),
])
def test_toml_syntax_error_has_line(text, fragment):
    with pytest.raises(ValidationError) as ei:
        parse_config(text, "/etc/egressd/egressd.toml")
    [err] = ei.value.errors
    assert err.path == ""
    assert err.message.startswith("/etc/egressd/egressd.toml: invalid TOML: ")
    assert fragment in err.message


def test_toml_type_error_has_path():
    with pytest.raises(ValidationError) as ei:
        parse_config('[dns]\nupstreams = ["192.0.2.1"]\nmin_ttl = "30"\n')
    assert [e.path for e in ei.value.errors] == ["dns.min_ttl"]


@pytest.mark.parametrize("doc", [None, [], "dns", 1])
def test_non_table_document(doc):
    assert errors_of(doc) == {"": "the config must be a table"}


# --- junk never crashes -----------------------------------------------------------------------

KEYS = ["account_id", "node", "dns", "upstreams", "deny_rcode", "min_ttl", "listen_port",
        "upstream_timeout_ms", "max_ips_per_name", "enforcement", "deny_action", "api", "socket",
        "socket_group", "tcp_listen", "token_file", "collector", "url", "state", "dir", "limits",
        "max_destinations", "policies", "default_policy", "log", "level", "workspaces", "workloads",
        "id", "network_policy_id", "workspace_id", "product", "sources"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.sampled_from(["203.0.113.2:53", "[::1]", "10.0.0.0/8", "10.0.0.1", "APPS", "reject",
                     "http://h:1", "/abs", "NXDOMAIN", "1001", "127.0.0.1:1", "[x]:", ":", "[::1]:"]),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=500)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), JUNK, max_size=8))
def test_junk_raises_only_validation_error(doc):
    try:
        cfg = config_from_dict(doc)
    except ValidationError as e:
        assert e.errors and all(isinstance(x.path, str) and x.message for x in e.errors)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_junk_text_raises_only_validation_error(text):
    try:
        parse_config(text)
    except ValidationError:
        pass


FULL = {
    "account_id": "a", "node": "n",
    "dns": {"upstreams": ["192.0.2.1"], "deny_rcode": "REFUSED", "min_ttl": 1, "listen_port": 1,
            "upstream_timeout_ms": 100, "max_ips_per_name": 1},
    "enforcement": {"deny_action": "drop"},
    "api": {"socket": "/s", "socket_group": "g", "tcp_listen": "h:1", "token_file": "/t"},
    "collector": {"url": "http://h"}, "state": {"dir": "/d"}, "limits": {"max_destinations": 1},
    "policies": {"dir": "/p", "default_policy": "x.json"}, "log": {"level": "debug"},
    "workspaces": [WS], "workloads": [WL, {**WL, "id": "v", "sources": ["10.0.1.0/24", "fd00::1"]}],
}


def _leaves(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, (*prefix, i))
    yield prefix


LEAVES = list(_leaves(FULL))


def test_full_config_is_valid():
    cfg = config_from_dict(FULL)
    assert cfg.api.tcp_listen == ("h", 1) and len(cfg.workloads) == 2


@settings(max_examples=500)
@given(st.sampled_from(LEAVES), JUNK)
def test_one_junk_value_in_a_valid_config(where, junk):
    """Replacing any one value of a full valid config with junk gives a Config or a
    ValidationError, never another exception."""
    doc = copy.deepcopy(FULL)
    if not where:
        doc = junk
    else:
        node = doc
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = junk
    try:
        config_from_dict(doc)
    except ValidationError as e:
        assert e.errors and all(x.message for x in e.errors)


# --- TOML text: the example config, mutated line by line and byte by byte --------------------

_TOML_VALUES = st.sampled_from([
    '"x"', '""', "1", "-1", "0", "65536", "1e9", "nan", "inf", "0x1f", "true", "[]", "[1, 2]",
    '["203.0.113.2:53"]', '["[2001:db8::53]:5353", "192.0.2.1"]', '["ns.example"]', "{}",
    "{ a = 1 }", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", '"[::1]:99999"', '"\\u0000"',
    "'''\nmulti\n'''", '"/abs/path"', '"relative"', '"http://h:1"', '"REFUSED"', '"drop"',
])


@st.composite
def mutated_example_config(draw) -> str:
    lines = EXAMPLE_CONFIG.splitlines()
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "uncomment", "value", "chars", "swap", "header"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "uncomment":
            lines[i] = lines[i].lstrip("# ")
        elif op == "value" and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + draw(_TOML_VALUES)
        elif op == "chars":
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(st.sampled_from('[]{}="\'.,#\\ \tx1-:'), max_size=3)) + lines[i][pos + 1:]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "header":
            lines.insert(i, draw(st.sampled_from(["[dns]", "[api]", "[[workloads]]", "[[workspaces]]",
                                                  "[dns.sub]", "[limits]", "[[dns]]", "[nope]"])))
        if not lines:
            lines = [""]
    return "\n".join(lines) + "\n"


@settings(max_examples=600, deadline=None)
@given(mutated_example_config())
def test_mutated_example_config_text_raises_only_validation_error(text):
    """parse_config on TOML text near the shipped example: a Config, or a ValidationError whose
    every error has a message and a key path (or none, for a TOML syntax error)."""
    try:
        cfg = parse_config(text, "egressd.toml")
    except ValidationError as e:
        assert e.errors and all(x.message for x in e.errors)
        for x in e.errors:
            assert x.path or x.message.startswith("egressd.toml: invalid TOML: "), x
    else:
        assert isinstance(cfg, Config) and cfg.dns.upstreams


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deeply_nested_toml_is_a_validation_error(depth: int) -> None:
    text = 'account_id = "n"\n[dns]\nupstreams = ["203.0.113.2"]\n[api]\nx = ' + "[" * depth + "]" * depth + "\n"
    with pytest.raises(ValidationError) as ei:
        parse_config(text, "egressd.toml")
    assert ei.value.errors and all(e.message for e in ei.value.errors)
