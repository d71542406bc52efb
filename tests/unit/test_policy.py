"""Policy parsing, canonical form and dry-run selection."""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.policy import (
    DEFAULT_POLICY_ID,
    PRODUCTS,
    DestinationType,
    EnforcementMode,
    InternetDestination,
    Policy,
    RestrictionMode,
    default_policy,
    parse_internet_destination,
    parse_policy,
)
from egressd.core.storage import StorageDestination, StorageDestinationType, quote
from egressd.errors import FieldError, ValidationError

NA = "egress.network_access"
AID = f"{NA}.allowed_internet_destinations"
BID = f"{NA}.blocked_internet_destinations"
ASD = f"{NA}.allowed_storage_destinations"
PE = f"{NA}.policy_enforcement"

SPEC_EXAMPLE: dict[str, Any] = {
    "network_policy_id": "restricted-etl",
    "egress": {
        "network_access": {
            "restriction_mode": "RESTRICTED_ACCESS",
            "allowed_internet_destinations": [
                {"destination": "pypi.org", "internet_destination_type": "DNS_NAME"},
                {"destination": "*.githubusercontent.com", "internet_destination_type": "DNS_NAME"},
                {"destination": "198.51.100.0/24", "internet_destination_type": "IP_RANGE"},
            ],
            "blocked_internet_destinations": [
                {"destination": "gist.githubusercontent.com", "internet_destination_type": "DNS_NAME"}
            ],
            "allowed_storage_destinations": [
                {"storage_destination_type": "AZURE_STORAGE", "azure_storage_account": "lake1", "azure_storage_service": "dfs"},
                {"storage_destination_type": "AWS_S3", "bucket_name": "my-bucket", "region": "us-west-2"},
                {"storage_destination_type": "GOOGLE_CLOUD_STORAGE", "bucket_name": "my-gcs-bucket"},
            ],
            "policy_enforcement": {"enforcement_mode": "DRY_RUN", "dry_run_mode_product_filter": ["DBSQL"]},
        }
    },
}


def restricted(**access: Any) -> dict[str, Any]:
    return {"network_policy_id": "p1", "egress": {"network_access": {"restriction_mode": "RESTRICTED_ACCESS", **access}}}


def test_spec_example() -> None:
    p = parse_policy(SPEC_EXAMPLE)
    assert p.network_policy_id == "restricted-etl"
    assert p.restriction_mode is RestrictionMode.RESTRICTED_ACCESS
    assert p.allowed_internet == (
        InternetDestination("pypi.org", DestinationType.DNS_NAME),
        InternetDestination("*.githubusercontent.com", DestinationType.DNS_NAME),
        InternetDestination("198.51.100.0/24", DestinationType.IP_RANGE),
    )
    assert p.blocked_internet == (InternetDestination("gist.githubusercontent.com"),)
    assert p.allowed_storage[0] == StorageDestination(StorageDestinationType.AZURE_STORAGE, "lake1", "dfs")
    assert p.enforcement_mode is EnforcementMode.DRY_RUN
    assert p.dry_run_products == frozenset({"DBSQL"})
    assert p.destination_count() == 6
    assert p.to_dict() == SPEC_EXAMPLE
    assert parse_policy(p.to_dict()) == p


def test_absent_egress_is_full_access() -> None:
    assert parse_policy({"network_policy_id": "p1"}) == Policy("p1", RestrictionMode.FULL_ACCESS)
    assert parse_policy({"network_policy_id": "p1", "egress": None}).restriction_mode is RestrictionMode.FULL_ACCESS


def test_account_id_is_ignored() -> None:
    assert parse_policy({"network_policy_id": "p1", "account_id": "acc-1"}) == Policy("p1")
    assert parse_policy({**SPEC_EXAMPLE, "account_id": 42}) == parse_policy(SPEC_EXAMPLE)


def test_default_policy() -> None:
    p = default_policy()
    assert p.network_policy_id == DEFAULT_POLICY_ID == "default-policy"
    assert p.restriction_mode is RestrictionMode.FULL_ACCESS and p.enforcement_mode is EnforcementMode.ENFORCED
    assert p.destination_count() == 0
    assert parse_policy(p.to_dict()) == p


