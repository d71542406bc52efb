"""A workspace's connections and external locations (the parts Unity Catalog plays in the product we
mirror). Their hosts are allowed automatically under RESTRICTED_ACCESS and count toward
``max_destinations``. Pure."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import FieldError, ValidationError
from .names import normalize_name
from .storage import json_type, quote, unknown_key_errors

CONNECTION_TYPES = (
    "MYSQL", "POSTGRESQL", "SNOWFLAKE", "REDSHIFT", "SQLSERVER", "SYNAPSE", "BIGQUERY",
    "SALESFORCE", "SALESFORCE_DATA_CLOUD", "NETSUITE", "WORKDAY_RAAS", "HIVE_METASTORE",
)
# Regional S3 endpoints an s3:// location may be reached through (the URL carries no region).
AWS_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "af-south-1", "ap-east-1", "ap-south-1",
    "ap-south-2", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4",
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ca-central-1", "ca-west-1",
    "eu-central-1", "eu-central-2", "eu-west-1", "eu-west-2", "eu-west-3", "eu-south-1",
    "eu-south-2", "eu-north-1", "il-central-1", "me-south-1", "me-central-1", "sa-east-1",
    "us-gov-east-1", "us-gov-west-1",
)
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ABFSS_HOST_RE = re.compile(r"([a-z0-9]{3,24})\.dfs\.core\.windows\.net")


@dataclass(frozen=True)
class Connection:
    name: str
    connection_type: str
    host: str  # a normalized DNS name or an IP address
    port: int

    def to_dict(self) -> dict:
        return {"name": self.name, "connection_type": self.connection_type, "host": self.host, "port": self.port}

    def describe(self) -> str:
        return f"{self.connection_type} {self.host}:{self.port}"


@dataclass(frozen=True)
class ExternalLocation:
    name: str
    url: str
    hosts: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "url": self.url}


@dataclass(frozen=True)
class Connections:
    connections: tuple[Connection, ...] = ()
    external_locations: tuple[ExternalLocation, ...] = ()

    def to_dict(self) -> dict:
        return {
            "connections": [c.to_dict() for c in self.connections],
            "external_locations": [e.to_dict() for e in self.external_locations],
        }

    def destination_count(self) -> int:
        return len(self.connections) + len(self.external_locations)

    def extras(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(extra names, extra networks), each with the label verify shows."""
        names: list[tuple[str, str]] = []
        nets: list[tuple[str, str]] = []
        for i, c in enumerate(self.connections):
            label = f"connections[{i}] ({c.name}: {c.describe()})"
            if _is_ip(c.host):
                nets.append((c.host, label))
            else:
                names.append((c.host, label))
        for i, e in enumerate(self.external_locations):
            label = f"external_locations[{i}] ({e.name}: {e.url})"
            names.extend((h, label) for h in e.hosts)
        return names, nets


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def location_hosts(url: str) -> tuple[str, ...]:
    """The endpoint host names of an external location URL; ValueError when unsupported."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = normalize_name(parts.hostname or "")
        return (f"{bucket}.s3.amazonaws.com",) + tuple(
            f"{bucket}.s3{sep}{r}.amazonaws.com" for r in AWS_REGIONS for sep in (".", ".dualstack.")
        )
    if scheme == "abfss":
        if "@" not in parts.netloc:
            raise ValueError("an abfss:// URL is abfss://<container>@<account>.dfs.core.windows.net/<path>")
        host = normalize_name(parts.netloc.rsplit("@", 1)[1].split(":")[0])
        if not _ABFSS_HOST_RE.fullmatch(host):
            raise ValueError("the host of an abfss:// URL must be <account>.dfs.core.windows.net")
        return (host,)
    if scheme == "gs":
        bucket = normalize_name(parts.hostname or "")
        return ("storage.googleapis.com", f"{bucket}.storage.googleapis.com")
    raise ValueError("the URL must start with s3://, abfss:// or gs://")


def parse_connections(obj: Any, path: str = "") -> Connections:
    """Parse `{"connections": […], "external_locations": […]}`, collecting every error."""
    p = (path + ".") if path else ""
    if not isinstance(obj, dict):
        raise ValidationError(FieldError(path, f"must be an object, not {json_type(obj)}"))
    errors = unknown_key_errors(obj, ("connections", "external_locations", "workspace_id"), path)
    conns: list[Connection] = []
    locs: list[ExternalLocation] = []
    seen: set[str] = set()

    def name_of(item: dict, ipath: str) -> str | None:
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            errors.append(FieldError(f"{ipath}.name", f"{quote(name)} must be 1-128 characters of [A-Za-z0-9_.-]"))
            return None
        if name in seen:
            errors.append(FieldError(f"{ipath}.name", f"{quote(name)} is used twice"))
        seen.add(name)
        return name

    for key, allowed in (("connections", ("name", "connection_type", "host", "port")), ("external_locations", ("name", "url"))):
        items = obj.get(key, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            errors.append(FieldError(f"{p}{key}", f"must be a list, not {json_type(items)}"))
            continue
        for i, item in enumerate(items):
            ipath = f"{p}{key}[{i}]"
            if not isinstance(item, dict):
                errors.append(FieldError(ipath, f"must be an object, not {json_type(item)}"))
                continue
            errors.extend(unknown_key_errors(item, allowed, ipath))
            name = name_of(item, ipath)
            if key == "connections":
                c = _parse_connection(item, ipath, name, errors)
                if c:
                    conns.append(c)
            else:
                url = item.get("url")
                try:
                    if not isinstance(url, str):
                        raise ValueError("is required (a string)")
                    hosts = location_hosts(url)
                except ValueError as e:
                    errors.append(FieldError(f"{ipath}.url", f"{quote(url)}: {e}"))
                    continue
                if name:
                    locs.append(ExternalLocation(name, url, hosts))
    if errors:
        raise ValidationError(errors)
    return Connections(tuple(conns), tuple(locs))


def _parse_connection(item: dict, ipath: str, name: str | None, errors: list[FieldError]) -> Connection | None:
    ctype, host, port = item.get("connection_type"), item.get("host"), item.get("port")
    ok = name is not None
    if ctype not in CONNECTION_TYPES:
        errors.append(FieldError(f"{ipath}.connection_type", f"{quote(ctype)} must be one of {', '.join(CONNECTION_TYPES)}"))
        ok = False
    norm = None
    if isinstance(host, str) and _is_ip(host.strip("[]")):
        norm = str(ipaddress.ip_address(host.strip("[]")))
    else:
        try:
            if not isinstance(host, str):
                raise ValueError("is required (a host name or IP address)")
            norm = normalize_name(host)
        except ValueError as e:
            errors.append(FieldError(f"{ipath}.host", f"{quote(host)}: {e}"))
            ok = False
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        errors.append(FieldError(f"{ipath}.port", f"{quote(port)} must be a port number 1-65535"))
        ok = False
    return Connection(name, ctype, norm, port) if ok and norm else None
