"""aiohttp routes of the daemon API. Errors become `{"error_code", "message"}` here and only here."""

from __future__ import annotations

import grp
import hmac
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from .. import __version__
from ..admin import Admin
from ..errors import EgressdError, PermissionDenied, ValidationError
from .openapi import openapi_document

from ..httplog import server_logger

log = structlog.get_logger("egressd.api")

MAX_BODY = 32 * 2**20
STATUS = {
    "INVALID_PARAMETER_VALUE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "RESOURCE_DOES_NOT_EXIST": 404,
    "RESOURCE_ALREADY_EXISTS": 409,
    "RESOURCE_CONFLICT": 409,
    "INTERNAL_ERROR": 500,
}
P = "/api/2.0"
CALLER = web.RequestKey("caller", str)


def error(code: str, message: str) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=STATUS[code])


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix-socket peer, or None for TCP."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _peer_groups(pid: int, gid: int) -> set[int]:
    """The peer process's primary and supplementary groups (from /proc: what it really holds)."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except OSError:
        pass
    return groups


def _allowed(pid: int, uid: int, gid: int, socket_gid: int | None) -> bool:
    return uid == 0 or (socket_gid is not None and socket_gid in _peer_groups(pid, gid))


def make_app(admin: Admin, *, status: Callable[[], dict], metrics: Callable[[], str],
             token: str | None = None, socket_gid: int | None = None) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        creds = peer_credentials(request)
        if creds is not None:
            pid, uid, gid = creds
            if not _allowed(pid, uid, gid, socket_gid):
                return error("PERMISSION_DENIED", f"uid {uid} is not root and not in the API socket's group")
            request[CALLER] = f"uid={uid} pid={pid}"
        else:
            given = request.headers.get("Authorization", "")
            if token is None or not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
                return error("UNAUTHENTICATED", "a valid 'Authorization: Bearer <token>' header is required")
            request[CALLER] = f"token@{request.remote}"
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status == 413:
                return error("INVALID_PARAMETER_VALUE", f"request body too large (limit {MAX_BODY} bytes)")
            if e.status == 404:
                return error("RESOURCE_DOES_NOT_EXIST", f"no route {request.method} {request.path}")
            if e.status == 405:
                allow = ",".join(sorted(getattr(e, "allowed_methods", ()) or ()))
                return web.json_response({"error_code": "INVALID_PARAMETER_VALUE", "message": f"method {request.method} not allowed on {request.path}"},
                                         status=405, headers={"Allow": allow} if allow else None)
            raise
        except EgressdError as e:
            return error(e.error_code, str(e))
        except RecursionError:  # json.loads or a validator on absurdly nested input
            return error("INVALID_PARAMETER_VALUE", "the body is nested too deeply")
        except OSError as e:  # the node's disk or a file failed: say which, keep serving
            log.exception("api_os_error", path=request.path)
            return error("INTERNAL_ERROR", f"system error: {e.strerror or e} (errno {e.errno})")
        except Exception as e:  # a bug: say so, keep serving
            log.exception("api_internal_error", path=request.path)
            return error("INTERNAL_ERROR", f"internal error: {type(e).__name__}")

    async def body(request: web.Request) -> object:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ValidationError(f"request body too large (limit {MAX_BODY} bytes)") from None
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValidationError(f"the body is not valid JSON: {e}") from None

    def caller(request: web.Request) -> str:
        return request.get(CALLER, "?")

    def policy_doc(p, source: str) -> dict:
        return {**p.to_dict(), "source": source}

    routes = web.RouteTableDef()

    @routes.get(f"{P}/network-policies")
    async def list_policies(request):
        items = [policy_doc(p, s) for _, (p, s) in sorted(admin.effective.policies.items())]
        return web.json_response({"items": items})

    @routes.post(f"{P}/network-policies")
    async def create_policy(request):
        pol = await admin.put_policy(await body(request), caller=caller(request), create=True)
        return web.json_response(policy_doc(pol, "api"))

    @routes.get(P + "/network-policies/{id}")
    async def get_policy(request):
        return web.json_response(policy_doc(*admin.get_policy(request.match_info["id"])))

    @routes.put(P + "/network-policies/{id}")
    async def put_policy(request):
        pol = await admin.put_policy(await body(request), caller=caller(request), path_id=request.match_info["id"])
        return web.json_response(policy_doc(pol, "api"))

    @routes.delete(P + "/network-policies/{id}")
    async def delete_policy(request):
        await admin.delete_policy(request.match_info["id"], caller=caller(request))
        return web.json_response({})

    @routes.get(f"{P}/workspaces")
    async def list_workspaces(request):
        return web.json_response({"items": admin.list_workspaces()})

    @routes.get(P + "/workspaces/{ws}/network")
    async def get_binding(request):
        return web.json_response(admin.get_binding(request.match_info["ws"]))

    @routes.put(P + "/workspaces/{ws}/network")
    async def put_binding(request):
        return web.json_response(await admin.put_binding(request.match_info["ws"], await body(request), caller=caller(request)))

    @routes.get(P + "/workspaces/{ws}/connections")
    async def get_connections(request):
        return web.json_response(admin.get_connections(request.match_info["ws"]))

    @routes.put(P + "/workspaces/{ws}/connections")
    async def put_connections(request):
        return web.json_response(await admin.put_connections(request.match_info["ws"], await body(request), caller=caller(request)))

    @routes.get(f"{P}/workloads")
    async def list_workloads(request):
        items = [{**w.to_dict(), "source": s} for _, (w, s) in sorted(admin.effective.workloads.items())]
        return web.json_response({"items": items})

    @routes.get(P + "/workloads/{id}")
    async def get_workload(request):
        w, s = admin.get_workload(request.match_info["id"])
        return web.json_response({**w.to_dict(), "source": s})

    @routes.put(P + "/workloads/{id}")
    async def put_workload(request):
        w = await admin.put_workload(request.match_info["id"], await body(request), caller=caller(request))
        return web.json_response({**w.to_dict(), "source": "api"})

    @routes.delete(P + "/workloads/{id}")
    async def delete_workload(request):
        await admin.delete_workload(request.match_info["id"], caller=caller(request))
        return web.json_response({})

    @routes.post(f"{P}/verify")
    async def verify(request):
        return web.json_response(admin.verify(await body(request)))

    @routes.get(f"{P}/status")
    async def get_status(request):
        return web.json_response(status())

    @routes.get(f"{P}/openapi.json")
    async def get_openapi(request):
        return web.json_response(openapi_document(__version__))

    @routes.get("/metrics")
    async def get_metrics(request):
        return web.Response(text=metrics(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.add_routes(routes)
    return app


def make_metrics_app(metrics: Callable[[], str]) -> web.Application:
    """GET /metrics only, for a Prometheus scraper on TCP (nothing else is reachable there)."""

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(text=metrics(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    return app


def socket_group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def read_token(path: str | Path) -> str:
    """The bearer token; refuse a file others can read (the daemon then refuses to start)."""
    p = Path(path)
    st = p.stat()
    if st.st_mode & 0o007:
        raise PermissionDenied(f"{p} is readable or writable by others (mode {st.st_mode & 0o777:o}); chmod o-rwx it")
    token = p.read_text().strip()
    if len(token) < 16:
        raise ValidationError(f"{p}: the token must be at least 16 characters")
    return token


async def serve(app: web.Application, *, socket_path: str, socket_gid: int | None,
                tcp: tuple[str, int] | None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=server_logger("egressd.api.http"))
    await runner.setup()
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.unlink(missing_ok=True)
    old = os.umask(0o117)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    gid = socket_gid if socket_gid is not None else 0
    try:
        os.chown(path, -1, gid)  # the owner stays ours (root): changing it would need CAP_CHOWN
    except PermissionError:
        await runner.cleanup()
        path.unlink(missing_ok=True)
        raise EgressdError(
            f"cannot give the API socket {path} to group id {gid}: the daemon is neither in that group "
            "nor has CAP_CHOWN. Under systemd add the group to SupplementaryGroups= (a drop-in: "
            "systemctl edit egressd), or set [api] socket_group to a group the daemon is in.") from None
    os.chmod(path, 0o660)
    if tcp is not None:
        await web.TCPSite(runner, tcp[0], tcp[1]).start()
    return runner