def test_canonical_form_of_minimal_policy() -> None:
    assert parse_policy(restricted()).to_dict() == {
        "network_policy_id": "p1",
        "egress": {
            "network_access": {
                "restriction_mode": "RESTRICTED_ACCESS",
                "allowed_internet_destinations": [],
                "blocked_internet_destinations": [],
                "allowed_storage_destinations": [],
                "policy_enforcement": {"enforcement_mode": "ENFORCED", "dry_run_mode_product_filter": []},
            }
        },
    }


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"destination": "pypi.org"}, InternetDestination("pypi.org", DestinationType.DNS_NAME)),
        ({"destination": "PyPI.org.", "internet_destination_type": None}, InternetDestination("pypi.org")),
        ({"destination": "*.Example.com"}, InternetDestination("*.example.com")),
        ({"destination": "bücher.example"}, InternetDestination("xn--bcher-kva.example")),
        ({"destination": "10.0.0.0/8", "internet_destination_type": "IP_RANGE"}, InternetDestination("10.0.0.0/8", DestinationType.IP_RANGE)),
        ({"destination": "192.0.2.7", "internet_destination_type": "IP_RANGE"}, InternetDestination("192.0.2.7/32", DestinationType.IP_RANGE)),
        ({"destination": "2001:DB8::/32", "internet_destination_type": "IP_RANGE"}, InternetDestination("2001:db8::/32", DestinationType.IP_RANGE)),
        ({"destination": " 2001:db8:0:0::1 ", "internet_destination_type": "IP_RANGE"}, InternetDestination("2001:db8::1/128", DestinationType.IP_RANGE)),
        ({"destination": "0.0.0.0/0", "internet_destination_type": "IP_RANGE"}, InternetDestination("0.0.0.0/0", DestinationType.IP_RANGE)),
    ],
)
@pytest.mark.parametrize("list_name", ["allowed_internet_destinations", "blocked_internet_destinations"])
def test_internet_destination_normalized(list_name: str, entry: dict[str, Any], expected: InternetDestination) -> None:
    p = parse_policy(restricted(**{list_name: [entry]}))
    got = p.allowed_internet if list_name.startswith("allowed") else p.blocked_internet
    assert got == (expected,)


def test_full_access_keeps_lists_but_round_trips() -> None:
    obj = copy.deepcopy(SPEC_EXAMPLE)
    obj["egress"]["network_access"]["restriction_mode"] = "FULL_ACCESS"
    p = parse_policy(obj)
    assert p.restriction_mode is RestrictionMode.FULL_ACCESS and len(p.allowed_internet) == 3
    assert parse_policy(p.to_dict()) == p


def test_same_destination_allowed_and_blocked_is_valid() -> None:
    p = parse_policy(restricted(allowed_internet_destinations=[{"destination": "a.com"}], blocked_internet_destinations=[{"destination": "a.com"}]))
    assert p.allowed_internet == p.blocked_internet


