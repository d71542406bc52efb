"""``egress-collector``: run the log collector (HTTP API over a DuckDB file) in the foreground.

Exit codes: 0 after SIGTERM/SIGINT, 2 on bad arguments, an unusable database or a taken port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

import structlog
from aiohttp import web

from egressd import __version__
from egressd.collector.app import DEFAULT_MAX_BODY, DEFAULT_MAX_SQL_ROWS, make_app
from egressd.collector.store import Store, StoreError
from egressd.httplog import server_logger

DEFAULT_LISTEN = "127.0.0.1:9180"
DEFAULT_DB = "/var/lib/egressd/outbound_network.duckdb"

log = structlog.get_logger("egressd.collector")


class UsageError(Exception):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` to ``(host, port)``; port 0 picks a free one."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT (for example 127.0.0.1:9180)")
    return host, int(port)


def configure_logging(level: str, *, json_output: bool | None = None) -> None:
    """structlog to stdout: JSON lines for journald and pipes, colours on a terminal."""
    if json_output is None:
        json_output = not sys.stdout.isatty()
    renderer = (structlog.processors.JSONRenderer() if json_output
                else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egress-collector",
                                description="Store egressd denial events and answer queries.")
    p.add_argument("--version", action="version", version=f"egress-collector {__version__}")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve HTTP on (default {DEFAULT_LISTEN})")
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                   help=f"DuckDB database file (default {DEFAULT_DB})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help="largest accepted request body (default 16 MiB)")
    p.add_argument("--max-sql-rows", type=int, default=DEFAULT_MAX_SQL_ROWS, metavar="N",
                   help="most rows one SQL answer returns (default 10000)")
    p.add_argument("--sql-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="cancel a SQL query after this long (default 10)")
    p.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit (default 1GB)")
    return p


def _fail(message: str) -> int:
    log.error("collector.startup_failed", error=message)
    print(f"egress-collector: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        host, port = parse_listen(args.listen)
        if args.max_body < 1 or args.max_sql_rows < 1 or args.sql_timeout <= 0:
            raise UsageError("--max-body, --max-sql-rows and --sql-timeout must be positive")
    except UsageError as exc:
        return _fail(str(exc))
    db = Path(args.db)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create {db.parent}: {exc.strerror or exc}")
    try:
        store = Store(db, memory_limit=args.memory_limit, sql_timeout=args.sql_timeout)
    except StoreError as exc:
        return _fail(str(exc))
    try:
        return asyncio.run(_serve(store, host, port, args))
    except KeyboardInterrupt:
        return 0
    finally:
        store.close()
        log.info("collector.stopped")


async def _serve(store: Store, host: str, port: int, args: argparse.Namespace) -> int:
    app = make_app(store, max_body=args.max_body, max_sql_rows=args.max_sql_rows)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10,
                            logger=server_logger("egressd.collector.http"))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            return _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bound = runner.addresses[0]
        log.info("collector.listening", host=bound[0], port=bound[1], db=str(store.path))
        await stop.wait()
        log.info("collector.stopping")
    finally:
        await runner.cleanup()  # finishes in-flight requests before the store closes
    return 0


if __name__ == "__main__":
    sys.exit(main())
