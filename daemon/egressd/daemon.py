"""`egressd run`: the one place that wires the adapters around the core.

Start-up order makes the node fail closed: the ruleset is applied (taking over any table a previous
run left, in one transaction) before the shim listens, and READY=1 is sent only once the ruleset,
the shim and the API are all up. On stop the rules stay in the kernel: restricted workloads stay
restricted while no daemon runs."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import signal
import socket
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import structlog
from aiohttp import web

from . import __version__
from .admin import Admin
from .api.server import make_app, make_metrics_app, read_token, serve, socket_group_gid
from .baked import Baked, load_baked
from .engine import Engine
from .errors import EgressdError
from .httplog import server_logger
from .libnft import Nft
from .logs import setup as setup_logging
from .netaddr import node_addresses
from .nftset import NftSetWriter
from .core.denials import Origin
from .metrics import Exposition
from .nflogsock import NflogReader
from .reporter import Reporter
from .sdnotify import Notifier
from .shim import DnsShim
from .shipper import Shipper
from .statestore import StateStore

log = structlog.get_logger("egressd.daemon")

#: Seconds between expiry rounds. A round deletes what it drops from the kernel while the
#: element is live (ipcache.GRACE is 5 s), and reads only the IPs due, so it runs every second.
EXPIRE_INTERVAL = 1.0
#: Seconds between re-reads of the node's addresses (and the status line systemd shows).
NODE_REFRESH_INTERVAL = 10.0
GC_SETTLE_INTERVAL = 600.0  # seconds between settle_gc() rounds in housekeeping


def settle_gc() -> None:
    """A full cyclic collection, then everything that survived it frozen (gc.freeze): the
    automatic full collections that follow walk only what was made since. Without this, under a
    stream of new names they ran every few seconds, walked every object of the daemon (modules,
    the loaded state, the caches) and held the event loop about 45 ms each; frozen, 12 ms
    (100,000 names, sitecustomize-logged). Run at start-up and every GC_SETTLE_INTERVAL, so a
    frozen object that becomes cyclic garbage (a replaced policy, say) is freed within that."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _nftset_writer() -> NftSetWriter | None:
    """The raw netlink writer of the DNS path; None (libnftables per answer) if it cannot open."""
    try:
        return NftSetWriter()
    except OSError as e:
        log.warning("nftset_writer_unavailable", error=str(e), fallback="libnftables")
        return None