def errors_of(obj: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_policy(obj)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([], ["a policy must be a JSON object, got list"]),
        ("x", ["a policy must be a JSON object, got string"]),
        ({}, ["network_policy_id: is required"]),
        ({"network_policy_id": 7}, ["network_policy_id: must be a string, got number"]),
        ({"network_policy_id": ""}, ['network_policy_id: "" must match ^[a-zA-Z0-9_.-]{1,32}$']),
        ({"network_policy_id": "a" * 33}, [f'network_policy_id: "{"a" * 33}" must match ^[a-zA-Z0-9_.-]{{1,32}}$']),
        ({"network_policy_id": "bad id"}, ['network_policy_id: "bad id" must match ^[a-zA-Z0-9_.-]{1,32}$']),
        ({"network_policy_id": "p1\n"}, ['network_policy_id: "p1\\n" must match ^[a-zA-Z0-9_.-]{1,32}$']),
        ({"network_policy_id": "p1", "egres": {}}, ['egres: unknown field (did you mean "egress"?)']),
        ({"network_policy_id": "p1", "zzz": 1}, ["zzz: unknown field (valid fields: network_policy_id, egress, account_id)"]),
        ({"network_policy_id": "p1", "egress": []}, ["egress: must be an object, got list"]),
        ({"network_policy_id": "p1", "egress": {}}, [f"{NA}: is required when egress is given"]),
        (
            {"network_policy_id": "p1", "egress": {"network_acess": {}}},
            ['egress.network_acess: unknown field (did you mean "network_access"?)', f"{NA}: is required when egress is given"],
        ),
        ({"network_policy_id": "p1", "egress": {"network_access": "open"}}, [f"{NA}: must be an object, got string"]),
        (
            {"network_policy_id": "p1", "egress": {"network_access": {}}},
            [f"{NA}.restriction_mode: is required (FULL_ACCESS or RESTRICTED_ACCESS)"],
        ),
        (
            {"network_policy_id": "p1", "egress": {"network_access": {"restriction_mode": "RESTRICTED"}}},
            [f'{NA}.restriction_mode: "RESTRICTED" must be one of FULL_ACCESS, RESTRICTED_ACCESS'],
        ),
        (
            restricted(blocked_internet_destination=[]),
            [f'{NA}.blocked_internet_destination: unknown field (did you mean "blocked_internet_destinations"?)'],
        ),
        (restricted(allowed_internet_destinations={}), [f"{AID}: must be a list, got object"]),
        (restricted(allowed_internet_destinations=["pypi.org"]), [f"{AID}[0]: must be an object, got string"]),
        (restricted(allowed_internet_destinations=[None]), [f"{AID}[0]: must be an object, got null"]),
        (restricted(allowed_internet_destinations=[{}]), [f"{AID}[0].destination: is required"]),
        (restricted(allowed_internet_destinations=[{"destination": 5}]), [f"{AID}[0].destination: must be a string, got number"]),
        (
            restricted(allowed_internet_destinations=[{"destination": "a.com", "type": "DNS_NAME"}]),
            [f"{AID}[0].type: unknown field (valid fields: destination, internet_destination_type)"],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "a.com", "internet_destination_type": "FQDN"}]),
            [f'{AID}[0].internet_destination_type: "FQDN" must be one of DNS_NAME, IP_RANGE'],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "a.com"}, {"destination": "b.com"}, {"destination": "c.com"}, {"destination": "*.*.com"}]),
            [
                f"{AID}[3].destination: \"*.*.com\" is not a valid DNS_NAME pattern "
                "('*' is allowed only once, as the whole first label ('*.example.com'))"
            ],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "*.com"}]),
            [f"{AID}[0].destination: \"*.com\" is not a valid DNS_NAME pattern ('*.com' is too broad: a wildcard needs at least two labels after '*.')"],
        ),
        (
            restricted(blocked_internet_destinations=[{"destination": "*"}]),
            [f"{BID}[0].destination: \"*\" is not a valid DNS_NAME pattern (a bare '*' would match every name: use restriction_mode FULL_ACCESS instead)"],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "foo*.com"}]),
            [f"{AID}[0].destination: \"foo*.com\" is not a valid DNS_NAME pattern ('*' is allowed only as the whole first label, followed by a domain ('*.example.com'))"],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "a.*.com"}]),
            [f"{AID}[0].destination: \"a.*.com\" is not a valid DNS_NAME pattern ('*' is allowed only as the whole first label, followed by a domain ('*.example.com'))"],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "exa mple.com"}]),
            [f"{AID}[0].destination: \"exa mple.com\" is not a valid DNS_NAME pattern (label 'exa mple' may contain only letters, digits, '-' and '_')"],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "10.0.0.1"}]),
            [f'{AID}[0].destination: "10.0.0.1" is an IP address or range, not a DNS_NAME (use internet_destination_type IP_RANGE)'],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "10.0.0.1/8", "internet_destination_type": "IP_RANGE"}]),
            [f'{AID}[0].destination: "10.0.0.1/8" is not a valid IP_RANGE (host bits are set; did you mean 10.0.0.0/8?)'],
        ),
        (
            restricted(blocked_internet_destinations=[{"destination": "2001:db8::1/32", "internet_destination_type": "IP_RANGE"}]),
            [f'{BID}[0].destination: "2001:db8::1/32" is not a valid IP_RANGE (host bits are set; did you mean 2001:db8::/32?)'],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "pypi.org", "internet_destination_type": "IP_RANGE"}]),
            [f'{AID}[0].destination: "pypi.org" is not a valid IP_RANGE (expected an IPv4 or IPv6 CIDR like 198.51.100.0/24)'],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "10.0.0.0/33", "internet_destination_type": "IP_RANGE"}]),
            [f'{AID}[0].destination: "10.0.0.0/33" is not a valid IP_RANGE (expected an IPv4 or IPv6 CIDR like 198.51.100.0/24)'],
        ),
        (
            restricted(allowed_internet_destinations=[{"destination": "a.com"}, {"destination": "A.com."}]),
            [f'{AID}[1].destination: "a.com" duplicates allowed_internet_destinations[0]'],
        ),
        (
            restricted(allowed_storage_destinations=[{"storage_destination_type": "AZURE_STORAGE", "azure_storage_account": "Lake1"}]),
            [f'{ASD}[0].azure_storage_account: "Lake1" must be 3-24 lower-case letters and digits'],
        ),
        (
            restricted(allowed_storage_destinations=[{"storage_destination_type": "AWS_S3", "bucket_name": "bkt"}] * 2),
            [f"{ASD}[1]: AWS_S3 bkt duplicates allowed_storage_destinations[0]"],
        ),
        (restricted(policy_enforcement="DRY_RUN"), [f"{PE}: must be an object, got string"]),
        (
            restricted(policy_enforcement={"enforcement_mode": "LOG_ONLY"}),
            [f'{PE}.enforcement_mode: "LOG_ONLY" must be one of ENFORCED, DRY_RUN'],
        ),
        (
            restricted(policy_enforcement={"mode": "DRY_RUN"}),
            [f"{PE}.mode: unknown field (valid fields: enforcement_mode, dry_run_mode_product_filter)"],
        ),
        (
            restricted(policy_enforcement={"enforcement_mode": "DRY_RUN", "dry_run_mode_product_filter": "DBSQL"}),
            [f"{PE}.dry_run_mode_product_filter: must be a list, got string"],
        ),
        (
            restricted(policy_enforcement={"enforcement_mode": "DRY_RUN", "dry_run_mode_product_filter": ["DBSQL", "SPARK", "DBSQL", 1]}),
            [
                f'{PE}.dry_run_mode_product_filter[1]: "SPARK" must be one of DBSQL, ML_SERVING, GENERAL_COMPUTE, ML_BUILD, APPS',
                f'{PE}.dry_run_mode_product_filter[2]: "DBSQL" is listed twice',
                f"{PE}.dry_run_mode_product_filter[3]: 1 must be one of DBSQL, ML_SERVING, GENERAL_COMPUTE, ML_BUILD, APPS",
            ],
        ),
    ],
)
def test_validation_errors(obj: Any, expected: list[str]) -> None:
    assert errors_of(obj) == expected


