"""The plan and the rendered ruleset, checked as text (the kernel check is in tests/priv)."""

from __future__ import annotations

import ipaddress

import pytest

from egressd.core.ipcache import GRACE, Entry
from egressd.core.plan import build_plan
from egressd.core.policy import default_policy, parse_policy
from egressd.core.ruleset import (
    RenderOptions,
    program_elements,
    render_table,
    replace_table,
    same_skeleton,
    set_grace,
    table_delta,
    withdraw_elements,
)
from egressd.core.workloads import Workload
from egressd.errors import ValidationError
from egressd.lab import world


def wl(wid, ws, product, *sources):
    return Workload(wid, ws, product, tuple(ipaddress.ip_network(s) for s in sources))


@pytest.fixture
def policies():
    return {
        "restricted-etl": parse_policy(world.policy("restricted-etl")),
        "dry": parse_policy(world.policy("dry", dry_run=True, products=["DBSQL"])),
        "default-policy": default_policy(),
    }


def test_workloads_dispatch_by_source_to_their_workspace_chain(policies):
    plan = build_plan(
        policies,
        {"1": "restricted-etl", "2": "dry"},
        [
            wl("a", "1", "GENERAL_COMPUTE", "10.77.1.2/32", "2001:db8:77:1::2/128"),
            wl("b", "2", "DBSQL", "10.77.2.2/32"),  # in the dry-run filter
            wl("c", "2", "APPS", "10.77.4.2/32"),  # not in it: enforced
            wl("d", "3", "APPS", "10.77.3.0/24"),  # unbound: default-policy, full access
        ],
    )
    text = render_table(plan, {}, 0.0, RenderOptions(7, 10053, "reject"))
    assert "10.77.1.2/32 : goto ws_1_enf" in text
    assert "2001:db8:77:1::2/128 : goto ws_1_enf" in text
    assert "10.77.2.2/32 : goto ws_2_dry" in text
    assert "10.77.4.2/32 : goto ws_2_enf" in text
    assert "10.77.3.0/24 : accept" in text
    assert "ws_3_" not in text  # full access needs no sets or chains
    assert 'comment "egressd generation=7"' in text
    assert "redirect to :10053" in text
    assert "reject with tcp reset" in text and "icmpx admin-prohibited" in text


def test_ip_ranges_and_blocked_ranges_go_to_interval_sets(policies):
    doc = world.policy("p")
    doc["egress"]["network_access"]["blocked_internet_destinations"].append(
        {"destination": "203.0.113.128/26", "internet_destination_type": "IP_RANGE"}
    )
    pols = dict(policies, p=parse_policy(doc))
    plan = build_plan(pols, {"1": "p"}, [wl("a", "1", "APPS", "10.77.1.2/32")])
    text = render_table(plan, {}, 0.0, RenderOptions(1, 10053, "drop"))
    assert "elements = { 203.0.113.128/25 }" in text
    assert "elements = { 203.0.113.128/26 }" in text
    assert "counter drop" in text and "reject with" not in text.split("chain deny")[1].split("}")[0]


def test_live_entries_are_carried_with_remaining_time(policies):
    plan = build_plan(policies, {"1": "restricted-etl"}, [wl("a", "1", "APPS", "10.77.1.2/32")])
    dyn = {"1": [Entry("198.51.100.10", 130.0, "pypi.org"), Entry("2001:db8:ff::10", 100.5, "pypi.org"), Entry("192.0.2.9", 99.0, "old")]}
    text = render_table(plan, dyn, 100.0, RenderOptions(1, 10053, "reject"))
    # The kernel holds each GRACE seconds past the cache's expiry (the daemon deletes it then).
    assert GRACE == 5
    assert '198.51.100.10 timeout 36s expires 35000ms comment "pypi.org"' in text
    assert "2001:db8:ff::10 timeout 6s expires 5500ms" in text
    assert "192.0.2.9" not in text  # already expired in the cache
    # Each answer set states the grace, for a restart to read back.
    assert text.count('comment "egressd grace=5s"') == 2
    assert set_grace("egressd grace=5s") == 5 and set_grace("egressd generation=3") == 0
    assert set_grace("egressd grace=xs") == 0 and set_grace("") == 0


def test_withdraw_elements_adds_then_deletes_each_ip_once():
    text = withdraw_elements({"ws_1_dyn4": ["192.0.2.1", "192.0.2.2", "192.0.2.1"], "ws_1_dyn6": []})
    assert text.splitlines() == [
        "add element inet egressd ws_1_dyn4 { 192.0.2.1, 192.0.2.2 }",
        "delete element inet egressd ws_1_dyn4 { 192.0.2.1, 192.0.2.2 }",
    ]


