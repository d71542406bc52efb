"""One exception hierarchy for egressd. HTTP status codes are chosen at the API edge only."""

from __future__ import annotations

from dataclasses import dataclass


class EgressdError(Exception):
    """Base of every error egressd raises on purpose."""

    error_code = "INTERNAL_ERROR"


@dataclass(frozen=True)
class FieldError:
    """One problem in an input document, located by its key path (``a.b[3].c``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationError(EgressdError):
    """An input document (policy, config, workload...) is invalid. Carries every problem found."""

    error_code = "INVALID_PARAMETER_VALUE"

    def __init__(self, errors: list[FieldError] | FieldError | str):
        if isinstance(errors, str):
            errors = [FieldError("", errors)]
        elif isinstance(errors, FieldError):
            errors = [errors]
        self.errors: list[FieldError] = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


class NotFound(EgressdError):
    error_code = "RESOURCE_DOES_NOT_EXIST"


class AlreadyExists(EgressdError):
    error_code = "RESOURCE_ALREADY_EXISTS"


class Conflict(EgressdError):
    error_code = "RESOURCE_CONFLICT"


class PermissionDenied(EgressdError):
    error_code = "PERMISSION_DENIED"


class Unauthenticated(EgressdError):
    error_code = "UNAUTHENTICATED"


class ApplyError(EgressdError):
    """The kernel refused a ruleset transaction. Nothing was changed."""

    error_code = "INTERNAL_ERROR"


class DnsFormatError(EgressdError):
    """A DNS message could not be parsed."""

    error_code = "INVALID_PARAMETER_VALUE"