def test_all_errors_collected_at_once() -> None:
    obj = copy.deepcopy(SPEC_EXAMPLE)
    obj["network_policy_id"] = "bad id"
    access = obj["egress"]["network_access"]
    access["allowed_internet_destinations"].append({"destination": "*.*.com"})
    access["blocked_internet_destinations"].append({"destination": "10.0.0.1/8", "internet_destination_type": "IP_RANGE"})
    access["allowed_storage_destinations"][0]["azure_storage_account"] = "Lake1"
    access["policy_enforcement"]["dry_run_mode_product_filter"].append("NOPE")
    access["extra"] = True
    paths = [e.split(":")[0] for e in errors_of(obj)]
    assert paths == [
        "network_policy_id",
        f"{NA}.extra",
        f"{AID}[3].destination",
        f"{BID}[1].destination",
        f"{ASD}[0].azure_storage_account",
        f"{PE}.dry_run_mode_product_filter[1]",
    ]


@pytest.mark.parametrize(
    ("mode", "products", "product", "dry"),
    [
        ("ENFORCED", [], "DBSQL", False),
        ("ENFORCED", ["DBSQL"], "DBSQL", False),
        ("DRY_RUN", [], "DBSQL", True),
        ("DRY_RUN", [], "APPS", True),
        ("DRY_RUN", ["DBSQL"], "DBSQL", True),
        ("DRY_RUN", ["DBSQL"], "GENERAL_COMPUTE", False),
        ("DRY_RUN", ["DBSQL", "ML_SERVING"], "ML_SERVING", True),
        ("DRY_RUN", ["ML_BUILD"], "UNKNOWN", False),
    ],
)
def test_is_dry_run(mode: str, products: list[str], product: str, dry: bool) -> None:
    p = parse_policy(restricted(policy_enforcement={"enforcement_mode": mode, "dry_run_mode_product_filter": products}))
    assert p.is_dry_run(product) is dry


