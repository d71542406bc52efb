"""`egressd run`: the one place that wires the adapters around the core.

Start-up order makes the node fail closed: the ruleset is applied (taking over any table a previous
run left, in one transaction) before the shim listens, and READY=1 is sent only once both are up.
On stop the rules stay in the kernel: restricted workloads stay restricted while no daemon runs."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import structlog
from pyroute2 import IPRoute

from . import __version__
from .baked import Baked, load_baked
from .engine import Engine, State
from .errors import EgressdError
from .logs import setup as setup_logging
from .libnft import Nft
from .sdnotify import Notifier
from .shim import DnsShim

log = structlog.get_logger("egressd.daemon")

EXPIRE_INTERVAL = 10.0


def node_addresses() -> list[str]:
    with IPRoute() as ipr:
        return [str(a.get("address")) for a in ipr.get_addr() if a.get("address")]


class Daemon:
    def __init__(self, config_path: str | Path, baked: Baked) -> None:
        self.config_path = Path(config_path)
        self.baked = baked
        self.cfg = baked.config
        self.notifier = Notifier()
        self.engine = Engine(self.cfg, Nft(), node_addresses=node_addresses())
        self.shim: DnsShim | None = None
        self.started = time.time()
        self._stop = asyncio.Event()

    def _state(self, baked: Baked) -> State:
        return State(dict(baked.policies), dict(baked.bindings), tuple(baked.workloads))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        adopted = self.engine.adopt()
        self.engine.apply(self._state(self.baked), reason="start")
        cfg = self.cfg.dns
        self.shim = DnsShim(
            upstreams=cfg.upstreams,
            classify=self.engine.classify,
            program=self.engine.program,
            total_timeout=cfg.upstream_timeout_ms / 1000,
        )
        await self.shim.start([("0.0.0.0", cfg.listen_port), ("::", cfg.listen_port)])
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        log.info(
            "ready",
            version=__version__,
            generation=self.engine.generation,
            adopted_ips=adopted,
            dns_port=cfg.listen_port,
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
        await self.shim.close()
        log.info("stopped", generation=self.engine.generation, note="ruleset left in place (fail closed)")
        return 0

    def _status_text(self) -> str:
        e = self.engine
        return (
            f"generation {e.generation}, {len(e.plan.workloads) if e.plan else 0} workloads, "
            f"{e.cache.size()} allowed IPs, last apply {e.last_apply_ms:.1f} ms"
        )

    async def reload(self) -> None:
        """SIGHUP: re-read the config and policy files; apply them whole, or keep the old rules."""
        self.notifier.notify(reloading=1, status="reloading")
        try:
            baked = load_baked(self.config_path)
            if baked.config.dns != self.cfg.dns:
                log.warning("reload_dns_settings_need_restart")
            self.engine.apply(self._state(baked), reason="sighup")
            self.baked = baked
        except EgressdError as e:
            log.error("reload_refused", error=str(e), generation=self.engine.generation)
        self.notifier.notify(ready=1, status=self._status_text())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL)
            self.engine.expire()
            self.notifier.notify(status=self._status_text())

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify(watchdog=1)
            await asyncio.sleep(interval)


def run(config_path: str | Path) -> int:
    baked = load_baked(config_path)
    setup_logging(baked.config.log.level)
    return asyncio.run(Daemon(config_path, baked).run())
