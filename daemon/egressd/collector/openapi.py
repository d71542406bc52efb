"""The OpenAPI 3.0 document of egress-collector's HTTP API (SPEC section 7), served at
``GET /v1/openapi.json``. Keep it true to app.py: tests/unit/test_collector.py checks that every
route here exists there and the other way round.

The event schema follows ``core.events.event_from_json``: every column of
``system.access.outbound_network``; which struct a ``destination_type`` carries is checked by
the server (the schema cannot say it without ``oneOf`` gymnastics)."""

from __future__ import annotations

from egressd.collector.sqlguard import MAX_QUERY_CHARS
from egressd.core.events import ACCESS_TYPES, DESTINATION_TYPES, MAX_TEXT, PRODUCTS

_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
_OPT_TEXT = {"type": "string", "maxLength": MAX_TEXT, "nullable": True}
_IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}

_EVENT = {
    "type": "object",
    "required": ["account_id", "workspace_id", "event_id", "destination_type", "destination",
                 "event_time", "access_type"],
    "additionalProperties": False,
    "properties": {
        "account_id": _TEXT,
        "workspace_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"},
        "event_id": {"type": "string", "format": "uuid",
                     "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
                     "description": "inserting the same id twice stores one row"},
        "destination_type": {"type": "string", "enum": list(DESTINATION_TYPES)},
        "destination": _TEXT,
        "dns_event": {
            "type": "object", "nullable": True, "additionalProperties": False,
            "required": ["domain_name", "rcode"],
            "properties": {"domain_name": _TEXT, "rcode": {"type": "integer", "minimum": 0, "maximum": 4095}},
        },
        "storage_event": {
            "type": "object", "nullable": True, "additionalProperties": False,
            "required": ["hostname"],
            "properties": {"hostname": _TEXT, "path": _OPT_TEXT, "rejection_reason": _OPT_TEXT},
        },
        "event_time": {"type": "string", "format": "date-time", "description": "ISO-8601 with a zone, e.g. 2024-05-01T12:00:00.123Z"},
        "access_type": {"type": "string", "enum": list(ACCESS_TYPES)},
        "network_source_type": {"type": "string", "enum": list(PRODUCTS), "nullable": True},
        "ip_event": {
            "type": "object", "nullable": True, "additionalProperties": False,
            "required": ["source_ip", "destination_ip", "protocol"],
            "properties": {
                "source_ip": _IP, "destination_ip": _IP, "protocol": _TEXT,
                "destination_port": {"type": "integer", "minimum": 0, "maximum": 65535, "nullable": True},
            },
        },
        "workload_id": _OPT_TEXT,
        "network_policy_id": _OPT_TEXT,
        "node": _OPT_TEXT,
    },
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error_code", "message"],
        "properties": {
            "error_code": {"type": "string", "enum": [
                "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_CONFLICT",
                "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL_ERROR"]},
            "message": {"type": "string"},
        },
    },
    "Event": _EVENT,
    "InsertResult": {
        "type": "object",
        "required": ["accepted", "inserted"],
        "properties": {"accepted": {"type": "integer", "minimum": 0}, "inserted": {"type": "integer", "minimum": 0}},
    },
    "Events": {
        "type": "object",
        "required": ["events"],
        "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}},
    },
    "SqlRequest": {
        "type": "object",
        "required": ["query"],
        "additionalProperties": False,
        "properties": {"query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS, "pattern": "\\S",
                                 "description": "one read-only Spark SQL SELECT over system.access.outbound_network"}},
    },
    "SqlResult": {
        "type": "object",
        "required": ["columns", "rows", "truncated"],
        "properties": {
            "columns": {"type": "array", "items": {"type": "string"}},
            "rows": {"type": "array", "items": {"type": "array", "items": {}}},
            "truncated": {"type": "boolean"},
        },
    },
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json("error", _ref("Error"))


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def openapi_document(version: str) -> dict:
    """The document, for this collector ``version``."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "egress-collector API", "version": version},
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "store a batch of events; answers once they are durable (idempotent by event_id)",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "array", "items": _ref("Event")}}}},
                    "responses": {"200": _json("stored", _ref("InsertResult")), "400": _ERROR,
                                  "413": _ERROR, "500": _ERROR},
                },
                "get": {
                    "summary": "events, newest first",
                    "parameters": [
                        _query("since", {"type": "string"}, "ISO-8601 timestamp or a duration such as 2h, 30m, 45s, 1d"),
                        _query("access_type", {"type": "string", "enum": list(ACCESS_TYPES)}, "filter"),
                        _query("workspace_id", {"type": "string"}, "filter"),
                        _query("destination_type", {"type": "string", "enum": list(DESTINATION_TYPES)}, "filter"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "at most this many (default 100)"),
                    ],
                    "responses": {"200": _json("events", _ref("Events")), "400": _ERROR, "500": _ERROR},
                },
            },
            "/v1/sql": {
                "post": {
                    "summary": "run one read-only Spark SQL query, translated for DuckDB",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SqlRequest")}}},
                    "responses": {"200": _json("columns and rows", _ref("SqlResult")), "400": _ERROR,
                                  "413": _ERROR, "500": _ERROR},
                },
            },
            "/healthz": {
                "get": {
                    "summary": "the database answers",
                    "responses": {"200": _json("healthy", {"type": "object", "required": ["status"],
                                                           "properties": {"status": {"type": "string", "enum": ["ok"]}}}),
                                  "500": _ERROR},
                },
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
                },
            },
            "/v1/openapi.json": {
                "get": {"summary": "this document", "responses": {"200": _json("OpenAPI 3.0 document", {"type": "object"})}},
            },
        },
        "components": {"schemas": SCHEMAS},
    }