def test_enforcement_defaults() -> None:
    p = parse_policy(restricted(policy_enforcement={}))
    assert p.enforcement_mode is EnforcementMode.ENFORCED and p.dry_run_products == frozenset()
    assert parse_policy(restricted(policy_enforcement={"enforcement_mode": "DRY_RUN"})).is_dry_run("APPS")


def test_filter_order_is_canonical() -> None:
    p = parse_policy(restricted(policy_enforcement={"enforcement_mode": "DRY_RUN", "dry_run_mode_product_filter": ["APPS", "DBSQL"]}))
    assert p.to_dict()["egress"]["network_access"]["policy_enforcement"]["dry_run_mode_product_filter"] == ["DBSQL", "APPS"]


# -- properties ---------------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True)


def _not_ip(name: str) -> bool:
    try:
        ipaddress.ip_network(name)
    except ValueError:
        return True
    return False


NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(_not_ip)
PATTERN = st.one_of(NAME, st.lists(LABEL, min_size=2, max_size=4).map(lambda ls: "*." + ".".join(ls)))
CIDR = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: str(ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)))
INTERNET = st.one_of(
    PATTERN.map(lambda d: InternetDestination(d, DestinationType.DNS_NAME)),
    CIDR.map(lambda d: InternetDestination(d, DestinationType.IP_RANGE)),
)
STORAGE = st.one_of(
    st.builds(
        StorageDestination,
        st.just(StorageDestinationType.AZURE_STORAGE),
        azure_storage_account=st.from_regex(r"[a-z0-9]{3,24}", fullmatch=True),
        azure_storage_service=st.sampled_from(["dfs", "blob", None]),
    ),
    st.builds(
        StorageDestination,
        st.just(StorageDestinationType.AWS_S3),
        bucket_name=st.from_regex(r"b[a-z0-9-]{1,20}[a-z0-9]", fullmatch=True),
        region=st.sampled_from(["us-west-2", "eu-central-1", None]),
    ),
    st.builds(
        StorageDestination,
        st.just(StorageDestinationType.GOOGLE_CLOUD_STORAGE),
        bucket_name=st.from_regex(r"b[a-z0-9_-]{1,20}[a-z0-9]", fullmatch=True).filter(lambda b: "google" not in b),
    ),
)
POLICIES = st.builds(
    Policy,
    network_policy_id=st.from_regex(r"[a-zA-Z0-9_.-]{1,32}", fullmatch=True),
    restriction_mode=st.sampled_from(RestrictionMode),
    allowed_internet=st.lists(INTERNET, unique=True, max_size=6).map(tuple),
    blocked_internet=st.lists(INTERNET, unique=True, max_size=4).map(tuple),
    allowed_storage=st.lists(STORAGE, unique=True, max_size=4).map(tuple),
    enforcement_mode=st.sampled_from(EnforcementMode),
    dry_run_products=st.frozensets(st.sampled_from(PRODUCTS)),
)


@given(POLICIES)
def test_round_trip(policy: Policy) -> None:
    assert parse_policy(policy.to_dict()) == policy
    assert parse_policy(json.loads(json.dumps(policy.to_dict()))) == policy


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
JUNK = st.recursive(
    JSON_LEAF,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "network_policy_id", "egress", "network_access", "restriction_mode", "allowed_internet_destinations",
        "blocked_internet_destinations", "allowed_storage_destinations", "policy_enforcement", "destination",
        "internet_destination_type", "storage_destination_type", "bucket_name", "region", "azure_storage_account",
        "azure_storage_service", "enforcement_mode", "dry_run_mode_product_filter", "account_id",
    ]
)
VALUES = st.sampled_from(
    ["RESTRICTED_ACCESS", "FULL_ACCESS", "DNS_NAME", "IP_RANGE", "AWS_S3", "AZURE_STORAGE", "GOOGLE_CLOUD_STORAGE",
     "DRY_RUN", "ENFORCED", "DBSQL", "p1", "*.a.b", "a.com", "10.0.0.0/8", "lake1", "dfs", "us-west-2", "bkt"]
)
SHAPED_JUNK = st.recursive(
    st.one_of(JSON_LEAF, VALUES),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=30,
)


def _parse_or_validation_error(obj: Any) -> None:
    try:
        policy = parse_policy(obj)
    except ValidationError as exc:
        assert exc.errors
        return
    assert parse_policy(policy.to_dict()) == policy


@given(JUNK)
def test_junk_raises_only_validation_error(obj: Any) -> None:
    _parse_or_validation_error(obj)


