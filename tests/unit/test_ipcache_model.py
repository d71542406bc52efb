"""The compact IpCache (a tuple per one-name IP) behaves exactly like the plain model it replaced
(a dict of names per IP), over random sequences of operations."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.ipcache import GRACE, MARGIN, MAX_TTL, IpCache


class Model:
    """The previous implementation: workspace -> ip -> {name: expiry}."""

    def __init__(self) -> None:
        self.ws: dict[str, dict[str, dict[str, float]]] = {}

    def record(self, workspace, name, addrs, min_ttl, now):
        ips = self.ws.setdefault(workspace, {})
        out = []
        for ip, ttl in addrs:
            life = min(max(int(ttl), int(min_ttl), 1), MAX_TTL)
            expiry = now + life
            names = ips.get(ip)
            if names is None:
                names = ips[ip] = {}
                covered = 0.0
            else:
                covered = max(names.values(), default=0.0)
            names[name] = max(expiry, names.get(name, 0.0))
            if expiry > covered:
                timeout = math.ceil(life) + MARGIN
                names[name] = max(names[name], now + timeout)
                out.append((ip, timeout + GRACE))
        return out

    def entries(self, workspace, now):
        out = []
        for ip, names in self.ws.get(workspace, {}).items():
            name, expiry = max(names.items(), key=lambda kv: kv[1])
            if expiry > now:
                out.append((ip, expiry, name))
        return out

    def adopt(self, workspace, ip, name, expires):
        names = self.ws.setdefault(workspace, {}).setdefault(ip, {})
        names[name] = max(expires, names.get(name, 0.0))

    def retain(self, workspace, keep):
        ips = self.ws.get(workspace, {})
        gone = 0
        for ip in list(ips):
            names = ips[ip]
            for name in [n for n in names if not keep(n)]:
                del names[name]
            if not names:
                del ips[ip]
                gone += 1
        return gone

    def expire(self, now, gone_to=None):
        dropped = 0
        for ws, ips in self.ws.items():
            for ip in list(ips):
                names = ips[ip]
                for name in [n for n, e in names.items() if e <= now]:
                    del names[name]
                if not names:
                    del ips[ip]
                    dropped += 1
                    if gone_to is not None:
                        gone_to.append((ws, ip))
        return dropped

    def forget(self, workspace, ips):
        table = self.ws.get(workspace, {})
        for ip in ips:
            table.pop(ip, None)

    def size(self):
        return sum(len(v) for v in self.ws.values())


WS = st.sampled_from(["1001", "1002"])
NAME = st.sampled_from(["a.example", "b.example", "c.example"])
IP = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "198.51.100.7"])
TTL = st.one_of(st.integers(0, 8), st.integers(0, 400))  # short ones expire within a test
OPS = st.lists(st.one_of(
    st.tuples(st.just("record"), WS, NAME, st.lists(st.tuples(IP, TTL), max_size=4),
              st.one_of(st.just(0), st.integers(0, 60)), st.integers(0, 5)),
    st.tuples(st.just("adopt"), WS, IP, NAME, st.integers(0, 500)),
    st.tuples(st.just("retain"), WS, st.sets(NAME)),
    st.tuples(st.just("expire"), st.integers(0, 50)),
    st.tuples(st.just("forget"), WS, st.lists(IP, max_size=2)),
), max_size=40)


@settings(max_examples=400, deadline=None)
@given(OPS)
def test_compact_cache_matches_the_model(ops):
    c, m = IpCache(), Model()
    now = 0.0
    for op in ops:
        kind = op[0]
        if kind == "record":
            _, ws, name, addrs, min_ttl, step = op
            now += step / 4  # quarters: some expiries fall later in the second an expiry round runs in
            assert c.record(ws, name, addrs, min_ttl, now) == m.record(ws, name, addrs, min_ttl, now)
        elif kind == "adopt":
            _, ws, ip, name, exp = op
            c.adopt(ws, ip, name, exp / 4)
            m.adopt(ws, ip, name, exp / 4)
        elif kind == "retain":
            _, ws, keep = op
            assert c.retain(ws, keep.__contains__) == m.retain(ws, keep.__contains__)
        elif kind == "expire":
            now += op[1] / 4
            chunk = int(now) % 4  # 0: expire() in one step; else expire_steps() a few IPs at a time
            gone: list[tuple[str, str]] = []
            want: list[tuple[str, str]] = []
            got = c.expire(now) if chunk == 0 else list(c.expire_steps(now, chunk, gone))[-1]
            assert got == m.expire(now, want)
            if chunk:  # every IP dropped is handed over for the kernel's delete, once
                assert sorted(gone) == sorted(want)
        else:
            _, ws, ips = op
            c.forget(ws, ips)
            m.forget(ws, ips)
        for ws in ("1001", "1002"):
            got = sorted((e.ip, e.expires) for e in c.entries(ws, now))
            assert got == sorted((ip, e) for ip, e, _ in m.entries(ws, now))
        assert c.size() == m.size()
