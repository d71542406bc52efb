"""libnftables in-process (ctypes through the ``nftables`` module of pip-nftables).

One call runs one buffer as one kernel transaction: it all applies, or nothing does. About 40 µs for
a small command, where the ``nft`` subprocess takes milliseconds."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from collections.abc import Callable
from typing import Any

import nftables

from .errors import ApplyError

#: Commands or listings at least this long are followed by release(): below it there is little to
#: give back, and a metrics scrape's counter listing stays a single cheap call.
RELEASE_AFTER = 256 * 1024
#: A listing of a table that cannot exist: libnftables drops the cache the previous command built
#: (100,000 set elements parsed: ~110 MB of C heap) and fetches nothing in its place.
_CACHE_RESET = "list table inet egressd-release-cache"


@functools.cache
def _libc_trim() -> Callable[[int], int] | None:
    # Looked up once: find_library runs ldconfig in a subprocess.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def malloc_trim() -> None:
    """Return glibc's free heap pages to the kernel (after big Python objects were freed)."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


class Nft:
    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_echo_output(False)
        self._nft.set_handle_output(False)
        self._held = 0
        self._release_due = False

    def hold_release(self) -> Callable[[], None]:
        """Keep the memory of big commands until the returned function is called (once): an API
        change releases it after its reply is out, not before (dropping the cache of a table of
        100,000 elements and trimming the heap took 50-80 ms)."""
        self._held += 1
        done = False

        def resume() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._held -= 1
            if not self._held and self._release_due:
                self.release()

        return resume

    def run(self, text: str) -> str:
        """Run commands as one transaction; raise ApplyError with nft's own message on failure."""
        self._nft.set_json_output(False)
        try:
            rc, out, err = self._nft.cmd(text)
        finally:
            if len(text) >= RELEASE_AFTER:
                if self._held:
                    self._release_due = True
                else:
                    self.release()
        if rc != 0:
            raise ApplyError(_first_lines(err) or f"nft failed with rc={rc}")
        return out

    def release(self) -> None:
        """Give back the memory of a big command: drop libnftables' cache (a cheap listing that
        replaces it with nothing), then return glibc's free heap pages to the kernel."""
        self._release_due = False
        self._nft.cmd(_CACHE_RESET)
        malloc_trim()

    def list_json(self, what: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """`list …` as parsed JSON objects (metainfo dropped); [] when the object does not exist.
        terse: sets without their elements (`nft -t`)."""
        self._nft.set_json_output(True)
        self._nft.set_terse_output(terse)
        try:
            rc, out, err = self._nft.cmd(f"list {what}")
        finally:
            self._nft.set_json_output(False)
            self._nft.set_terse_output(False)
        if rc != 0:
            if "No such file or directory" in err:
                return []
            raise ApplyError(_first_lines(err))
        big = len(out) >= RELEASE_AFTER
        doc = json.loads(out or "{}")
        del out
        objs = [o for o in doc.get("nftables", []) if "metainfo" not in o]
        if big:
            self.release()
        return objs

    def table_exists(self, table: str) -> bool:
        rc, _out, _err = self._nft.cmd(f"list table {table}")
        return rc == 0


def _first_lines(err: str, n: int = 6) -> str:
    return "\n".join(err.strip().splitlines()[:n])
