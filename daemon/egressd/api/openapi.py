"""The OpenAPI 3.0 document of the daemon API, served at /api/2.0/openapi.json. Keep it true to
server.py: tests/unit/test_api.py checks that every route here exists there and the other way round."""

from __future__ import annotations

ID = {"type": "string", "pattern": "^[a-zA-Z0-9_.-]{1,32}$"}
WS_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
PRODUCT = {"type": "string", "enum": ["DBSQL", "ML_SERVING", "GENERAL_COMPUTE", "ML_BUILD", "APPS"]}

_DEST = {
    "type": "object",
    "required": ["destination"],
    "properties": {
        "destination": {"type": "string"},
        "internet_destination_type": {"type": "string", "enum": ["DNS_NAME", "IP_RANGE"]},
    },
    "additionalProperties": False,
}
_STORAGE = {
    "type": "object",
    "required": ["storage_destination_type"],
    "properties": {
        "storage_destination_type": {"type": "string", "enum": ["AWS_S3", "AZURE_STORAGE", "GOOGLE_CLOUD_STORAGE"]},
        "bucket_name": {"type": "string"},
        "region": {"type": "string"},
        "azure_storage_account": {"type": "string"},
        "azure_storage_service": {"type": "string", "enum": ["dfs", "blob"]},
    },
    "additionalProperties": False,
}
SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error_code", "message"],
        "properties": {
            "error_code": {"type": "string", "enum": [
                "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                "RESOURCE_CONFLICT", "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL_ERROR"]},
            "message": {"type": "string"},
        },
    },
    "AccountNetworkPolicy": {
        "type": "object",
        "required": ["network_policy_id"],
        "properties": {
            "network_policy_id": ID,
            "source": {"type": "string", "enum": ["image", "api"], "description": "read-only: where the object came from"},
            "egress": {
                "type": "object",
                "properties": {
                    "network_access": {
                        "type": "object",
                        "required": ["restriction_mode"],
                        "properties": {
                            "restriction_mode": {"type": "string", "enum": ["FULL_ACCESS", "RESTRICTED_ACCESS"]},
                            "allowed_internet_destinations": {"type": "array", "items": _DEST},
                            "blocked_internet_destinations": {"type": "array", "items": _DEST},
                            "allowed_storage_destinations": {"type": "array", "items": _STORAGE},
                            "policy_enforcement": {
                                "type": "object",
                                "properties": {
                                    "enforcement_mode": {"type": "string", "enum": ["ENFORCED", "DRY_RUN"]},
                                    "dry_run_mode_product_filter": {"type": "array", "items": PRODUCT},
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    "WorkspaceNetwork": {
        "type": "object",
        "required": ["network_policy_id"],
        "properties": {"workspace_id": WS_ID, "network_policy_id": ID},
    },
    "Workload": {
        "type": "object",
        "required": ["workspace_id", "product", "sources"],
        "properties": {
            "workload_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
            "workspace_id": WS_ID,
            "product": PRODUCT,
            "sources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "source": {"type": "string", "enum": ["image", "api"]},
        },
    },
    "Connections": {
        "type": "object",
        "properties": {
            "workspace_id": WS_ID,
            "connections": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "connection_type", "host", "port"],
                "properties": {
                    "name": {"type": "string"},
                    "connection_type": {"type": "string"},
                    "host": {"type": "string"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                },
            }},
            "external_locations": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "url"],
                "properties": {"name": {"type": "string"}, "url": {"type": "string"}},
            }},
        },
    },
    "VerifyRequest": {
        "type": "object",
        "required": ["workspace_id", "destination"],
        "properties": {"workspace_id": WS_ID, "product": PRODUCT, "destination": {"type": "string"}},
    },
    "VerifyResponse": {
        "type": "object",
        "required": ["verdict", "network_policy_id", "reason"],
        "properties": {
            "verdict": {"type": "string", "enum": ["ALLOW", "DROP", "LOG_ONLY_DENIAL"]},
            "network_policy_id": ID,
            "reason": {"type": "string"},
            "matched": {"type": "string", "nullable": True},
            "destination_type": {"type": "string", "enum": ["DNS", "IP", "STORAGE"]},
        },
    },
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: dict | None = None) -> dict:
    out: dict = {"description": "OK"}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERR = {"description": "error", "content": {"application/json": {"schema": _ref("Error")}}}


def _op(summary: str, ok: dict, body: str | None = None, errors=(400, 404, 409)) -> dict:
    op: dict = {"summary": summary, "responses": {"200": ok, **{str(c): _ERR for c in errors}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _param(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(version: str) -> dict:
    pol_id = [_param("id", ID)]
    ws = [_param("ws", WS_ID)]
    return {
        "openapi": "3.0.3",
        "info": {"title": "egressd daemon API", "version": version},
        "paths": {
            "/api/2.0/network-policies": {
                "get": _op("list policies", _ok({"type": "object", "properties": {"items": {"type": "array", "items": _ref("AccountNetworkPolicy")}}})),
                "post": _op("create a policy", _ok(_ref("AccountNetworkPolicy")), "AccountNetworkPolicy"),
            },
            "/api/2.0/network-policies/{id}": {
                "parameters": pol_id,
                "get": _op("get a policy", _ok(_ref("AccountNetworkPolicy"))),
                "put": _op("create or replace a policy", _ok(_ref("AccountNetworkPolicy")), "AccountNetworkPolicy"),
                "delete": _op("delete a policy", _ok({"type": "object"})),
            },
            "/api/2.0/workspaces": {"get": _op("list workspaces", _ok({"type": "object"}))},
            "/api/2.0/workspaces/{ws}/network": {
                "parameters": ws,
                "get": _op("the policy of a workspace", _ok(_ref("WorkspaceNetwork"))),
                "put": _op("bind a workspace to a policy", _ok(_ref("WorkspaceNetwork")), "WorkspaceNetwork"),
            },
            "/api/2.0/workspaces/{ws}/connections": {
                "parameters": ws,
                "get": _op("a workspace's connections and external locations", _ok(_ref("Connections"))),
                "put": _op("replace them", _ok(_ref("Connections")), "Connections"),
            },
            "/api/2.0/workloads": {"get": _op("list workloads", _ok({"type": "object"}))},
            "/api/2.0/workloads/{id}": {
                "parameters": [_param("id", {})],
                "get": _op("get a workload", _ok(_ref("Workload"))),
                "put": _op("register or replace a workload", _ok(_ref("Workload")), "Workload"),
                "delete": _op("remove a workload", _ok({"type": "object"})),
            },
            "/api/2.0/verify": {"post": _op("the verdict for a destination", _ok(_ref("VerifyResponse")), "VerifyRequest")},
            "/api/2.0/status": {"get": _op("daemon status", _ok({"type": "object"}))},
            "/api/2.0/openapi.json": {"get": _op("this document", _ok({"type": "object"}))},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
        },
        "components": {"schemas": SCHEMAS},
    }
