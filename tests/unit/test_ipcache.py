from hypothesis import given
from hypothesis import strategies as st

from egressd.core.ipcache import MARGIN, MAX_TTL, IpCache


def test_first_answer_programs_with_max_of_ttl_and_min_ttl():
    c = IpCache()
    assert c.record("ws", "a.example", [("192.0.2.1", 5)], min_ttl=30, now=100.0) == [("192.0.2.1", 30 + MARGIN)]
    assert c.record("ws", "b.example", [("192.0.2.2", 300)], min_ttl=30, now=100.0) == [("192.0.2.2", 300 + MARGIN)]


def test_refresh_only_when_the_answer_outlives_the_kernel_entry():
    c = IpCache()
    c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=0.0)
    # half a second later the kernel entry (61 s) still covers a 60 s answer
    assert c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=0.5) == []
    # two seconds later it does not: refresh
    assert c.record("ws", "a.example", [("192.0.2.1", 60)], min_ttl=30, now=2.0) == [("192.0.2.1", 60 + MARGIN)]


def test_ttl_is_clamped():
    c = IpCache()
    assert c.record("ws", "a", [("192.0.2.1", 10**9)], min_ttl=0, now=0.0) == [("192.0.2.1", MAX_TTL + MARGIN)]
    assert c.record("ws", "b", [("192.0.2.2", 0)], min_ttl=0, now=0.0) == [("192.0.2.2", 1 + MARGIN)]


def test_workspaces_are_separate():
    c = IpCache()
    c.record("ws1", "a", [("192.0.2.1", 60)], 30, 0.0)
    assert c.record("ws2", "a", [("192.0.2.1", 60)], 30, 0.0) == [("192.0.2.1", 61)]
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


def test_forget_makes_the_next_answer_program_again():
    c = IpCache()
    c.record("ws", "a", [("192.0.2.1", 60)], 30, 0.0)
    c.forget("ws", ["192.0.2.1"])
    assert c.record("ws", "a", [("192.0.2.1", 60)], 30, 0.1) == [("192.0.2.1", 61)]


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
