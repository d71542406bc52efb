"""HTTP clients of egressctl: the daemon API (unix socket, or TCP with a bearer token) and the collector.

All of egressctl's network code lives here. Two exceptions leave this module:

- ``Refused``: the server answered 4xx/5xx (it carries the server's ``error_code`` and ``message``);
- ``Unreachable``: nothing usable came back (no socket, permission denied, refused, timeout, garbage).

Paths are built from percent-encoded segments only (``api_path``), never from raw input.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

DEFAULT_SOCKET = "/run/egressd/api.sock"
DEFAULT_COLLECTOR = "http://127.0.0.1:9180"
API = "/api/2.0"


class Refused(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        super().__init__(f"{error_code}: {message}")


class Unreachable(Exception):
    """The server could not be reached, or its answer could not be read."""

    def __init__(self, target: str, reason: str, hint: str = "") -> None:
        self.target = target
        self.reason = reason
        self.hint = hint
        super().__init__(f"cannot connect to {target}: {reason}" + (f" ({hint})" if hint else ""))


def segment(value: str) -> str:
    """One path segment, percent-encoded. ``/``, ``?``, ``#`` and ``%`` never pass through raw, and
    the dot segments ``.`` and ``..`` are encoded too so no client or proxy can resolve them away."""
    if value in (".", ".."):
        return value.replace(".", "%2E")
    return quote(value, safe="")


def api_path(*segments: str) -> str:
    """``/api/2.0/<seg>/<seg>...`` with every segment encoded."""
    return API + "".join("/" + segment(s) for s in segments)


@dataclass
class Endpoint:
    """Where one HTTP service lives and how to talk to it."""

    label: str                      # what the user is told we tried to reach
    base: URL                       # scheme://host[:port][/prefix]
    unix_socket: str | None = None  # connect through this socket instead of base's host
    headers: dict[str, str] = field(default_factory=dict)
    hint: str = ""                  # added to connection errors, e.g. "is egressd running?"

    @classmethod
    def daemon_socket(cls, path: str) -> Endpoint:
        return cls(label=path, base=URL("http://localhost"), unix_socket=path, hint="is egressd running?")

    @classmethod
    def daemon_url(cls, url: str, token: str | None) -> Endpoint:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return cls(label=url, base=_base_url(url), headers=headers,
                   hint="is egressd running with api.tcp_listen set?")

    @classmethod
    def collector(cls, url: str) -> Endpoint:
        return cls(label=url, base=_base_url(url), hint="is egress-collector running?")


def _base_url(text: str) -> URL:
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return url.with_query(None).with_fragment(None)


def read_token(path: str) -> str:
    """The bearer token in ``path``, stripped. Raises ``ValueError`` with a readable reason."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"token file {path} is not UTF-8 text") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token file {path} must hold one token (no blanks inside)")
    return token


