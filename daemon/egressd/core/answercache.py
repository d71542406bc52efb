"""The shim's answer cache: allowed answers served again without a parse or an upstream query.

Pure: time is passed in (``now``, monotonic seconds). Keys are the client's address and the
query's wire bytes after its 2-byte ID, so a hit needs no parse (one client's identical query
always classifies the same way within one policy generation; the cache is cleared on every new
generation). Values are the answer as sent to the client, without its ID, with the offsets of
its TTL fields: a hit is served with every TTL decremented by the entry's age, and never after
the smallest TTL has run out.

Why hits need no set refresh: an answer's IPs are programmed with a kernel timeout of at least
their TTL (plus a margin, see ipcache), counted from the moment the answer was first released.
The entry expires when the smallest TTL of the answer runs out, and the TTLs it serves count
down with it, so every cached answer a client ever gets points at IPs that are still in the
kernel for as long as the client may use them. (dnsmasq's ``nftset=`` does not re-add IPs on cache
hits: its set timeout and the answer's TTL are unrelated.)
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from egressd.core.dnsmsg import _header, _read_question, _read_rr
from egressd.errors import DnsFormatError

TYPE_OPT = 41
_TC = 0x0200
_U32 = struct.Struct("!I")

#: Entries kept at most; the oldest insertion goes first when full. About 400 bytes each: 8,192
#: entries (some 3 MB) hold a busy node's hot names; unique names pass through without growing it.
DEFAULT_MAX_ENTRIES = 8_192


def ttl_offsets(answer: bytes) -> tuple[tuple[int, ...], int] | None:
    """Offsets of the TTL fields of every record except OPT, and the smallest TTL.
    None when the answer must not be cached: truncated, an error rcode, no records, a TTL
    under 1 second, or anything unparsable."""
    try:
        _, flags, qdcount, ancount, nscount, arcount = _header(answer)
        if flags & _TC or flags & 0xF not in (0, 3) or qdcount != 1:
            return None
        off = _read_question(answer, 12)[3]
        offsets: list[int] = []
        low = None
        for _ in range(ancount + nscount + arcount):
            _, rtype, _, ttl, start, off = _read_rr(answer, off)
            if rtype == TYPE_OPT:
                continue
            offsets.append(start - 6)
            low = ttl if low is None else min(low, ttl)
    except (DnsFormatError, struct.error, IndexError):
        return None
    if off != len(answer) or low is None or low < 1 or low & 0x80000000:
        return None
    return tuple(offsets), low


class _Entry:
    __slots__ = ("body", "born", "expires", "fresh_until", "offsets", "rcode", "served", "shown")

    def __init__(self, body: bytes, offsets: tuple[int, ...], now: float, ttl: int) -> None:
        self.body = body  # the answer without its ID, as it came (TTLs at age 0)
        self.offsets = offsets  # TTL offsets within body
        self.born = now
        self.expires = now + ttl
        self.shown = 0  # the age (whole seconds) the TTLs in ``served`` reflect
        self.served = body
        # ``served`` is the answer to give until then: the next whole second of age, or expiry.
        self.fresh_until = min(self.expires, now + 1)
        self.rcode = body[1] & 0xF


def age_ttls(body: bytes, offsets: tuple[int, ...], age: int) -> bytes:
    """``body`` with every TTL at ``offsets`` lowered by ``age`` seconds (not below 0)."""
    buf = bytearray(body)
    for o in offsets:
        (ttl,) = _U32.unpack_from(buf, o)
        _U32.pack_into(buf, o, max(ttl - age, 0))
    return bytes(buf)


class AnswerCache:
    """(client, query bytes after the ID) -> the answer without its ID.

    The hot path of a busy resolver may read ``entries`` itself, without a call: for
    ``e = entries.get((client, query[2:]))``, while ``now < e.fresh_until`` the answer is
    ``query[:2] + e.served`` (rcode ``e.rcode``). Otherwise, get() ages or expires the entry."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max = max(1, max_entries)
        # An OrderedDict: evicting the oldest is O(1) (next(iter(dict)) after many deletions from
        # the front of a plain dict scans the holes they leave, which slowed unique-name load).
        # Read-only outside this class; the same object for the cache's lifetime.
        self.entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self.generation: object = None
        self.inserts = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self, generation: object = None) -> None:
        self.entries.clear()
        self.generation = generation

    def put(self, client: str, query: bytes, answer: bytes, now: float) -> bool:
        """Cache ``answer`` (with its ID, as sent) to ``query`` (with its ID). False if it is
        not cacheable (see ttl_offsets)."""
        got = ttl_offsets(answer)
        if got is None:
            return False
        self.put_parsed(client, query, answer, now, *got)
        return True

    def put_parsed(self, client: str, query: bytes, answer: bytes, now: float,
                   offsets: tuple[int, ...], ttl: int) -> None:
        """put() with ``(offsets, ttl)`` as ttl_offsets(answer) gives them (not None), read
        while the answer was parsed (AnswerInfo.ttls)."""
        d = self.entries
        if len(d) >= self._max:
            d.popitem(last=False)
        d[(client, bytes(query[2:]))] = _Entry(bytes(answer[2:]), tuple([o - 2 for o in offsets]), now, ttl)
        self.inserts += 1

    def get(self, client: str, query: bytes, now: float) -> bytes | None:
        """The answer to ``query`` (with its ID) for ``client``, with the query's ID and aged
        TTLs, or None."""
        key = (client, query[2:])
        e = self.entries.get(key)
        if e is None:
            return None
        if now >= e.fresh_until:
            if now >= e.expires:
                del self.entries[key]
                return None
            # At least one second older than shown (float rounding of now - born aside).
            age = max(int(now - e.born), e.shown + 1)
            e.served = age_ttls(e.body, e.offsets, age)
            e.shown = age
            e.fresh_until = min(e.expires, e.born + age + 1)
        return query[:2] + e.served