@given(SHAPED_JUNK)
def test_shaped_junk_raises_only_validation_error(obj: Any) -> None:
    _parse_or_validation_error(obj)


@given(st.data())
def test_spec_example_with_one_junk_leaf(data: st.DataObject) -> None:
    obj = copy.deepcopy(SPEC_EXAMPLE)
    node: Any = obj
    while True:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            node[key] = data.draw(JUNK)
            break
        node = child
    _parse_or_validation_error(obj)


# -- the wire form: the SPEC example as JSON text, mutated byte by byte --------------------------

@st.composite
def mutated_spec_json(draw: st.DrawFn) -> str:
    text = list(json.dumps(SPEC_EXAMPLE))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        junk = draw(st.text(st.sampled_from('{}[]",:.*-_ 0129azAZ\\/é\x00'), min_size=1, max_size=3))
        if op == "flip" and pos < len(text):
            text[pos] = junk[0]
        elif op == "insert":
            text[pos:pos] = list(junk)
        elif op == "delete":
            del text[pos:pos + len(junk)]
    return "".join(text)


@settings(max_examples=1000, deadline=None)
@given(mutated_spec_json())
def test_mutated_spec_json_raises_only_validation_error(text: str) -> None:
    """What the API does with a body: json.loads, then parse_policy. Whatever decodes is either a
    policy that round-trips, or a ValidationError whose every error names a path or the object."""
    try:
        obj = json.loads(text)
    except ValueError:
        return
    try:
        policy = parse_policy(obj)
    except ValidationError as exc:
        assert exc.errors and all(e.message for e in exc.errors)
        return
    assert parse_policy(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize("depth", [10, 500, 1000, 100_000])
def test_deeply_nested_values_raise_only_validation_error(depth: int) -> None:
    deep: list = []
    for _ in range(depth):
        deep = [deep]
    for leaf in ("network_policy_id", "allowed_internet_destinations", "dry_run_mode_product_filter"):
        obj = copy.deepcopy(SPEC_EXAMPLE)
        na = obj["egress"]["network_access"]
        target = obj if leaf == "network_policy_id" else na if leaf.startswith("allowed") else na["policy_enforcement"]
        target[leaf] = deep
        with pytest.raises(ValidationError):
            parse_policy(obj)


# --- the fast path of a destination entry (a policy may hold 100,000) agrees with the full parse ---

_LABELS = st.text(alphabet="abcdefxyzABC019_-.*:/ ü", min_size=0, max_size=12)
_OCTET_TEXT = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "255", "256"]))
_V4_TEXT = st.builds(lambda a, b, c, d, p: f"{a}.{b}.{c}.{d}{p}", _OCTET_TEXT, _OCTET_TEXT, _OCTET_TEXT, _OCTET_TEXT,
                     st.one_of(st.just(""), st.integers(0, 40).map(lambda n: f"/{n}"), st.sampled_from(["/08", "/032", "/"])))


@settings(max_examples=1500, deadline=None)
@given(raw=st.one_of(_LABELS, st.lists(_LABELS, min_size=1, max_size=5).map(".".join), _V4_TEXT),
       kind=st.sampled_from(["DNS_NAME", "IP_RANGE", None, "dns_name", 5]), with_kind=st.booleans())
def test_fast_destination_is_the_full_parse_or_declines(raw: str, kind: Any, with_kind: bool) -> None:
    from egressd.core.policy import _fast_destination, parse_internet_destination

    entry = {"destination": raw, **({"internet_destination_type": kind} if with_kind else {})}
    fast = _fast_destination(entry)
    if fast is None:
        return  # the full parse decides (and words any error)
    full = parse_internet_destination(entry, "e")
    assert (fast.destination, fast.type, fast.span) == (full.destination, full.type, full.span)


def test_fast_destination_takes_the_plain_cases() -> None:
    from egressd.core.policy import _fast_destination

    assert _fast_destination({"destination": "files.pythonhosted.org"}) == InternetDestination("files.pythonhosted.org")
    assert _fast_destination({"destination": "*.x.example"}) == InternetDestination("*.x.example")
    fast = _fast_destination({"destination": "198.51.100.0/24", "internet_destination_type": "IP_RANGE"})
    assert fast is not None and fast.span == (4, 0xC6336400, 0xC63364FF)
    assert _fast_destination({"destination": "198.51.100.1", "internet_destination_type": "IP_RANGE"}).destination == "198.51.100.1/32"
    assert _fast_destination({"destination": "PyPI.org."}) == InternetDestination("pypi.org")  # normalized
    for declined in ({"destination": "10.0.0.1"}, {"destination": "198.51.100.1/24",
                     "internet_destination_type": "IP_RANGE"}, {"destination": "x", "extra": 1}):
        assert _fast_destination(declined) is None