def test_replace_is_one_transaction_that_works_with_or_without_a_table():
    tx = replace_table("table inet egressd {\n}")
    assert tx.splitlines()[:2] == ["table inet egressd", "delete table inet egressd"]


def test_program_elements_resets_timeouts_and_sanitises_comments(policies):
    plan = build_plan(policies, {"1": "restricted-etl"}, [wl("a", "1", "APPS", "10.77.1.2/32")])
    text = program_elements(plan.workspaces["1"], [("192.0.2.1", 31), ("2001:db8::1", 61)], 'x"; flush ruleset')
    lines = text.splitlines()
    assert lines[0] == 'add element inet egressd ws_1_dyn4 { 192.0.2.1 timeout 31s comment "xflushruleset" }'
    assert lines[1] == "delete element inet egressd ws_1_dyn4 { 192.0.2.1 }"
    assert lines[3].startswith("add element inet egressd ws_1_dyn6 { 2001:db8::1 timeout 61s")


def test_plan_refuses_unknown_policy_and_overlapping_sources(policies):
    with pytest.raises(ValidationError, match="does not exist"):
        build_plan(policies, {"1": "nope"}, [])
    with pytest.raises(ValidationError, match="overlap"):
        build_plan(policies, {}, [wl("a", "1", "APPS", "10.77.1.0/24"), wl("b", "2", "APPS", "10.77.1.2/32")])


def test_antispoof_chain_drops_registered_sources_on_the_wrong_interface_before_conntrack(policies):
    plan = build_plan(policies, {"1": "restricted-etl"}, [wl("a", "1", "APPS", "10.77.1.2/32", "2001:db8:77:1::2/128")])
    text = render_table(plan, {}, 0.0, RenderOptions(1, 10053, "reject"))
    chain = text.split("chain antispoof {")[1].split("}")[0]
    # prerouting at raw (-300): after nf_defrag (-400), before conntrack (-200) and the DNS redirect (dstnat)
    assert "type filter hook prerouting priority raw; policy accept;" in chain
    assert "ip saddr @workload_src_v4 fib saddr . iif oif missing counter name antispoof_drops drop" in chain
    assert "ip6 saddr @workload_src_v6 fib saddr . iif oif missing counter name antispoof_drops drop" in chain
    assert "counter antispoof_drops {" in text
    # only registered sources are checked: the rules match nothing else
    assert all("saddr @workload_src_v" in line for line in chain.splitlines() if " drop" in line)


def test_kernel_dns_budget_sits_in_front_of_the_shim_only_when_the_limit_is_on(policies):
    from egressd.engine import kernel_dns_budget

    assert kernel_dns_budget(500, 1000) == (2000, 2000)
    assert kernel_dns_budget(0, 1000) == (0, 0)
    plan = build_plan(policies, {"1": "restricted-etl"}, [wl("a", "1", "APPS", "10.77.1.2/32")])
    on = render_table(plan, {}, 0.0, RenderOptions(1, 10053, "reject", dns_flood_rate=2000, dns_flood_burst=3000))
    guard = on.split("chain shim_guard {")[1].split("\n\t}")[0].splitlines()
    rules = [ln.strip() for ln in guard if ln.strip() and not ln.strip().startswith("type ")]
    # lo first, then the per-source budget, then the redirected queries that remain, then the rest dropped
    assert rules[0].endswith('iif "lo" accept')
    assert rules[1] == ("udp dport 10053 ct status dnat update @dns_rate_v4 { ip saddr limit rate over "
                        "2000/second burst 3000 packets } counter name dns_flood_drops drop")
    assert rules[2].startswith("udp dport 10053 ct status dnat update @dns_rate_v6 { ip6 saddr limit rate over 2000/second")
    assert rules[3].endswith("ct status dnat accept") and rules[4].endswith("counter drop")
    off = render_table(plan, {}, 0.0, RenderOptions(1, 10053, "reject"))
    assert "update @dns_rate_v4" not in off and "counter dns_flood_drops {" in off  # the counter always exists


def _compiler():
    """A compile function that keeps one compiled object per policy, as the engine's does."""
    from egressd.core.verdict import CompiledPolicy

    seen: dict = {}

    def compile(policy, **extras):
        return seen.setdefault((id(policy), tuple(sorted(extras.items()))), CompiledPolicy(policy, **extras))
    return compile


