"""egressctl's command line: the argument parser and one handler per subcommand.

A handler maps its arguments to client calls (``client.py``) and prints the answer, either through
``render.py`` or, with ``--json``, as the server's JSON. Handlers return the exit code; failures
travel as exceptions (``UsageError`` here, ``Refused``/``Unreachable`` from the client) and become
exit codes in ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from .. import __version__
from . import render
from .client import DEFAULT_COLLECTOR, DEFAULT_SOCKET, CollectorClient, DaemonClient, Unreachable

PRODUCTS = ("DBSQL", "ML_SERVING", "GENERAL_COMPUTE", "ML_BUILD", "APPS")
ACCESS_TYPES = ("DROP", "LOG_ONLY_DENIAL")
DESTINATION_TYPES = ("DNS", "IP", "STORAGE")

POLL_INTERVAL = 1.0                      # logs --follow: seconds between polls
FOLLOW_LOOKBACK = timedelta(seconds=10)  # re-ask this far behind the newest event, for late arrivals
FOLLOW_LIMIT = 1000                      # events per follow poll unless --limit says otherwise
sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests replace it


class UsageError(Exception):
    """Bad input that argparse cannot see (an unreadable or invalid file). Exit code 2."""


@dataclass
class Context:
    """What a handler works with: its parsed arguments, a connected client, where to print."""

    args: argparse.Namespace
    daemon: DaemonClient | None
    collector: CollectorClient | None
    out: TextIO
    err: TextIO

    def emit(self, data: Any, human: Callable[[], str]) -> None:
        """Print the answer: as JSON with ``--json`` (nothing for an empty answer), else ``human()``."""
        if self.args.json:
            if data is not None:
                print(render.pretty_json(data), file=self.out)
            return
        text = human()
        if text:
            print(text, file=self.out)

    @property
    def api(self) -> DaemonClient:
        assert self.daemon is not None
        return self.daemon

    @property
    def logs(self) -> CollectorClient:
        assert self.collector is not None
        return self.collector


Handler = Callable[[Context], Awaitable[int]]


# -- input files -----------------------------------------------------------------------------

def read_json_object(path: str, id_key: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (``-`` is stdin). With ``id_key``, it must name a non-empty string id."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a JSON object")
    if id_key is not None and (not isinstance(doc.get(id_key), str) or not doc[id_key]):
        raise UsageError(f"{where}: {id_key} is missing (it names the object to create or replace)")
    return doc


# -- handlers --------------------------------------------------------------------------------

async def policies_list(ctx: Context) -> int:
    doc = await ctx.api.list_policies()
    ctx.emit(doc, lambda: render.policies_table(doc))
    return 0


async def policies_get(ctx: Context) -> int:
    doc = await ctx.api.get_policy(ctx.args.id)
    ctx.emit(doc, lambda: render.policy_detail(doc))
    return 0


async def policies_put(ctx: Context) -> int:
    policy = read_json_object(ctx.args.file, "network_policy_id")
    doc, created = await ctx.api.put_policy(policy)
    pid = render.clean(policy["network_policy_id"])
    ctx.emit(doc, lambda: f"policy {pid} {'created' if created else 'saved'}")
    return 0


async def policies_delete(ctx: Context) -> int:
    doc = await ctx.api.delete_policy(ctx.args.id)
    ctx.emit(doc, lambda: f"policy {render.clean(ctx.args.id)} deleted")
    return 0


async def workspaces_list(ctx: Context) -> int:
    doc = await ctx.api.list_workspaces()
    ctx.emit(doc, lambda: render.workspaces_table(doc))
    return 0


async def workspaces_get(ctx: Context) -> int:
    doc = await ctx.api.get_workspace(ctx.args.ws)
    ctx.emit(doc, lambda: render.key_values(doc))
    return 0


async def workspaces_assign(ctx: Context) -> int:
    a = ctx.args
    doc = await ctx.api.assign(a.ws, a.policy_id)
    ctx.emit(doc, lambda: f"workspace {render.clean(a.ws)} now uses network policy {render.clean(a.policy_id)}")
    return 0


async def workloads_list(ctx: Context) -> int:
    doc = await ctx.api.list_workloads()
    ctx.emit(doc, lambda: render.workloads_table(doc))
    return 0


async def workloads_get(ctx: Context) -> int:
    doc = await ctx.api.get_workload(ctx.args.id)
    ctx.emit(doc, lambda: render.key_values(doc))
    return 0


async def workloads_put(ctx: Context) -> int:
    workload = read_json_object(ctx.args.file, "workload_id")
    doc = await ctx.api.put_workload(workload)
    ctx.emit(doc, lambda: f"workload {render.clean(workload['workload_id'])} saved")
    return 0


async def workloads_delete(ctx: Context) -> int:
    doc = await ctx.api.delete_workload(ctx.args.id)
    ctx.emit(doc, lambda: f"workload {render.clean(ctx.args.id)} deleted")
    return 0


async def connections_get(ctx: Context) -> int:
    doc = await ctx.api.get_connections(ctx.args.ws)
    ctx.emit(doc, lambda: render.connections(doc))
    return 0


async def connections_put(ctx: Context) -> int:
    body = read_json_object(ctx.args.file)
    doc = await ctx.api.put_connections(ctx.args.ws, body)
    n_conn = len(body.get("connections") or [])
    n_loc = len(body.get("external_locations") or [])
    ctx.emit(doc, lambda: f"connections of workspace {render.clean(ctx.args.ws)} saved "
                          f"({n_conn} connections, {n_loc} external locations)")
    return 0


async def verify(ctx: Context) -> int:
    a = ctx.args
    doc = await ctx.api.verify(a.workspace, a.product, a.destination)
    ctx.emit(doc, lambda: render.verdict(doc, a.destination))
    return 0


async def status(ctx: Context) -> int:
    doc = await ctx.api.status()
    ctx.emit(doc, lambda: render.key_values(doc))
    return 0


def event_params(args: argparse.Namespace) -> dict[str, str]:
    """The collector's ``GET /v1/events`` query parameters for the ``logs`` filters given."""
    pairs = {"since": args.since, "access_type": args.access_type, "workspace_id": args.workspace,
             "destination_type": args.destination_type, "limit": args.limit}
    return {k: str(v) for k, v in pairs.items() if v is not None}