_ENTRY = st.one_of(
    st.builds(lambda d: {"destination": d}, st.sampled_from(["pypi.org", "PyPI.org.", "*.x.example", "a.b", "10.0.0.1", "*.b"])),
    st.builds(lambda d: {"destination": d, "internet_destination_type": "IP_RANGE"},
              st.sampled_from(["10.0.0.0/8", "10.0.0.1", "10.0.0.1/8", "2001:db8::/32", "2001:DB8::/32", "pypi.org"])),
    st.builds(lambda d: {"destination": d, "internet_destination_type": "DNS_NAME", "x": 1}, st.sampled_from(["a.b"])),
    st.sampled_from([{"destination": 5}, "pypi.org", {"destination": "a.b", "internet_destination_type": None}]),
)
_ENTRIES = st.lists(_ENTRY, max_size=8)


def _doc(allowed: list, blocked: list) -> dict:
    return {"network_policy_id": "p", "egress": {"network_access": {
        "restriction_mode": "RESTRICTED_ACCESS", "allowed_internet_destinations": allowed,
        "blocked_internet_destinations": blocked}}}


def _outcome(doc: dict, previous: Policy | None = None):
    try:
        return parse_policy(doc, previous=previous)
    except ValidationError as e:
        return [str(f) for f in e.errors]


@settings(max_examples=400, deadline=None)
@given(old=st.tuples(_ENTRIES, _ENTRIES), new=st.tuples(_ENTRIES, _ENTRIES))
def test_parse_with_a_previous_version_gives_what_a_fresh_parse_does(old, new) -> None:
    previous = _outcome(_doc(*old))
    if not isinstance(previous, Policy):
        previous = parse_policy(_doc([{"destination": "pypi.org"}, {"destination": "10.0.0.0/8", "internet_destination_type": "IP_RANGE"}], []))
    fresh, reused = _outcome(_doc(*new)), _outcome(_doc(*new), previous)
    assert fresh == reused
    if isinstance(fresh, Policy):
        assert [d.span for d in fresh.allowed_internet] == [d.span for d in reused.allowed_internet]


def test_parse_with_a_previous_version_takes_over_its_canonical_entries() -> None:
    entries = [{"destination": "pypi.org"}, {"destination": "10.0.0.0/8", "internet_destination_type": "IP_RANGE"},
               {"destination": "PyPI.org."}]
    previous = parse_policy(_doc(entries[:2], []))
    again = parse_policy(_doc([entries[1], {"destination": "other.example"}], [entries[2]]), previous=previous)
    assert again.allowed_internet[0] is previous.allowed_internet[1]  # written as it is kept: taken over
    assert again.blocked_internet[0] == previous.allowed_internet[0]  # normalized: parsed, equal
    assert again.blocked_internet[0] is not previous.allowed_internet[0]


# --- a list of entries at a time (one match over all of them) gives what each entry alone does ---

_LIST_RAW = st.one_of(_LABELS, st.lists(_LABELS, min_size=1, max_size=5).map(".".join), _V4_TEXT,
                      st.sampled_from(["a.b\nc.d", "10.0.0.1\n10.0.0.2", "", "cafe.be", "x" * 254, "a" * 63 + ".b"]))


def _entry(raw: Any, kind: Any) -> dict:
    return {"destination": raw, "internet_destination_type": kind}


@settings(max_examples=800, deadline=None)
@given(entries=st.lists(st.tuples(_LIST_RAW, st.sampled_from(["DNS_NAME", "IP_RANGE", "x"])), max_size=12),
       canonical=st.integers(0, 40))