class HttpClient:
    """One aiohttp session against one ``Endpoint``. Use as ``async with``."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpClient:
        connector = (aiohttp.UnixConnector(path=self.endpoint.unix_socket)
                     if self.endpoint.unix_socket else aiohttp.TCPConnector())
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self.endpoint.headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str, params: dict[str, str] | None = None) -> URL:
        """``path`` (already encoded) under the endpoint's base URL, with ``params`` as the query."""
        base = self.endpoint.base
        url = base.with_path(base.raw_path.rstrip("/") + path, encoded=True)
        return url.with_query(params) if params else url

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: dict[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON answer (``None`` for an empty body)."""
        assert self._session is not None, "use HttpClient as an async context manager"
        ep = self.endpoint
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with self._session.request(method, self.url(path, params), data=data,
                                             headers=headers) as resp:
                raw = await resp.read()
                status, reason = resp.status, resp.reason or ""
        except (asyncio.TimeoutError, TimeoutError):
            raise Unreachable(ep.label, f"no answer within {self.timeout:g} s", ep.hint) from None
        except aiohttp.ClientConnectorError as exc:
            os_error = exc.os_error
            reason = _os_reason(os_error) if os_error is not None else str(exc)
            raise Unreachable(ep.label, reason, _hint(ep, os_error)) from None
        except aiohttp.ClientError as exc:
            raise Unreachable(ep.label, str(exc) or type(exc).__name__, ep.hint) from None
        if status >= 400:
            raise _refusal(status, reason, raw)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise Unreachable(ep.label, f"HTTP {status}: the answer is not JSON: {_snippet(raw)}") from None


def _os_reason(err: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('127.0.0.1', 9180)``."""
    if err.errno:
        return os.strerror(err.errno)
    return err.strerror or str(err) or type(err).__name__


def _hint(ep: Endpoint, os_error: OSError | None) -> str:
    if isinstance(os_error, PermissionError) and ep.unix_socket:
        return "egressctl needs to be root or in the group of api.socket_group"
    return ep.hint


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def _refusal(status: int, reason: str, raw: bytes) -> Refused:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error_code"), str):
        return Refused(status, doc["error_code"], str(doc.get("message", "")))
    text = _snippet(raw)
    return Refused(status, f"HTTP {status}", f"{reason}: {text}" if text else reason)


class DaemonClient(HttpClient):
    """The daemon API of SPEC section 5."""

    async def list_policies(self) -> Any:
        return await self.request("GET", api_path("network-policies"))

    async def get_policy(self, policy_id: str) -> Any:
        return await self.request("GET", api_path("network-policies", policy_id))

    async def put_policy(self, policy: dict[str, Any]) -> tuple[Any, bool]:
        """Replace the policy the document names; create it with POST if PUT says it does not exist.
        Returns the answer and whether the POST fallback created it."""
        policy_id = policy["network_policy_id"]
        try:
            return await self.request("PUT", api_path("network-policies", policy_id), body=policy), False
        except Refused as exc:
            if exc.status != 404:
                raise
        return await self.request("POST", api_path("network-policies"), body=policy), True

    async def delete_policy(self, policy_id: str) -> Any:
        return await self.request("DELETE", api_path("network-policies", policy_id))

    async def list_workspaces(self) -> Any:
        return await self.request("GET", api_path("workspaces"))

    async def get_workspace(self, ws: str) -> Any:
        return await self.request("GET", api_path("workspaces", ws, "network"))

    async def assign(self, ws: str, policy_id: str) -> Any:
        return await self.request("PUT", api_path("workspaces", ws, "network"),
                                  body={"workspace_id": ws, "network_policy_id": policy_id})

    async def list_workloads(self) -> Any:
        return await self.request("GET", api_path("workloads"))

    async def get_workload(self, workload_id: str) -> Any:
        return await self.request("GET", api_path("workloads", workload_id))

    async def put_workload(self, workload: dict[str, Any]) -> Any:
        return await self.request("PUT", api_path("workloads", workload["workload_id"]), body=workload)

    async def delete_workload(self, workload_id: str) -> Any:
        return await self.request("DELETE", api_path("workloads", workload_id))

    async def get_connections(self, ws: str) -> Any:
        return await self.request("GET", api_path("workspaces", ws, "connections"))

    async def put_connections(self, ws: str, doc: dict[str, Any]) -> Any:
        return await self.request("PUT", api_path("workspaces", ws, "connections"), body=doc)

    async def verify(self, ws: str, product: str, destination: str) -> Any:
        return await self.request("POST", api_path("verify"), body={
            "workspace_id": ws, "product": product, "destination": destination})

    async def status(self) -> Any:
        return await self.request("GET", api_path("status"))


class CollectorClient(HttpClient):
    """The collector API of SPEC section 7."""

    async def events(self, params: dict[str, str]) -> Any:
        return await self.request("GET", "/v1/events", params=params)

    async def sql(self, query: str) -> Any:
        return await self.request("POST", "/v1/sql", body={"query": query})