async def logs(ctx: Context) -> int:
    if ctx.args.follow:
        return await follow(ctx)
    doc = await ctx.logs.events(event_params(ctx.args))
    events = [e for e in render.items_of(doc, "events") if isinstance(e, dict)]
    if ctx.args.json:
        ctx.emit(doc, str)
    elif events:
        print(render.events_table(events[::-1]), file=ctx.out)
    else:
        print("no events", file=ctx.err)
    return 0


def _event_time(event: dict[str, Any]) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(event.get("event_time")))
    except ValueError:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _iso_ms(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _event_key(event: dict[str, Any]) -> str:
    eid = event.get("event_id")
    return eid if isinstance(eid, str) and eid else render.compact_json(event)


async def follow(ctx: Context) -> int:
    """Poll the collector every second and print each event once, oldest first, until Ctrl-C.

    After the first answer it asks for ``since`` = the newest event time seen minus
    ``FOLLOW_LOOKBACK`` (events the daemon delivers a little late are still caught) and skips the
    event ids it already printed. With ``--json`` each event is one line of JSON.
    """
    base = event_params(ctx.args)
    printer = render.GrowingTable(render.EVENT_HEADERS)
    seen: dict[str, datetime | None] = {}
    newest: datetime | None = None
    first, failing = True, False
    while True:
        if not first:
            await sleep(POLL_INTERVAL)
        params = dict(base)
        if newest is not None:
            params["since"] = _iso_ms(newest - FOLLOW_LOOKBACK)
            params["limit"] = str(ctx.args.limit or FOLLOW_LIMIT)
        try:
            doc = await ctx.logs.events(params)
        except Unreachable as exc:
            if first:
                raise
            if not failing:
                print(f"egressctl: {exc}; retrying every {POLL_INTERVAL:g} s", file=ctx.err, flush=True)
            failing = True
            continue
        if failing:
            print("egressctl: collector reachable again", file=ctx.err, flush=True)
        first, failing = False, False
        fresh = []
        for event in reversed(render.items_of(doc, "events")):
            if not isinstance(event, dict) or _event_key(event) in seen:
                continue
            t = _event_time(event)
            seen[_event_key(event)] = t
            if t is not None and (newest is None or t > newest):
                newest = t
            fresh.append(event)
        if newest is not None:
            cutoff = newest - FOLLOW_LOOKBACK - timedelta(seconds=1)
            seen = {k: t for k, t in seen.items() if t is None or t >= cutoff}
        if ctx.args.json:
            lines = [render.compact_json(e) for e in fresh]
        else:
            lines = printer.lines([render.event_row(e) for e in fresh])
        if lines:
            print("\n".join(lines), file=ctx.out, flush=True)


async def logs_sql(ctx: Context) -> int:
    doc = await ctx.logs.sql(ctx.args.query)
    ctx.emit(doc, lambda: _sql_text(doc))
    if not ctx.args.json and isinstance(doc, dict) and doc.get("truncated"):
        print(f"egressctl: the collector cut the answer at {len(doc.get('rows') or [])} rows", file=ctx.err)
    return 0


def _sql_text(doc: Any) -> str:
    rows = len(doc.get("rows") or []) if isinstance(doc, dict) else 0
    body = render.sql_table(doc)
    return f"{body}\n({rows} row{'' if rows == 1 else 's'})" if body else f"({rows} rows)"


# -- parser ----------------------------------------------------------------------------------

def _text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < n <= 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400")
    return n


def _json_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a --json given before the subcommand is not reset by the subcommand's default.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the server's JSON answer instead of human output")


def _group(sub: Any, name: str, help: str) -> Any:
    p = sub.add_parser(name, help=help, description=help)
    _json_flag(p)
    return p.add_subparsers(dest=f"{name}_cmd", required=True, metavar="COMMAND")


def _leaf(sub: Any, name: str, help: str, handler: Handler, service: str = "daemon",
          description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help)
    _json_flag(p)
    p.set_defaults(handler=handler, service=service)
    return p


VERIFY_DESCRIPTION = """Ask the daemon what it would do with a connection from a workload of WS to
DESTINATION (a name, an IP address or a URL). Prints the verdict (ALLOW, DROP or LOG_ONLY_DENIAL),
the network policy and the reason. The exit code is 0 whatever the verdict: it says the question was
answered, not that the destination is allowed (use --json and read "verdict" in scripts)."""

LOGS_DESCRIPTION = """Show denial events from egress-collector, oldest first. --since takes a duration
(45s, 30m, 2h, 1d) or an ISO-8601 timestamp. --follow keeps polling every second and prints each new
event once (one JSON object a line with --json) until Ctrl-C. "logs sql QUERY" runs a read-only
Spark SQL query on system.access.outbound_network."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egressctl", description="Admin and operator CLI of egressd and egress-collector.",
        epilog="Exit codes: 0 success, 1 the server refused (its error is printed), "
               "2 usage or connection error.")
    p.add_argument("--version", action="version", version=f"egressctl {__version__}")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--socket", metavar="PATH",
                        help=f"daemon API unix socket (default {DEFAULT_SOCKET})")
    target.add_argument("--url", metavar="URL", help="daemon API over TCP, e.g. http://127.0.0.1:9181")
    p.add_argument("--token-file", metavar="F", help="bearer token for --url (the file's content, stripped)")
    p.add_argument("--collector", metavar="URL", default=DEFAULT_COLLECTOR,
                   help=f"egress-collector URL (default {DEFAULT_COLLECTOR})")
    p.add_argument("--json", action="store_true", default=False,
                   help="print the server's JSON answer instead of human output")
    p.add_argument("--timeout", metavar="S", type=_seconds, default=10.0,
                   help="seconds to wait for each answer (default 10)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = _group(sub, "policies", "network policies")
    _leaf(g, "list", "list policies", policies_list)
    _leaf(g, "get", "show one policy and where it came from", policies_get).add_argument("id", type=_text)
    _leaf(g, "put", "create or replace the policy the file names (network_policy_id)",
          policies_put).add_argument("file", metavar="FILE.json", help="policy JSON; - reads stdin")
    _leaf(g, "delete", "delete a policy", policies_delete).add_argument("id", type=_text)

    g = _group(sub, "workspaces", "workspaces and their policy bindings")
    _leaf(g, "list", "list known workspaces", workspaces_list)
    _leaf(g, "get", "show a workspace's policy binding", workspaces_get).add_argument("ws", type=_text)
    a = _leaf(g, "assign", "bind a workspace to a policy", workspaces_assign)
    a.add_argument("ws", type=_text)
    a.add_argument("policy_id", type=_text)

    g = _group(sub, "workloads", "workloads (traffic sources) on this node")
    _leaf(g, "list", "list workloads", workloads_list)
    _leaf(g, "get", "show one workload", workloads_get).add_argument("id", type=_text)
    _leaf(g, "put", "create or replace the workload the file names (workload_id)",
          workloads_put).add_argument("file", metavar="FILE.json", help="workload JSON; - reads stdin")
    _leaf(g, "delete", "delete a workload", workloads_delete).add_argument("id", type=_text)

    g = _group(sub, "connections", "a workspace's connections and external locations")
    _leaf(g, "get", "show a workspace's connections", connections_get).add_argument("ws", type=_text)
    c = _leaf(g, "put", "replace a workspace's connections", connections_put)
    c.add_argument("ws", type=_text)
    c.add_argument("file", metavar="FILE.json", help='{"connections": [...], "external_locations": [...]}; - reads stdin')

    v = _leaf(sub, "verify", "say what the policy does with a destination", verify,
              description=VERIFY_DESCRIPTION)
    v.add_argument("--workspace", metavar="WS", required=True, type=_text)
    v.add_argument("--product", choices=PRODUCTS, default="GENERAL_COMPUTE",
                   help="the workload's product (default GENERAL_COMPUTE)")
    v.add_argument("destination", metavar="DESTINATION", type=_text, help="name, IP address or URL")

    _leaf(sub, "status", "show the daemon's status", status)

    lg = _leaf(sub, "logs", "show denial events from the collector", logs, "collector",
               description=LOGS_DESCRIPTION)
    lg.usage = ("%(prog)s [--since WHEN] [--access-type T] [--workspace WS] [--destination-type T] "
                "[--limit N] [--follow] [--json]\n       %(prog)s sql QUERY [--json]")
    lg.add_argument("--since", metavar="WHEN", type=_text, help="2h, 30m or an ISO-8601 timestamp")
    lg.add_argument("--access-type", choices=ACCESS_TYPES)
    lg.add_argument("--workspace", metavar="WS", type=_text)
    lg.add_argument("--destination-type", choices=DESTINATION_TYPES)
    lg.add_argument("--limit", metavar="N", type=_positive_int, help="at most N events")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    lsub = lg.add_subparsers(dest="logs_cmd", metavar="sql")
    _leaf(lsub, "sql", "run a read-only SQL query on system.access.outbound_network", logs_sql,
          "collector").add_argument("query", metavar="QUERY", type=_text)
    return p