def test_fast_entries_decide_as_each_entry_alone(entries, canonical: int) -> None:
    from egressd.core.policy import _fast_destination, _fast_entries

    # mostly-canonical lists too (the one-match path), with the drawn entries mixed in
    items = [_entry(f"h{i}.example.com", "DNS_NAME") if i % 2 else _entry(f"10.0.{i}.{i}/32", "IP_RANGE")
             for i in range(canonical)] + [_entry(raw, kind) for raw, kind in entries] + ["not an object"]
    got = _fast_entries(items, None)
    want = [_fast_destination(item) for item in items]
    assert [(d.destination, d.type, d.span) if d else None for d in got] == \
           [(d.destination, d.type, d.span) if d else None for d in want]


def test_fast_entries_take_the_canonical_lists_whole() -> None:
    from egressd.core.policy import _all_canonical_names, _fast_entries

    assert _all_canonical_names(["pypi.org", "*.x.example", "c_d-e.f"])
    for bad in (["pypi.org", "PyPI.org"], ["pypi.org", "pypi.org\nx"], ["pypi.org", "10.0.0.1"], ["pypi.org", "cafe.be"],
                ["pypi.org", "x" * 254], ["pypi.org", ""], ["pypi.org", "*.c"], ["pypi.org", "x.*.c"]):
        assert not _all_canonical_names(bad), bad
    got = _fast_entries([_entry("10.0.0.0/8", "IP_RANGE"), _entry("10.0.0.1/8", "IP_RANGE"),
                         _entry("192.0.2.7", "IP_RANGE")], None)
    assert got[0].span == (4, 0x0A000000, 0x0AFFFFFF) and got[1] is None and got[2].destination == "192.0.2.7/32"


def test_a_previous_version_is_looked_up_only_when_it_holds_enough_of_the_list() -> None:
    from egressd.core.policy import _Known

    previous = parse_policy(_doc([{"destination": f"old{i}.example"} for i in range(3)], []))
    known = _Known(previous.allowed_internet)
    assert known.worth_it(["old0.example"] + [f"new{i}.example" for i in range(19)])  # 1 in 20
    assert not known.worth_it(["old0.example"] + [f"new{i}.example" for i in range(20)])
    assert known.worth_it(["new.example", "new2.example", "old0.example"])  # shifted a little
    assert not known.worth_it([None, "new.example"]) and not known.worth_it([])
    from egressd.core.policy import _fast_entries

    taken = _fast_entries([{"destination": "old1.example"},
                           {"destination": "old1.example", "internet_destination_type": "IP_RANGE"}], known)
    assert taken[0] is previous.allowed_internet[1]
    assert taken[1] is None  # the text, and the kind as given
    big = [{"destination": f"h{i}.example"} for i in range(3000)]
    again = parse_policy(_doc(big, []), previous=previous)
    assert again == parse_policy(_doc(big, []))
    kept = parse_policy(_doc([{"destination": "old2.example"}] + big[:10], []), previous=previous)
    assert kept.allowed_internet[0] is previous.allowed_internet[2]


def _reference_destinations(items: list, path: str):
    """Each entry parsed alone, duplicates refused: what the list-at-a-time parse must give."""
    out, seen, errors = [], {}, []
    for i, item in enumerate(items):
        try:
            d = parse_internet_destination(item, f"{path}[{i}]")
        except ValidationError as e:
            errors += [str(f) for f in e.errors]
            continue
        first = seen.setdefault((d.destination, d.type), i)
        if first != i:
            errors.append(str(FieldError(f"{path}[{i}].destination",
                                         f"{quote(d.destination)} duplicates {path.rsplit('.', 1)[-1]}[{first}]")))
            continue
        out.append(d)
    return out, errors


@settings(max_examples=600, deadline=None)
@given(entries=st.lists(st.tuples(_LIST_RAW, st.sampled_from(["DNS_NAME", "IP_RANGE", "x"])), max_size=10),
       canonical=st.integers(0, 30), dup=st.booleans())
def test_a_list_parses_as_its_entries_would_alone(entries, canonical: int, dup: bool) -> None:
    items = [_entry(f"h{i}.example.com", "DNS_NAME") if i % 2 else _entry(f"10.0.{i}.{i}/32", "IP_RANGE")
             for i in range(canonical)] + [_entry(raw, kind) for raw, kind in entries]
    if dup and items:
        items.append(dict(items[0]))
    path = "egress.network_access.allowed_internet_destinations"
    want, errors = _reference_destinations(items, path)
    got = _outcome(_doc(items, []))
    if errors:
        assert got == errors
    else:
        assert [(d.destination, d.type, d.span) for d in got.allowed_internet] == [(d.destination, d.type, d.span) for d in want]