class Daemon:
    def __init__(self, config_path: str | Path, baked: Baked) -> None:
        self.config_path = Path(config_path)
        self.cfg = baked.config
        self.node = self.cfg.node or socket.gethostname()
        self.notifier = Notifier()
        self.engine = Engine(self.cfg, Nft(), node_addresses=node_addresses(), nftset=_nftset_writer())
        self.admin = Admin(self.engine, StateStore(self.cfg.state.dir), baked)
        self.shipper = Shipper(url=self.cfg.collector.url, spool_dir=Path(self.cfg.state.dir) / "spool")
        self.reporter = Reporter(
            Origin(self.cfg.account_id, self.node),
            self.shipper.submit,
            deny_rcode=self.cfg.dns.deny_rcode_value,
            workload_of=self.engine.workload_of,
            policy_of=self.engine.policy_of,
        )
        self.engine.on_denial = self.reporter.dns_denied
        self.nflog: NflogReader | None = None
        self.shim: DnsShim | None = None
        self.started = time.time()
        self.last_apply_wall: float | None = None
        self._stop = asyncio.Event()
        api = self.cfg.api
        self.token = read_token(api.token_file) if api.tcp_listen and api.token_file else None
        if api.tcp_listen and not self.token:
            raise EgressdError("api.tcp_listen needs api.token_file")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        adopted = self.engine.adopt()
        # The packet log is bound before the ruleset that feeds it is applied: no denial is missed.
        self.nflog = NflogReader(self.cfg.enforcement.nflog_group)
        await self.nflog.start(loop, self.reporter.packets)
        await self.shipper.start()
        self.admin.start()
        self.last_apply_wall = time.time()
        cfg = self.cfg.dns
        self.shim = DnsShim(
            upstreams=cfg.upstreams,
            classify=self.engine.classify,
            program=self.engine.program_nowait,
            total_timeout=cfg.upstream_timeout_ms / 1000,
            max_inflight=cfg.max_inflight,
            known_client=lambda ip: self.engine.workload_of(ip) is not None,
            # No per-client limit configured (rate_limit_qps = 0): nothing for a cache hit to ask.
            admit=self.engine.admit if self.engine.dns_limit.enabled else None,
            # getattr through partial: no Python frame (the answer cache asks on every hit)
            generation=partial(getattr, self.engine, "generation"),
        )
        await self.shim.start([("0.0.0.0", cfg.listen_port), ("::", cfg.listen_port)])
        gid = socket_group_gid(self.cfg.api.socket_group)
        if gid is None:
            log.warning("api_socket_group_missing", group=self.cfg.api.socket_group, note="socket is root-only")
        app = make_app(self.admin, status=self.status, metrics=self.metrics, token=self.token, socket_gid=gid)
        runner = await serve(app, socket_path=self.cfg.api.socket, socket_gid=gid, tcp=self.cfg.api.tcp_listen)
        runners = [runner]
        if self.cfg.api.metrics_listen:
            mrunner = web.AppRunner(make_metrics_app(self.metrics), access_log=None, handle_signals=False,
                                    logger=server_logger("egressd.metrics.http"))
            await mrunner.setup()
            await web.TCPSite(mrunner, *self.cfg.api.metrics_listen).start()
            runners.append(mrunner)
        if os.environ.get("EGRESSD_TEST_HOOKS") == "1":
            # Test hook: SIGUSR2 stalls the event loop, so tests can see the watchdog pings stop.
            stall = float(os.environ.get("EGRESSD_TEST_STALL_SECONDS", "3"))
            loop.add_signal_handler(signal.SIGUSR2, lambda: time.sleep(stall))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        settle_gc()
        log.info(
            "ready",
            version=__version__,
            generation=self.engine.generation,
            adopted_ips=adopted,
            dns_port=cfg.listen_port,
            api_socket=self.cfg.api.socket,
            upstreams=[f"{h}:{p}" for h, p in cfg.upstreams],
        )
        self.notifier.notify(ready=1, status=self._status_text())
        tasks = [asyncio.create_task(self._housekeeping())]
        if self.notifier.watchdog_interval:
            tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval)))
        await self._stop.wait()
        self.notifier.notify(stopping=1, status="stopping; the ruleset stays in the kernel")
        for t in tasks:
            t.cancel()
        for r in runners:
            await r.cleanup()
        await self.shim.close()
        self.nflog.close()
        if self.engine.nftset is not None:
            self.engine.nftset.close()
        await self.shipper.close()
        log.info("stopped", generation=self.engine.generation, note="ruleset left in place (fail closed)")
        return 0

    def _status_text(self) -> str:
        e = self.engine
        return (
            f"generation {e.generation}, {len(e.plan.workloads) if e.plan else 0} workloads, "
            f"{e.cache.size()} allowed IPs, last apply {e.last_apply_ms:.1f} ms"
        )

    def status(self) -> dict:
        e = self.engine
        # The last ruleset swap: an API change, a SIGHUP reload or the start (whichever came last).
        last = e.last_apply_wall or self.last_apply_wall
        shim = self.shim
        return {
            "version": __version__,
            "node": self.node,
            "uptime_seconds": round(time.time() - self.started, 3),
            "generation": e.generation,
            "last_apply_ms": round(e.last_apply_ms, 3),
            "last_apply_time": datetime.fromtimestamp(last, timezone.utc).isoformat(timespec="milliseconds") if last else None,
            "policies": len(self.admin.effective.policies),
            "workspaces": len(self.admin.effective.workspaces()),
            "workloads": len(e.plan.workloads) if e.plan else 0,
            "set_sizes": {ws: e.cache.size(ws) for ws in sorted(e.cache.workspaces())},
            "allowed_ips": e.cache.size(),
            "shim": {
                "listening": bool(shim and shim.bound),
                "port": self.cfg.dns.listen_port,
                "upstreams": [f"{h}:{p}" for h, p in self.cfg.dns.upstreams],
                "stats": dict(shim.stats) if shim else {},
            },
            "collector": {"url": self.cfg.collector.url, **self.shipper.stats()},
            "events": dict(self.reporter.counts),
            "packet_log": self.nflog.stats() if self.nflog else {},
        }

    def metrics(self) -> str:
        e, x = self.engine, Exposition()
        x.one("egressd_ruleset_generation", "gauge", "Generation of the ruleset in the kernel.", e.generation)
        x.one("egressd_ruleset_apply_duration_seconds", "gauge", "Duration of the last ruleset apply.", e.last_apply_ms / 1000)
        x.metric("egressd_set_elements", "gauge", "Resolved IPs in each workspace's allow sets, by workspace and policy.",
                 [({"workspace_id": ws, "policy_id": e.policy_of(ws) or ""}, e.cache.size(ws)) for ws in sorted(e.cache.workspaces())])
        x.one("egressd_programmed_ips_total", "counter", "IPs programmed into the kernel sets.", e.counters["programmed_ips"])
        x.one("egressd_program_errors_total", "counter", "Failed set updates (the answer became SERVFAIL).", e.counters["program_errors"])
        x.one("egressd_set_transactions_total", "counter",
              "Kernel transactions that added answers' IPs to the sets or deleted expired ones, refused ones included.",
              e.counters["set_transactions"])
        x.one("egressd_expired_deleted_total", "counter",
              "Expired answers' IPs deleted from the kernel sets by the daemon.", e.counters["expired_deleted"])
        x.one("egressd_expired_delete_errors_total", "counter",
              "Deletes of expired IPs the kernel refused (its own timeout removes them later).",
              e.counters["expire_delete_errors"])
        shim = self.shim
        if shim is not None:
            x.metric("egressd_dns_answers_total", "counter",
                     "DNS answers by outcome (allowed: IPs programmed; forwarded: unrestricted or dry run; denied; servfail) and rcode.",
                     [({"outcome": o, "rcode": str(rc)}, n) for (o, rc), n in sorted(shim.answers.items())])
            x.histogram("egressd_dns_forward_duration_seconds",
                        "Time from a forwarded query to its answer (upstream round trip and set programming).", shim.latency)
            st = shim.stats
            x.one("egressd_dns_queries_total", "counter", "DNS queries received by the shim.", st["queries"])
            x.metric("egressd_dns_upstream_errors_total", "counter", "Upstream failures by kind.",
                     [({"kind": k}, st[k]) for k in ("upstream_errors", "upstream_timeouts", "upstream_failure_rcodes")])
            x.metric("egressd_dns_events_total", "counter", "Other DNS shim events by kind.",
                     [({"kind": k}, v) for k, v in sorted(st.items()) if k not in ("queries", "upstream_errors", "upstream_timeouts", "upstream_failure_rcodes")])
        x.metric("egressd_dns_rate_limited_total", "counter",
                 "DNS queries refused at once because their workload was over [dns] rate_limit_qps, by workspace.",
                 [({"workspace_id": ws}, n) for ws, n in sorted(e.dns_rate_limited.items())])
        af = e.answer_filter
        x.metric("egressd_dns_filtered_addresses_total", "counter",
                 "Addresses of allowed answers never programmed because they are special "
                 "(loopback, link-local, metadata-service, multicast, unspecified, broadcast, node-address), by reason.",
                 [({"reason": r}, n) for r, n in sorted(af.filtered.items())])
        x.one("egressd_dns_refused_answers_total", "counter",
              "Allowed answers turned into SERVFAIL for holding special addresses ([dns] special_addresses = \"refuse\").",
              af.refused_answers)
        x.one("egressd_dns_capped_addresses_total", "counter",
              "Addresses of allowed answers left out of the allow sets by [dns] max_ips_per_name.", af.capped)
        x.one("egressd_workloads", "gauge", "Registered workloads.", len(e.plan.workloads) if e.plan else 0)
        x.metric("egressd_denial_events_total", "counter", "Denial events built, by kind (folded: bursts folded into one).",
                 [({"kind": k}, v) for k, v in sorted(self.reporter.counts.items())])
        kc = e.kernel_counters()
        nf = self.nflog.stats() if self.nflog else {}
        x.metric("egressd_nflog_messages_total", "counter", "Packet-log messages from the kernel, by outcome.",
                 [({"outcome": k}, v) for k, v in sorted(nf.items())])
        x.metric("egressd_log_suppressed_packets_total", "counter",
                 "New flows the kernel's per-source log rate limit kept out of the log.",
                 [({"workspace_id": name[3:-11]}, n) for name, n in sorted(kc.items())
                  if name.startswith("ws_") and name.endswith("_suppressed")])
        x.one("egressd_dns_flood_drops_total", "counter",
              "UDP queries dropped in the kernel in front of the shim: a source over 4x [dns] rate_limit_qps "
              "(unanswered; a flood that fast would crowd other workloads out of the shim's socket).",
              kc.get("dns_flood_drops", 0))
        x.one("egressd_antispoof_drops_total", "counter",
              "Packets dropped with a registered workload's source address on the wrong interface (spoofed; "
              "counted, never logged as events: the sender cannot be attributed).", kc.get("antispoof_drops", 0))
        sh = self.shipper.stats()
        x.one("egressd_spool_events", "gauge", "Events waiting in the on-disk spool.", sh["spool_events"])
        x.one("egressd_collector_backlog_events", "gauge", "Events not yet delivered to the collector.", sh["backlog"])
        x.one("egressd_events_delivered_total", "counter", "Events the collector acknowledged.", sh["delivered"])
        x.metric("egressd_events_dropped_total", "counter", "Events dropped: oldest past the spool bound, or newest when the disk failed.",
                 [({"reason": "spool_full_oldest"}, sh["dropped_oldest"]), ({"reason": "newest"}, sh["dropped_newest"])])
        x.one("egressd_uptime_seconds", "gauge", "Seconds since the daemon started.", time.time() - self.started)
        return x.text()

    async def reload(self) -> None:
        """SIGHUP: re-read the config and policy files; apply them whole, or keep the old rules."""
        self.notifier.notify(reloading=1, status="reloading")
        try:
            baked = load_baked(self.config_path)
            if baked.config.dns != self.cfg.dns or baked.config.api != self.cfg.api:
                log.warning("reload_partial", note="[dns] and [api] changes need a restart")
            await self.admin.reload_baked(baked)
        except EgressdError as e:
            log.error("reload_refused", error=str(e), generation=self.engine.generation)
        self.notifier.notify(ready=1, status=self._status_text())

    async def _housekeeping(self) -> None:
        settled = refreshed = time.monotonic()
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            if time.monotonic() - settled >= GC_SETTLE_INTERVAL:
                settle_gc()
                settled = time.monotonic()
            try:
                # A step of a few hundred IPs at a time: DNS answers go on in between.
                for _ in self.engine.expire_steps():
                    await asyncio.sleep(0)
                if time.monotonic() - refreshed >= NODE_REFRESH_INTERVAL:
                    refreshed = time.monotonic()
                    await self._refresh_node_addresses()
                    self.notifier.notify(status=self._status_text())
            except Exception:  # noqa: BLE001 - one bad round must not end housekeeping for good
                log.exception("housekeeping_failed")

    async def _refresh_node_addresses(self) -> None:
        """The node's own addresses change (DHCP, new interfaces): answers holding any of them are
        never programmed, so the list follows the node within NODE_REFRESH_INTERVAL. (One blocking
        netlink dump: it is called from a worker thread.)"""
        try:
            addrs = {ipaddress.ip_address(a) for a in await asyncio.to_thread(node_addresses)}
        except Exception as exc:  # noqa: BLE001 - housekeeping must go on whatever netlink says
            log.warning("node_addresses_unreadable", error=str(exc))
            return
        if addrs != self.engine.node_addresses:
            log.info("node_addresses_changed", added=sorted(map(str, addrs - self.engine.node_addresses)),
                     removed=sorted(map(str, self.engine.node_addresses - addrs)))
            self.engine.node_addresses = addrs

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify(watchdog=1)
            await asyncio.sleep(interval)


def run(config_path: str | Path) -> int:
    baked = load_baked(config_path)
    setup_logging(baked.config.log.level)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(Daemon(config_path, baked).run())


def event_loop_factory():  # type: ignore[no-untyped-def]
    """uvloop's event loop (the shim's answer-cache hits cost about half as much CPU on it), unless
    EGRESSD_EVENT_LOOP=asyncio asks for the standard library's, or uvloop is missing."""
    if os.environ.get("EGRESSD_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop_missing", note="running on the standard asyncio event loop")
        return None
    return uvloop.new_event_loop
