"""Storage destinations of a policy (``allowed_storage_destinations``) and storage endpoint shapes.

A storage destination is allowed by name. Each one expands to the host names of its endpoints:

    AZURE_STORAGE lake1/dfs        -> lake1.dfs.core.windows.net   (no service: dfs and blob)
    AWS_S3 my-bucket/us-west-2     -> my-bucket.s3.amazonaws.com, my-bucket.s3.us-west-2.amazonaws.com,
                                      my-bucket.s3.dualstack.us-west-2.amazonaws.com
    GOOGLE_CLOUD_STORAGE my-bkt    -> storage.googleapis.com, my-bkt.storage.googleapis.com

``storage_host`` recognises a name that has the shape of such an endpoint, so that denials of it are
logged with destination_type STORAGE.

The small field-checking helpers at the end (``json_type``, ``quote``, ``unknown_key_errors``) are
shared with ``policy.py``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import FieldError, ValidationError

__all__ = [
    "StorageDestinationType",
    "StorageDestination",
    "parse_storage_destination",
    "storage_host",
    "json_type",
    "quote",
    "unknown_key_errors",
]


class StorageDestinationType(StrEnum):
    AWS_S3 = "AWS_S3"
    AZURE_STORAGE = "AZURE_STORAGE"
    GOOGLE_CLOUD_STORAGE = "GOOGLE_CLOUD_STORAGE"


_FIELDS: dict[StorageDestinationType, tuple[str, ...]] = {
    StorageDestinationType.AZURE_STORAGE: ("azure_storage_account", "azure_storage_service"),
    StorageDestinationType.AWS_S3: ("bucket_name", "region"),
    StorageDestinationType.GOOGLE_CLOUD_STORAGE: ("bucket_name",),
}
_REQUIRED = {
    StorageDestinationType.AZURE_STORAGE: "azure_storage_account",
    StorageDestinationType.AWS_S3: "bucket_name",
    StorageDestinationType.GOOGLE_CLOUD_STORAGE: "bucket_name",
}
_ALL_KEYS = ("storage_destination_type", "azure_storage_account", "azure_storage_service", "bucket_name", "region")

AZURE_SERVICES = ("dfs", "blob")
_AZURE_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
_AWS_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_S3_BUCKET_RE = re.compile(r"[a-z0-9.-]+")
_GCS_BUCKET_RE = re.compile(r"[a-z0-9._-]+")
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True)
class StorageDestination:
    """One validated entry of ``allowed_storage_destinations``."""

    storage_destination_type: StorageDestinationType
    azure_storage_account: str | None = None
    azure_storage_service: str | None = None
    bucket_name: str | None = None
    region: str | None = None

    def names(self) -> tuple[str, ...]:
        """The normalized host names this destination allows."""
        t = self.storage_destination_type
        if t is StorageDestinationType.AZURE_STORAGE:
            services = (self.azure_storage_service,) if self.azure_storage_service else AZURE_SERVICES
            return tuple(f"{self.azure_storage_account}.{svc}.core.windows.net" for svc in services)
        if t is StorageDestinationType.AWS_S3:
            names = [f"{self.bucket_name}.s3.amazonaws.com"]
            if self.region:
                names.append(f"{self.bucket_name}.s3.{self.region}.amazonaws.com")
                names.append(f"{self.bucket_name}.s3.dualstack.{self.region}.amazonaws.com")
            return tuple(names)
        return ("storage.googleapis.com", f"{self.bucket_name}.storage.googleapis.com")

    def describe(self) -> str:
        """A short label for logs and decisions, e.g. ``AZURE_STORAGE lake1/dfs``."""
        t = self.storage_destination_type
        if t is StorageDestinationType.AZURE_STORAGE:
            name, qualifier = self.azure_storage_account, self.azure_storage_service
        else:
            name, qualifier = self.bucket_name, self.region
        return f"{t.value} {name}/{qualifier}" if qualifier else f"{t.value} {name}"

    def to_dict(self) -> dict[str, str]:
        """The canonical JSON object (absent fields omitted)."""
        out = {"storage_destination_type": self.storage_destination_type.value}
        for key in _FIELDS[self.storage_destination_type]:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _azure_account_error(value: str) -> str | None:
    if _AZURE_ACCOUNT_RE.fullmatch(value):
        return None
    return f"{quote(value)} must be 3-24 lower-case letters and digits"


def _azure_service_error(value: str) -> str | None:
    if value in AZURE_SERVICES:
        return None
    return f'{quote(value)} must be "dfs" or "blob" (or absent for both)'


def _looks_like_ip(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _s3_bucket_error(value: str) -> str | None:
    reason = None
    if not 3 <= len(value) <= 63:
        reason = "it must be 3-63 characters long"
    elif not _S3_BUCKET_RE.fullmatch(value):
        reason = "only lower-case letters, digits, '.' and '-' are allowed"
    elif not (value[0].isalnum() and value[-1].isalnum()):
        reason = "it must start and end with a letter or digit"
    elif ".." in value:
        reason = "it must not contain '..'"
    elif _looks_like_ip(value):
        reason = "it must not look like an IP address"
    elif value.startswith(_S3_RESERVED_PREFIXES) or value.endswith(_S3_RESERVED_SUFFIXES):
        reason = "it uses a prefix or suffix that AWS reserves"
    return None if reason is None else f"{quote(value)} is not a valid S3 bucket name ({reason})"


def _aws_region_error(value: str) -> str | None:
    if _AWS_REGION_RE.fullmatch(value):
        return None
    return f'{quote(value)} is not an AWS region name like "us-west-2"'


def _gcs_bucket_error(value: str) -> str | None:
    reason = None
    limit = 222 if "." in value else 63
    if not 3 <= len(value) <= limit:
        reason = "it must be 3-63 characters long, or up to 222 with dots"
    elif not _GCS_BUCKET_RE.fullmatch(value):
        reason = "only lower-case letters, digits, '-', '_' and '.' are allowed"
    elif not (value[0].isalnum() and value[-1].isalnum()):
        reason = "it must start and end with a letter or digit"
    elif any(not 1 <= len(part) <= 63 for part in value.split(".")):
        reason = "each dot-separated part must be 1-63 characters long"
    elif _looks_like_ip(value):
        reason = "it must not look like an IP address"
    elif value.startswith("goog") or "google" in value:
        reason = "it must not start with 'goog' or contain 'google'"
    return None if reason is None else f"{quote(value)} is not a valid Google Cloud Storage bucket name ({reason})"


_CHECKS = {
    (StorageDestinationType.AZURE_STORAGE, "azure_storage_account"): _azure_account_error,
    (StorageDestinationType.AZURE_STORAGE, "azure_storage_service"): _azure_service_error,
    (StorageDestinationType.AWS_S3, "bucket_name"): _s3_bucket_error,
    (StorageDestinationType.AWS_S3, "region"): _aws_region_error,
    (StorageDestinationType.GOOGLE_CLOUD_STORAGE, "bucket_name"): _gcs_bucket_error,
}


def parse_storage_destination(obj: Any, path: str) -> StorageDestination:
    """Validate one ``allowed_storage_destinations`` entry; raise ValidationError with every problem.

    ``path`` is the entry's key path (``egress.network_access.allowed_storage_destinations[0]``).
    A null field counts as absent.
    """
    if not isinstance(obj, Mapping):
        raise ValidationError([FieldError(path, f"must be an object, got {json_type(obj)}")])
    errors = unknown_key_errors(obj, _ALL_KEYS, path)
    raw_type = obj.get("storage_destination_type")
    if raw_type is None:
        errors.append(FieldError(f"{path}.storage_destination_type", "is required"))
        raise ValidationError(errors)
    valid_types = ", ".join(t.value for t in StorageDestinationType)
    if not isinstance(raw_type, str) or raw_type not in StorageDestinationType.__members__:
        errors.append(FieldError(f"{path}.storage_destination_type", f"{quote(raw_type)} must be one of {valid_types}"))
        raise ValidationError(errors)
    kind = StorageDestinationType(raw_type)
    fields: dict[str, str] = {}
    for key in _ALL_KEYS[1:]:
        value = obj.get(key)
        if value is None:
            continue
        key_path = f"{path}.{key}"
        if key not in _FIELDS[kind]:
            takes = ", ".join(_FIELDS[kind])
            errors.append(FieldError(key_path, f"is not used by {kind.value} (it takes {takes})"))
        elif not isinstance(value, str):
            errors.append(FieldError(key_path, f"must be a string, got {json_type(value)}"))
        elif (message := _CHECKS[(kind, key)](value)) is not None:
            errors.append(FieldError(key_path, message))
        else:
            fields[key] = value
    required = _REQUIRED[kind]
    if obj.get(required) is None:
        errors.append(FieldError(f"{path}.{required}", f"is required for {kind.value}"))
    if errors:
        raise ValidationError(errors)
    return StorageDestination(kind, **fields)


def storage_host(name: str) -> str | None:
    """If a normalized name has the shape of a storage endpoint, return its account/bucket host.

    Azure names deeper than the account (``x.lake1.blob.core.windows.net``) give the account host
    (``lake1.blob.core.windows.net``). S3 and GCS bucket names may contain dots, so for them the
    name itself is the host. Anything else gives None.
    """
    labels = name.split(".")
    if name.endswith((".blob.core.windows.net", ".dfs.core.windows.net")) and len(labels) >= 5:
        return ".".join(labels[-5:])
    if name == "storage.googleapis.com" or name.endswith(".storage.googleapis.com"):
        return name
    if name.endswith(".amazonaws.com"):
        rest = labels[:-2]
        if rest[-1:] == ["s3"]:  # s3.amazonaws.com, <bucket>.s3.amazonaws.com
            return name
        if len(rest) >= 2 and rest[-2] == "s3" and _AWS_REGION_RE.fullmatch(rest[-1]):
            return name  # [<bucket>.]s3.<region>.amazonaws.com
        if len(rest) >= 3 and rest[-3:-1] == ["s3", "dualstack"] and _AWS_REGION_RE.fullmatch(rest[-1]):
            return name  # [<bucket>.]s3.dualstack.<region>.amazonaws.com
    return None


# -- field-checking helpers, shared with policy.py --------------------------------------------


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def quote(value: Any, limit: int = 80) -> str:
    """A value as JSON text for an error message, shortened when long."""
    try:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    except RecursionError:
        return f"(a {type(value).__name__} nested too deeply to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key_errors(obj: Mapping[Any, Any], allowed: Iterable[str], path: str) -> list[FieldError]:
    """One error per key of ``obj`` that is not in ``allowed``, with a suggestion when one is close."""
    allowed = list(allowed)
    errors = []
    for key in obj:
        if key in allowed:
            continue
        key_text = key if isinstance(key, str) else repr(key)
        key_path = f"{path}.{key_text}" if path else key_text
        close = difflib.get_close_matches(key_text, allowed, n=1)
        hint = f'did you mean "{close[0]}"?' if close else f"valid fields: {', '.join(allowed)}"
        errors.append(FieldError(key_path, f"unknown field ({hint})"))
    return errors
