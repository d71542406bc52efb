"""Verdicts for names and IPs under every mode."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from egressd.core.policy import PRODUCTS, DestinationType, EnforcementMode, InternetDestination, Policy, RestrictionMode, parse_policy
from egressd.core.verdict import IP_NO_MATCH_REASON, NO_MATCH_REASON, CompiledPolicy, Decision, Verdict

POLICY = parse_policy(
    {
        "network_policy_id": "restricted-etl",
        "egress": {
            "network_access": {
                "restriction_mode": "RESTRICTED_ACCESS",
                "allowed_internet_destinations": [
                    {"destination": "pypi.org"},
                    {"destination": "*.githubusercontent.com"},
                    {"destination": "198.51.100.0/24", "internet_destination_type": "IP_RANGE"},
                    {"destination": "bücher.example"},
                    {"destination": "2001:db8::/32", "internet_destination_type": "IP_RANGE"},
                    {"destination": "*.corp.example"},
                ],
                "blocked_internet_destinations": [
                    {"destination": "evil.example"},
                    {"destination": "gist.githubusercontent.com"},
                    {"destination": "198.51.100.128/25", "internet_destination_type": "IP_RANGE"},
                    {"destination": "*.secret.corp.example"},
                    {"destination": "2001:db8:bad::/48", "internet_destination_type": "IP_RANGE"},
                ],
                "allowed_storage_destinations": [
                    {"storage_destination_type": "AZURE_STORAGE", "azure_storage_account": "lake1", "azure_storage_service": "dfs"},
                    {"storage_destination_type": "AWS_S3", "bucket_name": "my-bucket", "region": "us-west-2"},
                    {"storage_destination_type": "GOOGLE_CLOUD_STORAGE", "bucket_name": "my-gcs-bucket"},
                ],
            }
        },
    }
)
EXTRA_NAMES = [("db.example.net", "connection pg1 (db.example.net)"), ("*.snowflakecomputing.com", "connection sf")]
EXTRA_NETS = [("203.0.113.5/32", "connection mysql1 (203.0.113.5)")]
COMPILED = CompiledPolicy(POLICY, EXTRA_NAMES, EXTRA_NETS)

A_ = "allowed_internet_destinations"
B_ = "blocked_internet_destinations"
S_ = "allowed_storage_destinations"


@pytest.mark.parametrize(
    ("name", "verdict", "matched", "dtype"),
    [
        ("pypi.org", Verdict.ALLOW, f"{A_}[0] (pypi.org)", "DNS"),
        ("PyPI.ORG.", Verdict.ALLOW, f"{A_}[0] (pypi.org)", "DNS"),
        ("  pypi.org ", Verdict.ALLOW, f"{A_}[0] (pypi.org)", "DNS"),
        ("files.pypi.org", Verdict.DROP, None, "DNS"),
        ("raw.githubusercontent.com", Verdict.ALLOW, f"{A_}[1] (*.githubusercontent.com)", "DNS"),
        ("a.b.githubusercontent.com", Verdict.ALLOW, f"{A_}[1] (*.githubusercontent.com)", "DNS"),
        ("a.b.c.githubusercontent.com", Verdict.ALLOW, f"{A_}[1] (*.githubusercontent.com)", "DNS"),
        ("githubusercontent.com", Verdict.DROP, None, "DNS"),
        ("gist.githubusercontent.com", Verdict.DROP, f"{B_}[1] (gist.githubusercontent.com)", "DNS"),
        ("GIST.githubusercontent.com.", Verdict.DROP, f"{B_}[1] (gist.githubusercontent.com)", "DNS"),
        ("x.gist.githubusercontent.com", Verdict.ALLOW, f"{A_}[1] (*.githubusercontent.com)", "DNS"),
        ("bücher.example", Verdict.ALLOW, f"{A_}[3] (xn--bcher-kva.example)", "DNS"),
        ("XN--BCHER-KVA.example.", Verdict.ALLOW, f"{A_}[3] (xn--bcher-kva.example)", "DNS"),
        ("a.corp.example", Verdict.ALLOW, f"{A_}[5] (*.corp.example)", "DNS"),
        ("secret.corp.example", Verdict.ALLOW, f"{A_}[5] (*.corp.example)", "DNS"),
        ("x.secret.corp.example", Verdict.DROP, f"{B_}[3] (*.secret.corp.example)", "DNS"),
        ("evil.example", Verdict.DROP, f"{B_}[0] (evil.example)", "DNS"),
        ("lake1.dfs.core.windows.net", Verdict.ALLOW, f"{S_}[0] (AZURE_STORAGE lake1/dfs)", "STORAGE"),
        ("lake1.blob.core.windows.net", Verdict.DROP, None, "STORAGE"),
        ("other.dfs.core.windows.net", Verdict.DROP, None, "STORAGE"),
        ("my-bucket.s3.amazonaws.com", Verdict.ALLOW, f"{S_}[1] (AWS_S3 my-bucket/us-west-2)", "STORAGE"),
        ("my-bucket.s3.us-west-2.amazonaws.com", Verdict.ALLOW, f"{S_}[1] (AWS_S3 my-bucket/us-west-2)", "STORAGE"),
        ("my-bucket.s3.dualstack.us-west-2.amazonaws.com", Verdict.ALLOW, f"{S_}[1] (AWS_S3 my-bucket/us-west-2)", "STORAGE"),
        ("my-bucket.s3.eu-west-1.amazonaws.com", Verdict.DROP, None, "STORAGE"),
        ("other.s3.amazonaws.com", Verdict.DROP, None, "STORAGE"),
        ("storage.googleapis.com", Verdict.ALLOW, f"{S_}[2] (GOOGLE_CLOUD_STORAGE my-gcs-bucket)", "STORAGE"),
        ("my-gcs-bucket.storage.googleapis.com", Verdict.ALLOW, f"{S_}[2] (GOOGLE_CLOUD_STORAGE my-gcs-bucket)", "STORAGE"),
        ("db.example.net", Verdict.ALLOW, "connection pg1 (db.example.net)", "DNS"),
        ("acct.snowflakecomputing.com", Verdict.ALLOW, "connection sf", "DNS"),
        ("example.com", Verdict.DROP, None, "DNS"),
    ],
)
def test_decide_name(name: str, verdict: Verdict, matched: str | None, dtype: str) -> None:
    d = COMPILED.decide_name(name, "GENERAL_COMPUTE")
    assert (d.verdict, d.matched, d.destination_type, d.network_policy_id) == (verdict, matched, dtype, "restricted-etl")
    if verdict is Verdict.ALLOW:
        assert d.reason == f"allowed by {matched}"
    elif matched:
        assert d.reason == f"blocked by {matched}"
    else:
        assert d.reason == NO_MATCH_REASON


@pytest.mark.parametrize("name", ["", "bad..name", "a" * 64 + ".com", "exa mple.com", "☃.example", "*.example.com"])
def test_invalid_name_is_denied(name: str) -> None:
    d = COMPILED.decide_name(name, "DBSQL")
    assert (d.verdict, d.reason, d.matched, d.destination_type) == (Verdict.DROP, "invalid name", None, "DNS")


@pytest.mark.parametrize(
    ("ip", "verdict", "matched"),
    [
        ("198.51.100.7", Verdict.ALLOW, f"{A_}[2] (198.51.100.0/24)"),
        ("198.51.100.127", Verdict.ALLOW, f"{A_}[2] (198.51.100.0/24)"),
        ("198.51.100.128", Verdict.DROP, f"{B_}[2] (198.51.100.128/25)"),
        ("::ffff:198.51.100.7", Verdict.ALLOW, f"{A_}[2] (198.51.100.0/24)"),
        ("2001:db8::1", Verdict.ALLOW, f"{A_}[4] (2001:db8::/32)"),
        ("2001:db8:bad::1", Verdict.DROP, f"{B_}[4] (2001:db8:bad::/48)"),
        ("203.0.113.5", Verdict.ALLOW, "connection mysql1 (203.0.113.5)"),
        ("203.0.113.6", Verdict.DROP, None),
        ("1.1.1.1", Verdict.DROP, None),
        ("2606:4700::1111", Verdict.DROP, None),
        (ipaddress.ip_address("198.51.100.1"), Verdict.ALLOW, f"{A_}[2] (198.51.100.0/24)"),
    ],
)
def test_decide_ip(ip: Any, verdict: Verdict, matched: str | None) -> None:
    d = COMPILED.decide_ip(ip, "APPS")
    assert (d.verdict, d.matched, d.destination_type) == (verdict, matched, "IP")
    if verdict is Verdict.DROP and matched is None:
        assert d.reason == IP_NO_MATCH_REASON


@pytest.mark.parametrize("ip", ["", "pypi.org", "256.0.0.1", "10.0.0.0/8"])
def test_decide_ip_invalid(ip: str) -> None:
    with pytest.raises(ValueError):
        COMPILED.decide_ip(ip, "APPS")


def test_network_lists_are_collapsed_per_family() -> None:
    n = ipaddress.ip_network
    assert COMPILED.allowed_networks_v4 == [n("198.51.100.0/24"), n("203.0.113.5/32")]
    assert COMPILED.allowed_networks_v6 == [n("2001:db8::/32")]
    assert COMPILED.blocked_networks_v4 == [n("198.51.100.128/25")]
    assert COMPILED.blocked_networks_v6 == [n("2001:db8:bad::/48")]
    assert COMPILED.policy is POLICY


def test_overlapping_ranges_collapse() -> None:
    p = Policy(
        "p",
        RestrictionMode.RESTRICTED_ACCESS,
        allowed_internet=tuple(
            InternetDestination(c, DestinationType.IP_RANGE) for c in ("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8")
        ),
    )
    assert CompiledPolicy(p).allowed_networks_v4 == [ipaddress.ip_network("10.0.0.0/7")]


def _with_mode(restriction: str, mode: str, products: list[str]) -> CompiledPolicy:
    obj = POLICY.to_dict()
    access = obj["egress"]["network_access"]
    access["restriction_mode"] = restriction
    access["policy_enforcement"] = {"enforcement_mode": mode, "dry_run_mode_product_filter": products}
    return CompiledPolicy(parse_policy(obj))


@pytest.mark.parametrize(
    ("mode", "products", "product", "verdict"),
    [
        ("ENFORCED", [], "DBSQL", Verdict.DROP),
        ("ENFORCED", ["DBSQL"], "DBSQL", Verdict.DROP),
        ("DRY_RUN", [], "DBSQL", Verdict.LOG_ONLY_DENIAL),
        ("DRY_RUN", [], "GENERAL_COMPUTE", Verdict.LOG_ONLY_DENIAL),
        ("DRY_RUN", ["DBSQL"], "DBSQL", Verdict.LOG_ONLY_DENIAL),
        ("DRY_RUN", ["DBSQL"], "GENERAL_COMPUTE", Verdict.DROP),
        ("DRY_RUN", ["DBSQL", "ML_SERVING"], "ML_SERVING", Verdict.LOG_ONLY_DENIAL),
        ("DRY_RUN", ["DBSQL", "ML_SERVING"], "APPS", Verdict.DROP),
    ],
)
def test_enforcement_modes(mode: str, products: list[str], product: str, verdict: Verdict) -> None:
    compiled = _with_mode("RESTRICTED_ACCESS", mode, products)
    assert compiled.decide_name("example.com", product).verdict is verdict  # not allowed
    assert compiled.decide_name("evil.example", product).verdict is verdict  # blocked
    assert compiled.decide_name("bad..name", product).verdict is verdict  # invalid
    assert compiled.decide_ip("1.1.1.1", product).verdict is verdict
    assert compiled.decide_name("pypi.org", product).verdict is Verdict.ALLOW
    assert compiled.decide_ip("198.51.100.1", product).verdict is Verdict.ALLOW


@pytest.mark.parametrize("mode", ["ENFORCED", "DRY_RUN"])
def test_full_access_allows_everything(mode: str) -> None:
    compiled = _with_mode("FULL_ACCESS", mode, [])
    for name in ("example.com", "evil.example", "bad..name", "lake1.blob.core.windows.net"):
        d = compiled.decide_name(name, "DBSQL")
        assert (d.verdict, d.reason, d.matched) == (Verdict.ALLOW, "FULL_ACCESS", None)
    assert compiled.decide_ip("198.51.100.200", "DBSQL") == Decision(Verdict.ALLOW, "restricted-etl", "FULL_ACCESS", None, "IP")
    assert compiled.allowed_networks_v4 == compiled.blocked_networks_v4 == []


def test_decision_passes() -> None:
    assert COMPILED.decide_name("pypi.org", "APPS").passes
    assert not COMPILED.decide_name("example.com", "APPS").passes
    assert _with_mode("RESTRICTED_ACCESS", "DRY_RUN", []).decide_name("example.com", "APPS").passes


def test_bad_extra_inputs_raise() -> None:
    with pytest.raises(ValueError):
        CompiledPolicy(POLICY, extra_names=[("*.*.com", "x")])
    with pytest.raises(ValueError):
        CompiledPolicy(POLICY, extra_networks=[("10.0.0.1/8", "x")])


# -- properties ---------------------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)
SUFFIX = st.lists(LABEL, min_size=2, max_size=3).map(".".join)
PRODUCT = st.sampled_from(PRODUCTS)


def _restricted(allowed: list[str], blocked: list[str], mode: EnforcementMode = EnforcementMode.ENFORCED,
                products: frozenset[str] = frozenset()) -> CompiledPolicy:
    return CompiledPolicy(
        Policy(
            "p",
            RestrictionMode.RESTRICTED_ACCESS,
            allowed_internet=tuple(InternetDestination(a) for a in allowed),
            blocked_internet=tuple(InternetDestination(b) for b in blocked),
            enforcement_mode=mode,
            dry_run_products=products,
        )
    )


def _patterns_matching(name: str) -> st.SearchStrategy[str]:
    """The name itself and every wildcard (of at least two labels) that matches it."""
    labels = name.split(".")
    wild = ["*." + ".".join(labels[i:]) for i in range(1, len(labels) - 1)]
    return st.sampled_from([name, *wild])


@given(NAME, st.lists(st.one_of(NAME, SUFFIX.map(lambda s: "*." + s)), max_size=4), st.data())
def test_case_and_trailing_dot_invariance(name: str, allowed: list[str], data: st.DataObject) -> None:
    compiled = _restricted(allowed + [name] * data.draw(st.booleans()), [])
    variant = "".join(c.upper() if data.draw(st.booleans()) else c for c in name) + data.draw(st.sampled_from(["", "."]))
    assert compiled.decide_name(variant, "APPS") == compiled.decide_name(name, "APPS")


@given(SUFFIX, st.lists(LABEL, min_size=1, max_size=4))
def test_wildcard_never_matches_apex_and_matches_every_subdomain(suffix: str, prefix: list[str]) -> None:
    compiled = _restricted([f"*.{suffix}"], [])
    assert compiled.decide_name(suffix, "APPS").verdict is Verdict.DROP
    assert compiled.decide_name(".".join(prefix) + "." + suffix, "APPS").verdict is Verdict.ALLOW


@given(NAME, st.data(), st.sampled_from(EnforcementMode), PRODUCT)
def test_blocked_always_wins(name: str, data: st.DataObject, mode: EnforcementMode, product: str) -> None:
    allowed = data.draw(_patterns_matching(name))
    blocked = data.draw(_patterns_matching(name))
    d = _restricted([allowed], [blocked], mode).decide_name(name, product)
    assert d.verdict is not Verdict.ALLOW
    assert d.reason.startswith("blocked by blocked_internet_destinations[0]")


@given(st.text(max_size=40), st.ip_addresses(), PRODUCT, st.sampled_from(EnforcementMode))
def test_full_access_always_allows(name: str, ip: Any, product: str, mode: EnforcementMode) -> None:
    compiled = CompiledPolicy(
        Policy("p", RestrictionMode.FULL_ACCESS, blocked_internet=(InternetDestination("0.0.0.0/0", DestinationType.IP_RANGE),), enforcement_mode=mode)
    )
    assert compiled.decide_name(name, product).verdict is Verdict.ALLOW
    assert compiled.decide_ip(ip, product).verdict is Verdict.ALLOW


@given(st.frozensets(PRODUCT), PRODUCT, st.text(max_size=40), st.ip_addresses(), st.lists(NAME, max_size=3), st.lists(NAME, max_size=3))
def test_dry_run_product_never_dropped(
    products: frozenset[str], product: str, name: str, ip: Any, allowed: list[str], blocked: list[str]
) -> None:
    assume(not products or product in products)
    compiled = _restricted(allowed, blocked, EnforcementMode.DRY_RUN, products)
    assert compiled.decide_name(name, product).verdict is not Verdict.DROP
    assert compiled.decide_ip(ip, product).verdict is not Verdict.DROP
    for n in allowed + blocked:
        assert compiled.decide_name(n, product).verdict is not Verdict.DROP
