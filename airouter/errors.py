"""The one error vocabulary of airouter.

Domain code raises these; `airouter.grpc_server` maps each to its gRPC status code. Every
message tells the user what went wrong and what to do about it.
"""


class AirouterError(Exception):
    """Base of the errors a request can end with before its first token."""


class InvalidArgument(AirouterError):
    """The request itself is wrong: a field is missing or out of range."""


class NotFound(AirouterError):
    """The request names something (a model, a batch) that does not exist."""


class AlreadyExists(AirouterError):
    """The request would create something (a batch) whose id is taken."""


class FailedPrecondition(AirouterError):
    """The request is well formed but cannot be served in the system's current state."""


class ResourceExhausted(AirouterError):
    """Too much work is queued; the caller should retry later or elsewhere."""


class Unavailable(AirouterError):
    """A host or model cannot serve now; the caller may retry."""


class DeadlineExceeded(AirouterError):
    """The request's deadline passed before it could be served."""


class Unauthenticated(AirouterError):
    """The caller, or airouter towards an upstream, did not prove who it is."""


class PermissionDenied(AirouterError):
    """The caller is known but may not do this."""