def test_same_skeleton_needs_the_same_restricted_workspaces(policies):
    c = _compiler()
    bind = {"1": "restricted-etl", "2": "dry"}
    a = build_plan(policies, bind, [wl("a", "1", "APPS", "10.77.1.2/32")], compile=c)
    b = build_plan(policies, bind, [wl("b", "2", "APPS", "10.77.2.2/32"), wl("c", "3", "APPS", "10.77.3.2/32")], compile=c)
    assert same_skeleton(a, b)  # workspace 3 is unrestricted (default-policy): no objects of its own
    assert same_skeleton(a, build_plan(policies, bind, [], compile=_compiler()))  # other compiled objects: elements
    assert same_skeleton(a, build_plan(policies, {"1": "dry", "2": "restricted-etl"}, [], compile=c))  # swapped: elements
    assert not same_skeleton(a, build_plan(policies, {"1": "restricted-etl"}, [], compile=c))
    assert not same_skeleton(a, build_plan(policies, {"1": "restricted-etl", "2": "dry", "4": "dry"}, [], compile=c))


def test_workload_delta_deletes_then_adds_only_what_differs(policies):
    c = _compiler()
    bind = {"1": "restricted-etl", "2": "dry"}
    keep = wl("keep", "1", "APPS", "10.77.1.2/32", "2001:db8:77:1::2/128")
    old = build_plan(policies, bind, [keep, wl("gone", "1", "APPS", "10.77.1.3/32"),
                                      wl("moves", "1", "APPS", "10.77.1.4/32"), wl("net", "2", "APPS", "10.78.0.0/24")], compile=c)
    new = build_plan(policies, bind, [keep, wl("moves", "2", "APPS", "10.77.1.4/32"),
                                      wl("half", "3", "APPS", "10.78.0.0/25"), wl("six", "2", "APPS", "2001:db8:77:2::/64")],
                     compile=c)
    assert same_skeleton(old, new)
    lines = table_delta(old, new, 9).splitlines()
    assert lines == [
        "delete set inet egressd generation",
        'add set inet egressd generation { type inet_service; comment "egressd generation=9"; }',
        "delete element inet egressd workload_verdict_v4 { 10.77.1.3/32, 10.78.0.0/24, 10.77.1.4/32 }",
        "delete element inet egressd workload_src_v4 { 10.77.1.3/32, 10.78.0.0/24 }",
        "add element inet egressd workload_verdict_v4 { 10.77.1.4/32 : goto ws_2_enf, 10.78.0.0/25 : accept }",
        "add element inet egressd workload_src_v4 { 10.78.0.0/25 }",
        "add element inet egressd workload_verdict_v6 { 2001:db8:77:2::/64 : goto ws_2_enf }",
        "add element inet egressd workload_src_v6 { 2001:db8:77:2::/64 }",
    ]
    # The kept workload is not rendered; nothing at all changes: only the generation.
    assert "10.77.1.2" not in "\n".join(lines)
    assert table_delta(new, new, 10).splitlines()[2:] == []


def _ranges_policy(allowed: list[str], blocked: list[str] = (), dry_run: bool = False) -> dict:
    access = {
        "restriction_mode": "RESTRICTED_ACCESS",
        "allowed_internet_destinations": [{"destination": "pypi.org", "internet_destination_type": "DNS_NAME"}]
        + [{"destination": d, "internet_destination_type": "IP_RANGE"} for d in allowed],
        "blocked_internet_destinations": [{"destination": d, "internet_destination_type": "IP_RANGE"} for d in blocked],
    }
    if dry_run:
        access["policy_enforcement"] = {"enforcement_mode": "DRY_RUN"}
    return {"network_policy_id": "p", "egress": {"network_access": access}}


def test_table_delta_of_a_policy_edit_diffs_its_sets_verdicts_and_withdrawn_ips(policies):
    old_p = parse_policy(_ranges_policy(["198.51.100.0/26", "198.51.100.192/26", "2001:db8:1::/48"], ["198.51.100.99/32"]))
    new_p = parse_policy(_ranges_policy(["198.51.100.0/26", "203.0.113.0/24", "2001:db8:1::/48"], dry_run=True))
    workloads = [wl("a", "1", "APPS", "10.77.1.2/32"), wl("b", "2", "APPS", "10.77.2.2/32")]
    c = _compiler()
    old = build_plan({**policies, "p": old_p}, {"1": "p", "2": "restricted-etl"}, workloads, compile=c)
    new = build_plan({**policies, "p": new_p}, {"1": "p", "2": "restricted-etl"}, workloads, compile=c)
    assert same_skeleton(old, new)
    lines = table_delta(old, new, 4, {"1": ["198.51.100.200", "2001:db8:9::1", "192.0.2.7"]}).splitlines()
    assert lines[2:] == [
        # the range that went, then the one that came; the unchanged /26 and IPv6 /48 untouched
        "delete element inet egressd ws_1_net4 { 198.51.100.192/26 }",
        "add element inet egressd ws_1_net4 { 203.0.113.0/24 }",
        # the only blocked range went: more changes than the set keeps, so a flush
        "flush set inet egressd ws_1_blk4",
        "add element inet egressd ws_1_dyn4 { 192.0.2.7, 198.51.100.200 }",
        "delete element inet egressd ws_1_dyn4 { 192.0.2.7, 198.51.100.200 }",
        "add element inet egressd ws_1_dyn6 { 2001:db8:9::1 }",
        "delete element inet egressd ws_1_dyn6 { 2001:db8:9::1 }",
        # the policy went to dry run: workspace 1's workload takes the log-only chain;
        # workspace 2's policy is the same object, its workload is not rendered
        "delete element inet egressd workload_verdict_v4 { 10.77.1.2/32 }",
        "add element inet egressd workload_verdict_v4 { 10.77.1.2/32 : goto ws_1_dry }",
    ]


