from hypothesis import given
from hypothesis import strategies as st

from egressd.core.ipcache import GRACE, MARGIN, MAX_TTL, IpCache


def listed(c: IpCache, workspace: str) -> int:
    """How many IPs (with repeats) a workspace lists as due some time."""
    due = c._due.get(workspace)
    return sum(map(len, due.seconds.values())) if due is not None else 0


def test_first_answer_programs_with_max_of_ttl_and_min_ttl():
    c = IpCache()
    assert c.record("ws", "a.example", [("192.0.2.1", 5)], min_ttl=30, now=100.0) == [("192.0.2.1", 30 + MARGIN + GRACE)]
    assert c.record("ws", "b.example", [("192.0.2.2", 300)], min_ttl=30, now=100.0) == [("192.0.2.2", 300 + MARGIN + GRACE)]


def test_refresh_only_when_the_answer_outlives_the_kernel_entry():
    c = IpCache()
    c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=0.0)
    # half a second later the kernel entry (61 s) still covers a 60 s answer
    assert c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=0.5) == []
    # two seconds later it does not: refresh
    assert c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=2.0) == [("192.0.2.1", 60 + MARGIN + GRACE)]


def test_ttl_is_clamped():
    c = IpCache()
    assert c.record("ws", "a", [("192.0.2.1", 10**9)], min_ttl=0, now=0.0) == [("192.0.2.1", MAX_TTL + MARGIN + GRACE)]
    assert c.record("ws", "b", [("192.0.2.2", 0)], min_ttl=0, now=0.0) == [("192.0.2.2", 1 + MARGIN + GRACE)]


def test_workspaces_are_separate():
    c = IpCache()
    c.record("ws1", "a", [("192.0.2.1", 60)], 30, 0.0)
    assert c.record("ws2", "a", [("192.0.2.1", 60)], 30, 0.0) == [("192.0.2.1", 61 + GRACE)]
    assert c.size("ws1") == c.size("ws2") == 1 and c.size() == 2


def test_retain_withdraws_ips_of_names_no_longer_allowed():
    c = IpCache()
    c.record("ws", "keep.example", [("192.0.2.1", 60)], 30, 0.0)
    c.record("ws", "drop.example", [("192.0.2.1", 60), ("192.0.2.2", 60)], 30, 0.0)
    assert c.retain("ws", lambda n: n == "keep.example") == 1
    assert {e.ip for e in c.entries("ws", 1.0)} == {"192.0.2.1"}


def test_expire_and_entries():
    c = IpCache()
    c.record("ws", "a", [("192.0.2.1", 10)], 0, 0.0)
    c.record("ws", "b", [("192.0.2.2", 100)], 0, 0.0)
    assert [e.ip for e in c.entries("ws", 50.0)] == ["192.0.2.2"]
    assert c.expire(50.0) == 1 and c.size() == 1


def test_expire_steps_lets_changes_in_between_count():
    """The event loop serves between steps: an IP refreshed meanwhile stays, one forgotten
    meanwhile is skipped, and the counts add up to what is gone."""
    c = IpCache()
    for i in range(10):
        c.record("ws", f"n{i}", [(f"192.0.2.{i}", 10)], 0, 0.0)
    steps = c.expire_steps(50.0, chunk=3)
    assert next(steps) == 3  # 192.0.2.0-2 gone
    c.record("ws", "n5", [("192.0.2.5", 100)], 0, 40.0)  # refreshed before its step
    c.forget("ws", ["192.0.2.6"])  # forgotten before its step
    rest = list(steps)
    assert rest[-1] == 8 and rest == sorted(rest)  # 10 minus the refreshed and the forgotten one
    assert [e.ip for e in c.entries("ws", 50.0)] == ["192.0.2.5"] and c.size() == 1


def test_a_round_reads_only_the_ips_that_are_due():
    """Steps count the IPs read: with 10,000 IPs cached and none due, a round reads none (the
    only yield is the final one); with 100 due, it reads those 100 and drops them."""
    c = IpCache()
    c.record("ws", "far", [(f"10.0.{i // 256}.{i % 256}", 300) for i in range(10_000)], 0, 0.0)
    c.record("ws", "near", [(f"10.1.0.{i}", 10) for i in range(100)], 0, 0.0)
    assert list(c.expire_steps(5.0, chunk=1)) == [0]
    assert list(c.expire_steps(20.0, chunk=1)) == list(range(1, 101)) + [100]
    assert c.size() == 10_000


def test_a_workspace_dropped_between_steps_is_finished_as_it_was():
    c = IpCache()
    for ws in ("1001", "1002"):
        c.record(ws, "a", [(f"192.0.2.{i}", 10) for i in range(3)], 0, 0.0)
    steps = c.expire_steps(50.0, chunk=1)
    assert next(steps) == 1
    c.drop_workspace("1002")  # the round has not reached it yet
    assert list(steps)[-1] == 6 and c.size() == 0 and c.workspaces() == ["1001"]


def test_a_refreshed_ip_is_kept_then_listed_at_its_new_expiry():
    c = IpCache()
    c.record("ws", "a", [("192.0.2.1", 10)], 0, 0.0)  # expires at 11 (kernel timeout 11 s)
    c.record("ws", "a", [("192.0.2.1", 100)], 0, 5.0)  # refreshed: expires at 106
    assert c.expire(20.0) == 0 and listed(c, "ws") == 1
    assert list(c.expire_steps(50.0, chunk=1)) == [0]  # nothing due until 106
    assert c.expire(106.5) == 1 and c.size() == 0 and listed(c, "ws") == 0


def test_an_ip_expiring_later_in_the_current_second_waits_for_the_next_round():
    c = IpCache()
    c.adopt("ws", "192.0.2.1", "a", 10.7)
    assert c.expire(10.2) == 0 and [e.ip for e in c.entries("ws", 10.2)] == ["192.0.2.1"]
    assert c.expire(10.8) == 1 and c.size() == 0


