"""The state file: its text is what json.dumps writes, whatever the documents hold."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.statestore import Pushed, StateStore, dumps_state


def _reference(p: Pushed) -> str:
    return json.dumps(p.to_json(), separators=(",", ":"), sort_keys=True)


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), _TEXT)
_ENTRY = st.one_of(
    st.builds(lambda d, t: {"destination": d, "internet_destination_type": t}, _TEXT, _TEXT),
    st.builds(lambda d, t: {"internet_destination_type": t, "destination": d}, _TEXT, _TEXT),  # other order
    st.builds(lambda d: {"destination": d, "x": 1}, _TEXT),
    st.builds(lambda d: {"destination": d, "internet_destination_type": 5}, _TEXT),
    st.builds(lambda d: {"destination": d}, _TEXT),
    _SCALAR,
)
_JSON = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)), max_leaves=12)
# long lists (the one-format path takes lists of more than 16), mostly plain entries
_LIST = st.builds(lambda n, odd: [{"destination": f"h{i}.example", "internet_destination_type": "DNS_NAME"}
                                  for i in range(n)] + odd, st.integers(0, 40), st.lists(_ENTRY, max_size=3))
_POLICY = st.dictionaries(_TEXT, st.one_of(_JSON, _LIST, st.dictionaries(_TEXT, st.one_of(_LIST, _JSON), max_size=3)),
                          max_size=4)


@settings(max_examples=400, deadline=None)
@given(policies=st.dictionaries(_TEXT, _POLICY, max_size=3), bindings=st.dictionaries(_TEXT, _TEXT, max_size=3),
       workloads=st.dictionaries(_TEXT, _JSON, max_size=3))
def test_the_state_text_is_what_json_dumps_writes(policies, bindings, workloads) -> None:
    p = Pushed(policies, bindings, workloads, {})
    assert dumps_state(p) == _reference(p)


def test_a_policy_of_many_destinations_round_trips(tmp_path) -> None:
    from egressd.core.policy import parse_policy

    dests = [{"destination": f"h{i}.example.com"} for i in range(500)] + [
        {"destination": f"10.0.{i}.0/24", "internet_destination_type": "IP_RANGE"} for i in range(200)]
    pol = parse_policy({"network_policy_id": "p", "egress": {"network_access": {
        "restriction_mode": "RESTRICTED_ACCESS", "allowed_internet_destinations": dests}}})
    pushed = Pushed({"p": pol.to_dict()}, {"1001": "p"}, {}, {})
    assert dumps_state(pushed) == _reference(pushed)
    store = StateStore(tmp_path)
    store.commit(store.prepare(pushed))
    loaded = store.load()
    assert loaded == pushed and parse_policy(loaded.policies["p"]) == pol


def test_a_big_state_is_written_by_a_thread_and_a_failure_shows_at_wait(tmp_path, monkeypatch) -> None:
    import errno
    import os

    import pytest

    from egressd.statestore import PreparedState, StateWriteError

    store = StateStore(tmp_path)
    big = Pushed({"p": {"x": "y" * PreparedState.THREAD_AFTER}}, {}, {}, {})
    prepared = store.begin(big)
    assert prepared._thread is not None
    path = prepared.wait()
    assert path.read_text() == dumps_state(big) and prepared.wait() == path
    store.commit(path)
    assert store.load() == big

    real_write = os.write

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    failing = store.begin(Pushed({"q": {"x": "z" * PreparedState.THREAD_AFTER}}, {}, {}, {}))
    with pytest.raises(StateWriteError, match="No space left"):
        failing.wait()
    with pytest.raises(StateWriteError):
        failing.wait()  # again, every time
    assert not failing.path.exists()
    small = store.begin(Pushed({"r": {}}, {}, {}, {}))  # written at once: the error is there at wait too
    assert small._thread is None
    with pytest.raises(StateWriteError):
        small.wait()
    monkeypatch.setattr(os, "write", real_write)
    assert store.load() == big  # the committed state is untouched


def test_a_change_whose_big_state_file_fails_leaves_the_kernel_untouched(tmp_path, monkeypatch) -> None:
    import asyncio
    import errno
    import os

    import pytest

    from egressd.admin import Admin
    from egressd.baked import Baked
    from egressd.core.config import config_from_dict
    from egressd.core.policy import default_policy
    from egressd.engine import Engine
    from egressd.statestore import StateWriteError

    class Nft:
        def __init__(self) -> None:
            self.scripts: list[str] = []

        def run(self, script: str) -> None:
            self.scripts.append(script)

    cfg = config_from_dict({"dns": {"upstreams": ["203.0.113.2"]}, "state": {"dir": str(tmp_path)}})
    nft = Nft()
    admin = Admin(Engine(cfg, nft), StateStore(tmp_path), Baked(cfg, {"default-policy": default_policy()}, {}, ()))  # type: ignore[arg-type]
    admin.start()
    doc = {"network_policy_id": "big", "egress": {"network_access": {"restriction_mode": "RESTRICTED_ACCESS",
           "allowed_internet_destinations": [{"destination": f"h{i}.example.com"} for i in range(5000)]}}}

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    scripts, gen = list(nft.scripts), admin.engine.generation
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StateWriteError, match="No space left"):
        asyncio.run(admin.put_policy(doc, caller="test", path_id="big"))
    monkeypatch.undo()
    assert nft.scripts == scripts and admin.engine.generation == gen  # the kernel never saw it
    assert "big" not in admin.effective.policies and not list(tmp_path.glob(".state.json.*"))
    asyncio.run(admin.put_policy(doc, caller="test", path_id="big"))  # space again: it goes through
    assert "big" in admin.effective.policies and admin.engine.generation == gen + 1
    assert "big" in StateStore(tmp_path).load().policies
