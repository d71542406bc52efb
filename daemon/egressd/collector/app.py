"""The collector's HTTP API (SPEC section 7), an aiohttp application over a ``Store``.

    POST /v1/events  JSON array --validate all--> Store.insert (one transaction) --> 200 when durable
    GET  /v1/events  filters --> Store.query_events --> {"events": [...]} newest first
    POST /v1/sql     {"query"} --sqlguard.translate--> Store.run_sql (read-only) --> columns + rows
    GET  /healthz, GET /metrics, GET /v1/openapi.json (collector/openapi.py)

Every error answer is ``{"error_code", "message"}``; status codes are chosen here only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import time
import uuid
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from egressd import __version__
from egressd.collector import sqlguard
from egressd.collector.openapi import openapi_document
from egressd.collector.store import Store
from egressd.core.events import (
    ACCESS_TYPES,
    DESTINATION_TYPES,
    event_to_json,
    events_from_json,
    format_time,
    parse_time,
)
from egressd.errors import EgressdError, ValidationError

log = structlog.get_logger("egressd.collector")

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_SQL_ROWS = 10_000
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
# Bodies above this size are decoded and validated off the event loop.
_INLINE_BODY = 256 * 1024

STORE_KEY = web.AppKey("store", Store)
METRICS_KEY: web.AppKey["Metrics"] = web.AppKey("metrics")
LIMITS_KEY: web.AppKey[dict] = web.AppKey("limits")


# -- metrics ---------------------------------------------------------------------------------

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The collector's counters, rendered in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.events_received = 0
        self.events_inserted = 0
        self.events_duplicate = 0
        self.batches_rejected = 0
        self.sql_queries: dict[str, int] = {"ok": 0, "refused": 0, "error": 0}
        self.requests: dict[tuple[str, str, int], int] = {}
        self._bucket_counts = [0] * len(_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe_insert(self, seconds: float) -> None:
        self._latency_sum += seconds
        self._latency_count += 1
        for i, bound in enumerate(_BUCKETS):
            if seconds <= bound:
                self._bucket_counts[i] += 1

    def render(self) -> str:
        p = "egress_collector_"
        lines: list[str] = []

        def counter(name: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {p}{name} {help_}")
            lines.append(f"# TYPE {p}{name} counter")
            lines.extend(f"{p}{name}{labels} {_num(v)}" for labels, v in samples)

        counter("events_received_total", "Events in valid POST /v1/events batches.",
                [("", self.events_received)])
        counter("events_inserted_total", "Events stored (new event ids).",
                [("", self.events_inserted)])
        counter("events_duplicate_total", "Events skipped because their event_id was already stored.",
                [("", self.events_duplicate)])
        counter("batches_rejected_total", "POST /v1/events batches refused (invalid or too large).",
                [("", self.batches_rejected)])
        counter("sql_queries_total", "POST /v1/sql queries by result.",
                [(f'{{result="{k}"}}', v) for k, v in sorted(self.sql_queries.items())])
        counter("http_requests_total", "HTTP requests by method, route and status code.",
                [(f'{{method="{m}",route="{_label(r)}",code="{c}"}}', v)
                 for (m, r, c), v in sorted(self.requests.items())])
        name = f"{p}insert_duration_seconds"
        lines.append(f"# HELP {name} Time to store one batch durably.")
        lines.append(f"# TYPE {name} histogram")
        for bound, count in zip(_BUCKETS, self._bucket_counts):
            lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self._latency_count}')
        lines.append(f"{name}_sum {_num(self._latency_sum)}")
        lines.append(f"{name}_count {self._latency_count}")
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- pure helpers ----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d{1,9})(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime) -> datetime:
    """``since``: an ISO-8601 timestamp (no zone means UTC) or a duration before ``now``
    such as ``45s``, ``30m``, ``2h``, ``1d``, ``1w``. Raises ``ValidationError``."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m:
        try:
            return now - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:
            raise ValidationError(f"since: {text!r} is too far back") from None
    try:
        return parse_time(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
        return parse_time(t.replace(tzinfo=timezone.utc).isoformat())
    except (ValueError, OverflowError):
        raise ValidationError(
            f"since: {text!r} is neither an ISO-8601 timestamp nor a duration like 2h, 30m, 45s, 1d"
        ) from None


def json_value(v: Any) -> Any:
    """A DuckDB result value as a JSON-safe value (structs as objects, times as ISO UTC ``Z``)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, datetime):
        t = v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)
        if t.microsecond % 1000 == 0:
            return format_time(t)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(v, (date, dtime)):
        return v.isoformat()
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [json_value(x) for x in v]
    return str(v)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"body is not valid JSON: {exc}") from None


def _decode_events(body: bytes) -> list:
    return events_from_json(_decode_json(body))


# -- middleware ------------------------------------------------------------------------------

_HTTP_CODES = {404: "RESOURCE_DOES_NOT_EXIST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
               409: "RESOURCE_CONFLICT"}


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except ValidationError as exc:
        response = _error(400, exc.error_code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            message = f"request body is larger than {request.app[LIMITS_KEY]['max_body']} bytes"
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        else:
            message = exc.reason
        response = _error(exc.status, _HTTP_CODES.get(exc.status, "INVALID_PARAMETER_VALUE"
                                                      if exc.status < 500 else "INTERNAL_ERROR"),
                          message)
        allowed = getattr(exc, "allowed_methods", None) if exc.status == 405 else None
        if allowed:  # RFC 9110: a 405 names the methods the resource has
            response.headers["Allow"] = ", ".join(sorted(allowed))
    except EgressdError as exc:
        log.error("collector.request_failed", path=request.path, error=str(exc))
        response = _error(500, exc.error_code, str(exc))
    except Exception as exc:  # noqa: BLE001 - the API edge: never leak a traceback page
        log.exception("collector.request_crashed", path=request.path)
        response = _error(500, "INTERNAL_ERROR", f"internal error: {type(exc).__name__}")
    key = (request.method, route_name, response.status)
    metrics.requests[key] = metrics.requests.get(key, 0) + 1
    return response


# -- handlers --------------------------------------------------------------------------------

async def post_events(request: web.Request) -> web.Response:
    store, metrics = request.app[STORE_KEY], request.app[METRICS_KEY]
    try:
        body = await request.read()
        if len(body) > _INLINE_BODY:
            events = await asyncio.to_thread(_decode_events, body)
        else:
            events = _decode_events(body)
    except (ValidationError, web.HTTPRequestEntityTooLarge) as exc:
        metrics.batches_rejected += 1
        log.warning("collector.batch_rejected", error=str(exc)[:500], bytes=request.content_length)
        raise
    metrics.events_received += len(events)
    started = time.perf_counter()
    result = await store.insert(events)
    elapsed = time.perf_counter() - started
    metrics.observe_insert(elapsed)
    metrics.events_inserted += result.inserted
    metrics.events_duplicate += result.duplicates
    log.debug("collector.batch_stored", accepted=result.accepted, inserted=result.inserted,
              ms=round(elapsed * 1000, 2))
    return web.json_response({"accepted": result.accepted, "inserted": result.inserted})


_EVENT_FILTERS = ("since", "access_type", "workspace_id", "destination_type", "limit")


async def get_events(request: web.Request) -> web.Response:
    q = request.query
    for key in q:
        if key not in _EVENT_FILTERS:
            raise ValidationError(f"{key}: unknown parameter (known: {', '.join(_EVENT_FILTERS)})")
    for key in q:
        if len(q.getall(key)) > 1:
            raise ValidationError(f"{key}: given more than once")
    since = parse_since(q["since"], datetime.now(timezone.utc)) if "since" in q else None
    access_type = q.get("access_type")
    if access_type is not None and access_type not in ACCESS_TYPES:
        raise ValidationError(f"access_type: {access_type!r} is not one of {', '.join(ACCESS_TYPES)}")
    destination_type = q.get("destination_type")
    if destination_type is not None and destination_type not in DESTINATION_TYPES:
        raise ValidationError(
            f"destination_type: {destination_type!r} is not one of {', '.join(DESTINATION_TYPES)}")
    limit = DEFAULT_LIMIT
    if "limit" in q:
        if not re.fullmatch(r"\d{1,6}", q["limit"]) or not 1 <= int(q["limit"]) <= MAX_LIMIT:
            raise ValidationError(f"limit: {q['limit']!r} is not an integer in 1..{MAX_LIMIT}")
        limit = int(q["limit"])
    events = await request.app[STORE_KEY].query_events(
        since=since, access_type=access_type, workspace_id=q.get("workspace_id"),
        destination_type=destination_type, limit=limit)
    return web.json_response({"events": [event_to_json(e) for e in events]})


async def post_sql(request: web.Request) -> web.Response:
    store, metrics = request.app[STORE_KEY], request.app[METRICS_KEY]
    max_rows = request.app[LIMITS_KEY]["max_sql_rows"]
    query: Any = None
    try:
        doc = _decode_json(await request.read())
        if not isinstance(doc, dict):
            raise ValidationError('body: expected an object {"query": "..."}')
        for key in doc:
            if key != "query":
                raise ValidationError(f"{key}: unknown field")
        query = doc.get("query")
        if not isinstance(query, str):
            raise ValidationError("query: is required and must be a string")
        # One extra row tells whether the answer was cut at max_rows.
        sql = sqlguard.translate(query, max_rows + 1)
        columns, rows = await store.run_sql(sql, max_rows + 1)
    except ValidationError as exc:
        metrics.sql_queries["refused"] += 1
        log.info("collector.sql_refused", error=str(exc)[:500], query=str(query)[:500])
        raise
    except Exception:
        metrics.sql_queries["error"] += 1
        raise
    metrics.sql_queries["ok"] += 1
    log.debug("collector.sql", query=query[:500], rows=len(rows))
    truncated = len(rows) > max_rows
    return web.json_response({
        "columns": columns,
        "rows": [[json_value(v) for v in row] for row in rows[:max_rows]],
        "truncated": truncated,
    })


async def healthz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[STORE_KEY].ping(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return _error(500, "INTERNAL_ERROR", f"database does not answer: {exc or type(exc).__name__}")
    return web.json_response({"status": "ok"})


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render().encode("utf-8"),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def make_app(store: Store, *, max_body: int = DEFAULT_MAX_BODY,
             max_sql_rows: int = DEFAULT_MAX_SQL_ROWS) -> web.Application:
    """The collector application over an open ``store``. The caller owns the store."""
    app = web.Application(client_max_size=max_body, middlewares=[_errors])
    app[STORE_KEY] = store
    app[METRICS_KEY] = Metrics()
    app[LIMITS_KEY] = {"max_body": max_body, "max_sql_rows": max_sql_rows}
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/events", get_events)
    app.router.add_post("/v1/sql", post_sql)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/v1/openapi.json", get_openapi)
    return app