def test_refreshes_do_not_grow_the_listing_and_repeats_are_read_once():
    """A known name's refresh lists nothing new (its old second comes first, and the IP is listed
    again then); an IP forgotten and answered again is listed twice until a round reads it once."""
    c = IpCache()
    for t in range(200):
        c.record("ws", "a", [("192.0.2.1", 30)], 0, float(t))
    assert listed(c, "ws") == 1
    c.record("ws", "b", [("192.0.2.1", 5)], 0, 200.0)  # a second name on the same IP
    assert listed(c, "ws") == 2
    for _ in range(3):
        c.forget("ws", ["192.0.2.2"])
        c.record("ws", "x", [("192.0.2.2", 30)], 0, 200.0)
    assert listed(c, "ws") == 5
    assert c.expire(206.0) == 0  # "b" expired; "a" keeps the IP
    assert sorted((e.ip, e.name) for e in c.entries("ws", 206.0)) == [("192.0.2.1", "a"), ("192.0.2.2", "x")]
    assert listed(c, "ws") == 5  # 192.0.2.1 twice (its two names' seconds), 192.0.2.2 three times
    assert list(c.expire_steps(250.0, chunk=1)) == [1, 2, 2]  # yet each is read once
    assert c.size() == 0 and listed(c, "ws") == 0


def test_a_shared_table_shares_its_listing():
    old = IpCache()
    old.record("ws", "a", [("192.0.2.1", 10)], 0, 0.0)
    new = IpCache()
    new.share(old, "ws")
    assert new.expire(20.0) == 1 and new.size() == 0
    new.drop_workspace("ws")
    assert listed(new, "ws") == 0 and new.workspaces() == []


@given(
    st.lists(st.integers(0, 400).map(lambda q: q / 8), max_size=30),
    st.lists(st.integers(0, 400).map(lambda q: q / 8), max_size=12),
    st.integers(0, 3),
)
def test_each_round_drops_exactly_what_has_expired(expiries, rounds, chunk):
    """Expiries and rounds at eighths of a second, many in the same second: after every round
    the cache holds exactly the IPs whose expiry is still ahead."""
    c = IpCache()
    for i, e in enumerate(expiries):
        c.adopt("ws", f"192.0.2.{i}", "a", e)
    for now in sorted(rounds):
        if chunk:
            list(c.expire_steps(now, chunk))
        else:
            c.expire(now)
        assert set(c.ips("ws")) == {f"192.0.2.{i}" for i, e in enumerate(expiries) if e > now}


def test_a_round_left_between_steps_loses_nothing():
    """A round closed between steps (as at shutdown) lists again what it had taken and not read:
    the next round drops those IPs. Without that, they would stay cached for good."""
    c = IpCache()
    c.record("ws", "a", [(f"192.0.2.{i}", 10) for i in range(10)], 0, 0.0)  # all due at 11
    c.adopt("ws", "198.51.100.1", "b", 50.5)  # due later in the round's own second
    steps = c.expire_steps(50.0, chunk=3)
    assert next(steps) == 3
    steps.close()
    assert c.size() == 8 and listed(c, "ws") == 8  # 7 not read, and the one of second 50
    assert c.expire(50.0) == 7 and set(c.ips("ws")) == {"198.51.100.1"}
    assert c.expire(51.0) == 1 and c.size() == 0 and listed(c, "ws") == 0


@given(
    st.lists(st.integers(0, 400).map(lambda q: q / 8), max_size=30),
    st.lists(st.tuples(st.integers(0, 400).map(lambda q: q / 8), st.integers(0, 12)), max_size=12),
    st.integers(1, 3),
)
def test_rounds_left_between_steps_never_lose_an_ip(expiries, rounds, chunk):
    """Rounds closed after some steps drop only expired IPs, and a full round afterwards drops
    exactly what has expired by then."""
    c = IpCache()
    for i, e in enumerate(expiries):
        c.adopt("ws", f"192.0.2.{i}", "a", e)
    now = 0.0
    for now, steps in sorted(rounds):
        gen = c.expire_steps(now, chunk)
        for _ in zip(range(steps), gen):
            pass
        gen.close()
        assert set(c.ips("ws")) >= {f"192.0.2.{i}" for i, e in enumerate(expiries) if e > now}
    c.expire(now)
    assert set(c.ips("ws")) == {f"192.0.2.{i}" for i, e in enumerate(expiries) if e > now}


def test_forget_makes_the_next_answer_program_again():
    c = IpCache()
    c.record("ws", "a", [("192.0.2.1", 60)], 30, 0.0)
    c.forget("ws", ["192.0.2.1"])
    assert c.record("ws", "a", [("192.0.2.1", 60)], 30, 0.1) == [("192.0.2.1", 61 + GRACE)]


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 20), st.integers(0, 400), st.floats(0, 1000)),
        max_size=60,
    )
)
def test_kernel_entry_always_covers_every_answer(answers):
    """Whatever the order of answers, the (modelled) kernel expiry of each IP is never earlier
    than now + max(ttl, min_ttl) of any answer that named it."""
    c = IpCache()
    kernel: dict[str, float] = {}
    need: dict[str, float] = {}
    now = 0.0
    for name, ipn, ttl, dt in answers:
        now += dt / 100
        ip = f"192.0.2.{ipn}"
        for p_ip, timeout in c.record("ws", name, [(ip, ttl)], 30, now):
            kernel[p_ip] = now + timeout
        need[ip] = max(need.get(ip, 0.0), now + min(max(ttl, 30, 1), MAX_TTL))
        assert kernel[ip] >= need[ip]
