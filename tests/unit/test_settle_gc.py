"""settle_gc(): a full collection, then what survived frozen; a frozen object that becomes cyclic
garbage is freed by the next round (the daemon runs one at start-up and every 10 minutes)."""

from __future__ import annotations

import gc
import weakref

from egressd.daemon import settle_gc


class _Node:
    pass


def test_a_frozen_cycle_survives_collections_until_the_next_settle() -> None:
    a = _Node()
    a.me = a  # a reference cycle: only the cyclic GC can free it
    ref = weakref.ref(a)
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0
        del a
        gc.collect()
        assert ref() is not None  # frozen: even a full collection leaves it
        settle_gc()
        assert ref() is None  # unfrozen, collected, and the survivors frozen again
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_settle_garbage_made_before_it_is_not_frozen() -> None:
    b = _Node()
    b.me = b
    ref = weakref.ref(b)
    del b
    try:
        settle_gc()  # collects first, then freezes
        assert ref() is None
    finally:
        gc.unfreeze()

