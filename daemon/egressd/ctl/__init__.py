"""egressctl: the admin and operator CLI, a client of egressd's API and of egress-collector.

Data flow::

    argv ──commands.build_parser──▶ handler(Context)
                                      │ client.DaemonClient ──HTTP over unix socket (or TCP + bearer)──▶ egressd
                                      │ client.CollectorClient ──HTTP──▶ egress-collector
                                      ▼
                                   render (tables, key: value) or the server's JSON (--json)

Exit codes: 0 success; 1 the server refused (``error_code: message`` on stderr);
2 usage errors, unreadable input files and connection errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from . import commands
from .client import (DEFAULT_SOCKET, CollectorClient, DaemonClient, Endpoint, HttpClient, Refused,
                     Unreachable, read_token)
from .commands import Context, UsageError, build_parser

__all__ = ["main"]


def _endpoints(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Endpoint, Endpoint]:
    """The daemon and collector endpoints the global options name; usage errors exit 2."""
    if args.token_file and not args.url:
        parser.error("--token-file goes with --url (the unix socket needs no token)")
    try:
        if args.url:
            token = read_token(args.token_file) if args.token_file else None
            daemon = Endpoint.daemon_url(args.url, token)
        else:
            daemon = Endpoint.daemon_socket(args.socket or DEFAULT_SOCKET)
        collector = Endpoint.collector(args.collector)
    except ValueError as exc:
        parser.error(str(exc))
    return daemon, collector


async def _run(args: argparse.Namespace, daemon: Endpoint, collector: Endpoint) -> int:
    endpoint, cls = (collector, CollectorClient) if args.service == "collector" else (daemon, DaemonClient)
    client: HttpClient = cls(endpoint, args.timeout)
    async with client:
        ctx = Context(args=args,
                      daemon=client if isinstance(client, DaemonClient) else None,
                      collector=client if isinstance(client, CollectorClient) else None,
                      out=sys.stdout, err=sys.stderr)
        return await args.handler(ctx)


def main(argv: list[str] | None = None) -> int:
    """Run egressctl with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        daemon, collector = _endpoints(args, parser)
    except SystemExit as exc:  # argparse: usage errors (2), --help (0)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return asyncio.run(_run(args, daemon, collector))
    except UsageError as exc:
        print(f"egressctl: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"egressctl: {exc.error_code}: {exc.message}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"egressctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is how logs --follow ends: a success. Anywhere else it is an interruption.
        return 0 if args.handler is commands.logs and args.follow else 130
    except BrokenPipeError:
        # The reader went away (egressctl logs | head): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
