"""Nft gives back the memory of big commands and listings (libnftables' cache, glibc's heap) and
stays usable afterwards. Real nftables in a throw-away namespace."""

from __future__ import annotations

import gc

N = 100_000


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _big_set() -> str:
    els = ",".join(f'10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} timeout 3600s comment "n{i}.example.com"'
                   for i in range(N))
    return ("table inet egressd { set ws_1_dyn4 { type ipv4_addr; flags timeout; }; }\n"
            f"add element inet egressd ws_1_dyn4 {{ {els} }}\n")


def test_big_commands_and_listings_release_their_memory(scratch_ns):
    nft = scratch_ns.nft
    gc.collect()
    before = _rss_mb()
    text = _big_set()
    nft.run(text)
    del text
    gc.collect()
    # Without the release, libnftables' cache of the command kept ~40 MB resident.
    assert _rss_mb() - before < 25
    objs = nft.list_json("table inet egressd")
    elems = [o for o in objs if "set" in o][0]["set"]["elem"]
    assert len(elems) == N
    assert elems[0]["elem"]["comment"].endswith(".example.com")
    del objs, elems
    gc.collect()
    nft.release()
    # Without the release, the parsed listing's cache kept ~150 MB resident.
    assert _rss_mb() - before < 25
    # The context still works and the table is intact.
    assert nft.table_exists("inet egressd")
    assert "ws_1_dyn4" in scratch_ns.ruleset()
    nft.run("delete table inet egressd")
    assert not nft.table_exists("inet egressd")


def test_a_held_release_waits_for_its_resume(scratch_ns):
    nft = scratch_ns.nft
    gc.collect()
    before = _rss_mb()
    resume = nft.hold_release()
    text = _big_set()
    nft.run(text)
    del text
    gc.collect()
    held = _rss_mb()
    resume()
    # The command's cache (~40 MB) stayed until the resume, which gave it back.
    assert held - _rss_mb() > 20, (held, _rss_mb())
    assert _rss_mb() - before < 25
    resume()  # a second call does nothing
    nft.run(_big_set().replace("table inet egressd {", "flush set inet egressd ws_1_dyn4\ntable inet egressd {", 1))
    gc.collect()
    assert _rss_mb() - before < 25  # nothing holds it any more: released at once again
    nft.run("delete table inet egressd")
