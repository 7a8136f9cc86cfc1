"""The one error vocabulary of airouter.

Domain code raises these; the edges translate them: `airouter.grpc_server` to the gRPC status
of the same name, the HTTP edge to an OpenAI-shaped error. Every message tells the user what
went wrong and what to do about it. `code` is the canonical status name (gRPC's), which
protocol fields such as a batch item's error_code carry.
"""

from typing import ClassVar


class AirouterError(Exception):
    """Base of the errors a request can end with before its first token."""

    code: ClassVar[str] = "INTERNAL"


class InvalidArgument(AirouterError):
    """The request itself is wrong: a field is missing or out of range."""

    code = "INVALID_ARGUMENT"


class NotFound(AirouterError):
    """The request names something (a model, a batch) that does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(AirouterError):
    """The request would create something (a batch) whose id is taken."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(AirouterError):
    """The request is well formed but cannot be served in the system's current state."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(AirouterError):
    """Too much work is queued, or a limit is reached; the caller should retry later or
    elsewhere (after `retry_after_s`, where known: HTTP's Retry-After, gRPC's retry-after
    trailer)."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(AirouterError):
    """A host or model cannot serve now; the caller may retry."""

    code = "UNAVAILABLE"


class DeadlineExceeded(AirouterError):
    """The request's deadline passed before it could be served."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(AirouterError):
    """The caller, or airouter towards an upstream, did not prove who it is."""

    code = "UNAUTHENTICATED"


class PermissionDenied(AirouterError):
    """The caller is known but may not do this."""

    code = "PERMISSION_DENIED"


class Cancelled(AirouterError):
    """The caller (or a host on its behalf) cancelled the request."""

    code = "CANCELLED"


class Internal(AirouterError):
    """A fault of airouter's or a host's own; the caller may retry."""


_BY_CODE: dict[str, type[AirouterError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Internal,
    )
}


def error_for_code(code: str, message: str) -> AirouterError:
    """The domain error for a status name another service answered with (UNKNOWN, DATA_LOSS and
    the like become Internal)."""
    return _BY_CODE.get(code, Internal)(message)


def not_text(exc: UnicodeEncodeError, where: str) -> InvalidArgument:
    """JSON lets an escape such as "\\udc80" (half a surrogate pair) through; protobuf's text
    fields refuse it. The caller's error, said as such."""
    bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
    return InvalidArgument(
        f"{where} holds a lone surrogate ({bad}), which is not text; send valid Unicode "
        "(an escape from \\ud800 to \\udfff must be half of a pair)"
    )


# The most of a name a client chose that a message repeats: a 10,000-character model name
# echoed whole would take the status past gRPC's metadata limit.
SHOWN_CHARS = 64


def shown(name: str) -> str:
    """A client-chosen name as a message quotes it, shortened past SHOWN_CHARS."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name)} characters)"