def test_table_delta_refills_a_set_whose_elements_all_change(policies):
    c = _compiler()
    old = build_plan({**policies, "p": parse_policy(_ranges_policy(["198.51.100.0/24"]))}, {"1": "p"}, [], compile=c)
    new = build_plan({**policies, "p": parse_policy(_ranges_policy(["203.0.113.0/24", "192.0.2.0/24"]))}, {"1": "p"}, [],
                     compile=c)
    assert table_delta(old, new, 2).splitlines()[2:] == [
        "flush set inet egressd ws_1_net4",
        "add element inet egressd ws_1_net4 { 192.0.2.0/24, 203.0.113.0/24 }",
    ]
    # More range elements to add or delete than allowed: no delta (a new table takes less time).
    assert table_delta(old, new, 2, max_changes=2) is not None
    assert table_delta(old, new, 2, max_changes=1) is None
    # Withdrawn IPs count twice (an add and a delete each).
    assert table_delta(old, new, 2, {"1": ["192.0.2.7"]}, max_changes=4) is not None
    assert table_delta(old, new, 2, {"1": ["192.0.2.7"]}, max_changes=3) is None


def test_single_addresses_go_to_a_hash_set_and_ranges_to_an_interval_set(policies):
    pol = parse_policy(_ranges_policy(["198.51.100.7/32", "198.51.100.64/26", "2001:db8::1/128", "203.0.113.9/32",
                                       "203.0.113.10/32"]))
    plan = build_plan({**policies, "p": pol}, {"1": "p"}, [wl("a", "1", "APPS", "10.77.1.2/32")])
    text = render_table(plan, {}, 0.0, RenderOptions(1, 5353, "reject"))
    block = text[text.index("set ws_1_net4 {"):text.index("counter ws_1_suppressed")]
    # adjacent /32s merge into a range; a lone address is a plain hash-set element
    assert "set ws_1_net4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 198.51.100.64/26, 203.0.113.9-203.0.113.10 }" in block
    assert "set ws_1_host4 {\n\t\ttype ipv4_addr\n\t\telements = { 198.51.100.7 }" in block
    assert "set ws_1_host6 {\n\t\ttype ipv6_addr\n\t\telements = { 2001:db8::1 }" in block
    assert text.count("ip daddr @ws_1_host4 accept") == 2 and text.count("ip6 daddr @ws_1_host6 accept") == 2


def test_a_sampled_diff_gives_up_only_on_a_set_mostly_replaced() -> None:
    from egressd.core.ruleset import _set_delta, _surely_over

    was = [(2 * i, 2 * i) for i in range(10_000)]
    odd = [(2 * i + 1, 2 * i + 1) for i in range(10_000)]
    assert _surely_over(was, odd, budget=5_000)
    assert _set_delta("s", lambda rs, v: [str(a) for a, _ in rs], 4, was, odd, budget=5_000) is None
    tenth = [r if i % 10 else (r[0] + 1, r[1] + 1) for i, r in enumerate(was)]
    assert not _surely_over(was, tenth, budget=5_000)  # 1,000 of 10,000 changed: worked out
    lines, n = _set_delta("s", lambda rs, v: [str(a) for a, _ in rs], 4, was, tenth, budget=5_000)
    assert n == 2_000 and lines[0].startswith("delete element")
    assert not _surely_over(was, odd, budget=10_000)  # within the budget: worked out exactly
    assert not _surely_over([], odd[:100], budget=10)  # too small to sample
    assert _surely_over([], odd, budget=5_000)  # a new set of 10,000: over
