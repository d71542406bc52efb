"""The DNS shim: answers every workload query, forwarding only what it is told to.

It knows nothing about policies. It is handed two callbacks (as Cilium's dnsproxy is):

    client --UDP/TCP--> DnsShim --classify(client_ip, query)--> ShimAction
                          |  ignore:  no answer at all (never an open resolver)
                          |  deny:    rcode + Extended DNS Error "Blocked"
                          |  forward: upstreams in order, UDP (TCP when truncated), failover
                          |              |
                          |     final answer with A/AAAA and action.target set
                          |              v
                          |     await program(target, addresses)   # nftables sets (None: done)
                          v              | ok: release the answer; raised or too slow: SERVFAIL
                        client <---------+

Failure is closed: an answer whose addresses could not be programmed is never released, and a
query every upstream failed gets SERVFAIL within ``total_timeout`` plus a little slack.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import structlog

from egressd.core.answercache import DEFAULT_MAX_ENTRIES, AnswerCache
from egressd.core.dnsmsg import (
    EDE_BLOCKED,
    REFUSED,
    SERVFAIL,
    AnswerInfo,
    Query,
    deny_response,
    formerr_response,
    parse_answer,
    parse_query,
    servfail_response,
    truncate_for_udp,
    with_id,
)
from egressd.core.ratelimit import WarnLimiter
from egressd.errors import DnsFormatError
from egressd.metrics import Histogram
from egressd.sockbuf import set_buffer

log = structlog.get_logger("egressd.shim")

Addresses = tuple[tuple[str, int], ...]
Send = Callable[[bytes], None]

_PROGRAM_SLACK = 0.1  # program() may run this long past total_timeout ...
_PROGRAM_MIN = 0.05  # ... and gets at least this long
_TCP_PIPELINE = 64  # queries in flight per TCP connection before we stop reading it
_TCP_WRITE_HIGH = 256 * 1024
_UDP_RCVBUF = 4 * 1024 * 1024
_WARN_EVERY = 10.0  # seconds between repeated warnings of one kind
_POOL_SOCKETS = 16  # connected UDP sockets per upstream
_POOL_ROTATE = 64  # queries per socket before it is replaced (a new source port)


@dataclass(frozen=True)
class ShimAction:
    """What to do with one query; returned by the ``classify`` callback."""

    kind: Literal["forward", "deny", "ignore"]
    target: object | None = None  # opaque; if set, answer IPs go to program(target, addrs) first
    rcode: int = 3  # for deny
    ede_text: str = ""  # for deny
    ede_code: int = EDE_BLOCKED  # for deny: the Extended DNS Error INFO-CODE


class _Outcome:
    """Why an upstream try did not give a final answer."""

    def __init__(self, name: str) -> None:
        self.name = name


_SOFT = _Outcome("timeout")  # worth another round
_HARD = _Outcome("failed")  # refused, SERVFAIL/REFUSED, broken: not worth retrying at once


def _client_ip(host: str) -> str:
    """The client's address as a plain string: no scope id, no ::ffff: mapping."""
    if ":" not in host:
        return host  # IPv4 as the kernel reports it: already plain
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _bind(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            # Forced past net.core.rmem_max, whose Debian default would leave a burst 425,984
            # bytes of queued queries.
            try:
                set_buffer(sock, _UDP_RCVBUF)
            except OSError:
                pass
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class DnsShim:
    """UDP and TCP DNS front end that forwards, denies or ignores each query as told."""

    def __init__(
        self,
        *,
        upstreams: Sequence[tuple[str, int]],
        classify: Callable[[str, Query], ShimAction],
        program: Callable[[object, Addresses], Awaitable[None] | None],
        total_timeout: float = 1.8,
        per_try_timeout: float = 0.6,
        max_inflight: int = 2048,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 1024,
        known_client: Callable[[str], bool] | None = None,
        admit: Callable[[str], ShimAction | None] | None = None,
        generation: Callable[[], object] | None = None,
        cache_entries: int = DEFAULT_MAX_ENTRIES,
        upstream_sockets: int = _POOL_SOCKETS,
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self._upstreams = [(str(h), int(p)) for h, p in upstreams]
        self._classify = classify
        self._program_cb = program
        self._total_timeout = total_timeout
        self._per_try = per_try_timeout
        self._tcp_try = 2 * per_try_timeout
        self._max_inflight = max_inflight
        self._tcp_idle = tcp_idle_timeout
        self._max_tcp = max_tcp_connections
        self._known_client = known_client  # if set, malformed queries from others are dropped
        self._stats: collections.Counter[str] = collections.Counter()
        # Answers by (outcome, rcode) and the time to answer a forwarded query, for /metrics.
        self._answers: collections.Counter[tuple[str, int]] = collections.Counter()
        # Answer-cache hits not yet in stats and answers (by rcode): plain ints on the hot path,
        # folded in whenever either is read.
        self._hits = 0
        self._hit_rcodes = [0] * 16
        self.latency = Histogram()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._tcp_conns: set[_TcpConn] = set()
        self._bound: list[tuple[str, int]] = []
        self._warns = WarnLimiter(_WARN_EVERY)
        # The answer cache needs generation() (the policy generation; any change clears the
        # cache). admit() is the per-client rate limit, which a hit must still pass; None when
        # there is none (rate_limit_qps = 0), so a hit costs no call for it.
        self._admit = admit
        self._generation = generation
        self.cache = AnswerCache(cache_entries) if generation and cache_entries > 0 else None
        self._pool_size = max(1, upstream_sockets)
        self._pools: dict[tuple[str, int], _UpstreamPool] = {}

    @property
    def stats(self) -> collections.Counter[str]:
        """Counts by event (queries, cache_hits, forwarded, denied, servfail, ...)."""
        if self._hits:
            self._fold_hits()
        return self._stats

    @property
    def answers(self) -> collections.Counter[tuple[str, int]]:
        """Answers by (outcome, rcode)."""
        if self._hits:
            self._fold_hits()
        return self._answers

    def _fold_hits(self) -> None:
        n, self._hits = self._hits, 0
        st = self._stats
        st["queries"] += n
        st["cache_hits"] += n
        st["forwarded"] += n
        rcodes = self._hit_rcodes
        for rc, k in enumerate(rcodes):
            if k:
                self._answers[("allowed", rc)] += k
                rcodes[rc] = 0

    # --- lifecycle --------------------------------------------------------------------

    @property
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) of each bind, UDP and TCP on the same port (port 0 resolved)."""
        return list(self._bound)

    @property
    def bound_ports(self) -> list[int]:
        return [port for _, port in self._bound]

    @property
    def inflight(self) -> int:
        return self._inflight

    async def start(self, binds: Sequence[tuple[str, int]]) -> None:
        """Listen on UDP and TCP on each (host, port). Port 0 picks one free for both."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in binds:
                udp, tcp = self._bind_pair(host, port)
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpServer(self), sock=udp
                )
                self._udp.append(transport)
                self._servers.append(await loop.create_server(lambda: _TcpConn(self), sock=tcp))
                self._bound.append((host, udp.getsockname()[1]))
        except BaseException:
            await self.close()
            raise
        log.info("dns shim listening", binds=self._bound, upstreams=self._upstreams)

    @staticmethod
    def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
        for _ in range(1 if port else 32):
            udp = _bind(host, port, socket.SOCK_DGRAM)
            try:
                return udp, _bind(host, udp.getsockname()[1], socket.SOCK_STREAM)
            except OSError as exc:
                udp.close()
                if port or exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, f"no free port for UDP and TCP on {host}")

    async def close(self) -> None:
        """Stop listening, drop TCP clients and cancel queries in flight."""
        for transport in self._udp:
            transport.close()
        for server in self._servers:
            server.close()
        for conn in list(self._tcp_conns):
            conn.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._udp.clear()
        self._servers.clear()
        self._bound.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # --- one query --------------------------------------------------------------------

    def _on_query(self, wire: bytes, peer: str, send: Send, udp: bool) -> asyncio.Task[None] | bool:
        """Handle one client message. Returns the forwarding task, True when done at once,
        or False when the query is ignored (the caller then says nothing, or hangs up)."""
        stats = self.stats
        stats["queries"] += 1
        client = _client_ip(peer)
        gen = self._generation() if self.cache is not None else None  # before classify()
        try:
            q = parse_query(wire)
        except DnsFormatError as exc:
            stats["formerr"] += 1
            out = None
            if self._known_client is None or self._known_client(client):
                out = formerr_response(wire)
            if out is None:
                stats["dropped"] += 1
            else:
                send(out)
            log.debug("malformed query", client=client, error=str(exc))
            return True
        try:
            action = self._classify(client, q)
            kind = action.kind
            out = deny_response(q, action.rcode, action.ede_text, action.ede_code) if kind == "deny" else b""
        except Exception:
            stats["classify_errors"] += 1
            self._warn("classify_error", "classify callback failed", exc_info=True)
            self._servfail(q, send)
            return True
        if kind == "ignore":
            stats["ignored"] += 1
            return False
        if kind == "deny":
            stats["denied"] += 1
            self.answers[("denied", action.rcode)] += 1
            send(truncate_for_udp(out, q) if udp else out)
            return True
        if kind != "forward":
            stats["classify_errors"] += 1
            self._servfail(q, send)
            return True
        if self._inflight >= self._max_inflight:
            stats["overload"] += 1
            self._servfail(q, send)
            return True
        self._inflight += 1
        key = peer if udp and gen is not None and action.target is not None else None
        task = asyncio.get_running_loop().create_task(self._forward(q, action, send, udp, key, gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _servfail(self, q: Query, send: Send) -> None:
        self.stats["servfail"] += 1
        self.answers[("servfail", 2)] += 1
        send(servfail_response(q))

    def _cached(self, wire: bytes, peer: str, now: float | None = None) -> bytes | None:
        """The reply to a UDP query from the answer cache (or the rate limit's REFUSED), or None
        when the cache does not hold it. ``now``: the event loop's time (looked up if not given).
        The hot path of a busy node: a hit is counted in plain ints (see stats)."""
        cache = self.cache
        gen = self._generation()  # type: ignore[misc]
        if gen != cache.generation:  # type: ignore[union-attr]
            cache.clear(gen)  # type: ignore[union-attr]
            return None
        if now is None:
            now = asyncio.get_running_loop().time()
        out = cache.get(peer, wire, now)  # type: ignore[union-attr]
        if out is None:
            return None
        admit = self._admit
        action = None if admit is None else admit(_client_ip(peer))
        if action is None:
            self._hits += 1
            self._hit_rcodes[out[3] & 0xF] += 1
            return out
        stats = self.stats
        stats["queries"] += 1
        # Over its rate limit: the same REFUSED as an uncached query gets.
        try:
            q = parse_query(wire)
        except DnsFormatError:
            stats["formerr"] += 1
            return formerr_response(wire)
        stats["denied"] += 1
        self.answers[("denied", action.rcode)] += 1
        return truncate_for_udp(deny_response(q, action.rcode, action.ede_text, action.ede_code), q)

    async def _forward(self, q: Query, action: ShimAction, send: Send, udp: bool,
                       cache_key: str | None = None, gen: object = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._total_timeout
        try:
            result = await self._resolve(q, deadline)
            if result is None:
                self._servfail(q, send)
                return
            info, answer = result
            if action.target is not None and info.addresses:
                if not await self._program(action.target, info.addresses, deadline):
                    self._servfail(q, send)
                    return
            full = with_id(answer, q.id)
            out = truncate_for_udp(full, q) if udp else full
            send(out)
            cache = self.cache
            if cache_key is not None and cache is not None and out is full and info.ttls is not None:
                # Only an answer whose IPs are in (program() returned) and that was classified
                # under the generation still in force; a truncated one never (ttl_offsets).
                now_gen = self._generation()  # type: ignore[misc]
                if now_gen == gen:
                    if cache.generation != now_gen:
                        cache.clear(now_gen)
                    cache.put_parsed(cache_key, q.wire, out, loop.time(), *info.ttls)
            self.stats["forwarded"] += 1
            self.answers[("allowed" if action.target is not None else "forwarded", info.rcode)] += 1
            self.latency.observe(loop.time() - (deadline - self._total_timeout))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats["internal_errors"] += 1
            self._warn("internal_error", "forwarding failed", exc_info=True)
            self._servfail(q, send)
        finally:
            self._inflight -= 1

    async def _program(self, target: object, addrs: Addresses, deadline: float) -> bool:
        """Run program(); False if it raised or overran the budget (it is not cancelled)."""
        try:
            aw = self._program_cb(target, addrs)
        except Exception as exc:  # a callback that knew at once
            return self._program_error(exc)
        if aw is None:
            return True
        loop = asyncio.get_running_loop()
        timeout = max(deadline + _PROGRAM_SLACK - loop.time(), _PROGRAM_MIN)
        # A future (Engine.program_nowait) is awaited as it is; a coroutine becomes a task.
        task = asyncio.ensure_future(aw)
        if not task.done():
            # asyncio.wait({task}, timeout) without its per-call set and checks (hot path).
            waiter = loop.create_future()

            def wake(_: object = None) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            task.add_done_callback(wake)
            timer = loop.call_later(timeout, wake)
            try:
                await waiter
            except asyncio.CancelledError:
                task.add_done_callback(_swallow)
                raise
            finally:
                timer.cancel()
                task.remove_done_callback(wake)
        if not task.done():
            self.stats["program_timeouts"] += 1
            task.add_done_callback(_swallow)
            self._warn("program_timeout", "programming answer addresses timed out", timeout=timeout)
            return False
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            return self._program_error(exc)
        return True

    def _program_error(self, exc: BaseException | None) -> bool:
        """Count and (rate-limited) warn a failed program(); False, for _program to return."""
        self.stats["program_errors"] += 1
        self._warn("program_error", "programming answer addresses failed", error=repr(exc))
        return False

    # --- upstreams --------------------------------------------------------------------

    async def _resolve(self, q: Query, deadline: float) -> tuple[AnswerInfo, bytes] | None:
        """Ask the upstreams in order, round after round while some only timed out."""
        loop = asyncio.get_running_loop()
        while True:
            retry = False
            for upstream in self._upstreams:
                if deadline - loop.time() <= 0.001:
                    return None
                outcome = await self._ask(upstream, q, deadline)
                if not isinstance(outcome, _Outcome):
                    return outcome
                retry = retry or outcome is _SOFT
            if not retry:
                return None

    async def _ask(
        self, upstream: tuple[str, int], q: Query, deadline: float
    ) -> tuple[AnswerInfo, bytes] | _Outcome:
        loop = asyncio.get_running_loop()
        stats = self.stats
        timeout = min(self._per_try, deadline - loop.time())
        try:
            pool = self._pools.get(upstream)
            if pool is None:
                pool = self._pools[upstream] = _UpstreamPool(upstream, self._pool_size, self.stats)
            info, answer = await pool.exchange(q, timeout)
            if info.truncated:
                stats["tcp_fallbacks"] += 1
                timeout = min(self._tcp_try, deadline - loop.time())
                if timeout <= 0:
                    return _SOFT
                info, answer = await asyncio.wait_for(self._tcp_exchange(upstream, q), timeout)
                if info.truncated:
                    raise DnsFormatError("truncated answer over TCP")
        except TimeoutError:
            stats["upstream_timeouts"] += 1
            log.debug("upstream timeout", upstream=upstream, qname=q.qname)
            return _SOFT
        except (OSError, EOFError, DnsFormatError) as exc:
            stats["upstream_errors"] += 1
            log.debug("upstream error", upstream=upstream, qname=q.qname, error=repr(exc))
            return _HARD
        if info.rcode in (SERVFAIL, REFUSED):
            stats["upstream_errors"] += 1
            stats["upstream_failure_rcodes"] += 1
            log.debug("upstream failure rcode", upstream=upstream, qname=q.qname, rcode=info.rcode)
            return _HARD
        return info, answer

    async def _tcp_exchange(self, upstream: tuple[str, int], q: Query) -> tuple[AnswerInfo, bytes]:
        """One query over a new TCP connection (the caller bounds the time)."""
        qid = _next_id()
        wire = with_id(q.wire, qid)
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            answer = await reader.readexactly(size)
        finally:
            writer.close()
        try:
            return parse_answer(answer, qid, q.qname, q.qtype), answer
        except DnsFormatError:
            self.stats["spoofed_ignored"] += 1
            raise

    def _warn(self, key: str, event: str, **kw: object) -> None:
        """A warning at most every _WARN_EVERY seconds per key; debug otherwise."""
        if self._warns.due(key, asyncio.get_running_loop().time()) is not None:
            log.warning(event, **kw)
        else:
            log.debug(event, **kw)


def _random_ids() -> Iterator[int]:
    """Uniform random 16-bit query IDs from os.urandom, read 4 KiB at a time (secrets.randbelow
    made a getrandom() system call and four Python calls per ID)."""
    while True:
        yield from memoryview(os.urandom(4096)).cast("H")


_next_id = partial(next, _random_ids())


def _swallow(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()


def _expire(fut: asyncio.Future[tuple[AnswerInfo, bytes]]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _PooledUdp(asyncio.DatagramProtocol):
    """One connected UDP socket to an upstream, with several queries in flight (by ID)."""

    def __init__(self, stats: collections.Counter[str]) -> None:
        self.pending: dict[int, tuple[asyncio.Future[tuple[AnswerInfo, bytes]], Query]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.uses = 0
        self.retired = False
        self._stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 2:
            self._stats["spoofed_ignored"] += 1
            return
        waiter = self.pending.get((data[0] << 8) | data[1])
        if waiter is None or waiter[0].done():
            self._stats["spoofed_ignored"] += 1
            return
        fut, q = waiter
        try:
            info = parse_answer(data, (data[0] << 8) | data[1], q.qname, q.qtype)
        except DnsFormatError:
            self._stats["spoofed_ignored"] += 1
            return
        fut.set_result((info, data))

    def error_received(self, exc: Exception) -> None:
        # An ICMP error on the connected socket: the upstream is unreachable for every query on it.
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(exc or ConnectionError("upstream socket closed"))


class _UpstreamPool:
    """A few connected UDP sockets to one upstream, used in turn. Each socket is replaced after
    _POOL_ROTATE queries (closed once its last answer is in), so the source port keeps changing
    and an off-path spoofer has to guess it along with the random 16-bit ID."""

    def __init__(self, upstream: tuple[str, int], size: int, stats: collections.Counter[str]) -> None:
        self._upstream = upstream
        self._slots: list[_PooledUdp | None] = [None] * size
        self._making: dict[int, asyncio.Future[_PooledUdp]] = {}
        self._next = 0
        self._stats = stats
        self._closed = False

    async def _new_socket(self, i: int) -> _PooledUdp:
        """A new connected socket for slot ``i``, made once however many queries ask for it
        meanwhile (each used to make its own: with 100 queries in flight, a socket for every
        seven queries instead of every 64)."""
        making = self._making.get(i)
        if making is None:
            making = self._making[i] = asyncio.ensure_future(self._make(i))
        # Shielded: a query that gives up does not cancel the socket others wait for.
        return await asyncio.shield(making)

    async def _make(self, i: int) -> _PooledUdp:
        try:
            loop = asyncio.get_running_loop()
            transport, proto = await loop.create_datagram_endpoint(
                lambda: _PooledUdp(self._stats), remote_addr=self._upstream
            )
            if self._closed:
                transport.close()
                raise ConnectionError("upstream pool closed")
            self._slots[i] = proto
            return proto
        finally:
            del self._making[i]

    async def exchange(self, q: Query, timeout: float) -> tuple[AnswerInfo, bytes]:
        i = self._next
        self._next = (i + 1) % len(self._slots)
        proto = self._slots[i]
        if proto is None or proto.retired or proto.transport is None or proto.transport.is_closing():
            # A coroutine only when a socket must be made (every _POOL_ROTATE queries).
            proto = await self._new_socket(i)
        proto.uses += 1
        if proto.uses >= _POOL_ROTATE:
            proto.retired = True
            if self._slots[i] is proto:
                self._slots[i] = None
        transport = proto.transport
        assert transport is not None
        pending = proto.pending
        qid = _next_id()
        while qid in pending:
            qid = _next_id()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[AnswerInfo, bytes]] = loop.create_future()
        pending[qid] = (fut, q)
        timer = loop.call_later(timeout, _expire, fut)
        try:
            transport.sendto(with_id(q.wire, qid))
            return await fut
        finally:
            timer.cancel()
            del pending[qid]
            if proto.retired and not pending:
                transport.close()

    def close(self) -> None:
        self._closed = True
        for proto in self._slots:
            if proto is not None and proto.transport is not None:
                proto.transport.close()
        self._slots = [None] * len(self._slots)


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, shim: DnsShim) -> None:
        self._shim = shim
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # Bound once: asyncio.get_running_loop() costs a getpid() system call per query on 3.11.
        self._now = asyncio.get_running_loop().time

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        shim = self._shim
        cache = shim.cache
        if cache is not None:
            peer = addr[0]
            now = self._now()
            if shim._admit is None and shim._generation() == cache.generation:  # type: ignore[misc]
                # The hit path without a call of ours (see AnswerCache): a busy node's hot names
                # cost the shim little more than a bare dict-backed server (bench a, "floor").
                e = cache.entries.get((peer, data[2:]))
                if e is None:
                    shim._on_query(data, peer, partial(transport.sendto, addr=addr), udp=True)
                    return
                if now < e.fresh_until:
                    shim._hits += 1
                    shim._hit_rcodes[e.rcode] += 1
                    transport.sendto(data[:2] + e.served, addr)
                    return
            out = shim._cached(data, peer, now)
            if out is not None:
                transport.sendto(out, addr)
                return
        shim._on_query(data, addr[0], partial(transport.sendto, addr=addr), udp=True)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp server socket error", error=repr(exc))


class _TcpConn(asyncio.Protocol):
    """One TCP client: length-prefixed, pipelined queries; answers in completion order.

    Reading pauses while too many queries are in flight or the client does not read its
    answers; the connection is closed after ``tcp_idle_timeout`` without input (half-open
    and stalled clients included), and on an ignored query.
    """

    def __init__(self, shim: DnsShim) -> None:
        self._shim = shim
        self._buf = bytearray()
        self._pending = 0
        self._eof = False
        self._closed = False
        self._reading = True
        self._write_paused = False
        self._peer = ""
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        shim = self._shim
        if len(shim._tcp_conns) >= shim._max_tcp:
            shim.stats["tcp_rejected"] += 1
            self._closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        shim._tcp_conns.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else ""
        self._transport.set_write_buffer_limits(high=_TCP_WRITE_HIGH)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._timer = loop.call_later(shim._tcp_idle, self._on_idle)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._last = asyncio.get_running_loop().time()
        self._buf += data
        self._take_frames()

    def _take_frames(self) -> None:
        buf = self._buf
        while self._can_take() and len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if size == 0:
                self._shim.stats["formerr"] += 1
                self.close()
                return
            if len(buf) < 2 + size:
                break
            frame = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            result = self._shim._on_query(frame, self._peer, self._send, udp=False)
            if result is False:
                self.close()
                return
            if isinstance(result, asyncio.Task):
                self._pending += 1
                result.add_done_callback(self._query_done)
        if self._eof and self._pending == 0 and not self._write_paused:
            self.close()  # the client is done sending; what is left is a partial frame
            return
        self._update_reading()

    def _can_take(self) -> bool:
        return not (self._closed or self._write_paused) and self._pending < _TCP_PIPELINE

    def _update_reading(self) -> None:
        if self._closed or self._transport is None:
            return
        want = self._pending < _TCP_PIPELINE and not self._write_paused and not self._eof
        if want != self._reading:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _query_done(self, _task: asyncio.Task[None]) -> None:
        self._pending -= 1
        if not self._closed:
            self._take_frames()

    def _send(self, out: bytes) -> None:
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return
        transport.write(struct.pack("!H", len(out)) + out)

    def eof_received(self) -> bool:
        self._eof = True
        self._take_frames()
        return True  # keep the write side open for answers still in flight

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if not self._closed:
            self._take_frames()

    def _on_idle(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        limit = self._shim._tcp_idle
        quiet = loop.time() - self._last
        if quiet < limit or (self._pending and not self._write_paused):
            self._timer = loop.call_later(limit - quiet if quiet < limit else limit, self._on_idle)
            return
        self._shim.stats["tcp_idle_closed"] += 1
        if self._transport is not None and self._transport.get_write_buffer_size():
            self.abort()
        else:
            self.close()

    def close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._closed = True
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._shim._tcp_conns.discard(self)
