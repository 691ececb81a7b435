"""One error tree with transport-neutral codes.

Every error a user can cause or meet is a `SlimserveError` carrying a `Code`. Transports map
codes to HTTP statuses and gRPC status codes from one table each; nothing below the transports
knows about either.
"""

from __future__ import annotations

from enum import Enum


class Code(str, Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class SlimserveError(Exception):
    """Base of every slimserve error. `message` says what was wrong and how to fix it."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds after which a retry may succeed (sent as Retry-After where the transport can).
        self.retry_after_s = retry_after_s


class InvalidArgument(SlimserveError):
    """The request, file or flag is malformed or out of range; the message names the field."""

    code = Code.INVALID_ARGUMENT


class ConfigError(InvalidArgument):
    """A configuration file or setting is wrong; the message names file, field, value, fix."""


class NotFound(SlimserveError):
    """No such model, version, variant, key or file."""

    code = Code.NOT_FOUND


class AlreadyExists(SlimserveError):
    """What would be created is there already (a model version, a variant, a key name);
    the message says which flag overwrites or renames it."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(SlimserveError):
    """Well-formed, but the system is not in a state to do it: the model is not loaded,
    model control is off, or the model answered with something other than it declares."""

    code = Code.FAILED_PRECONDITION


class Unavailable(SlimserveError):
    """Passing: the model is loading or draining, a worker is restarting. Retry shortly."""

    code = Code.UNAVAILABLE


class ResourceExhausted(SlimserveError):
    """A limit was hit (queue depth, rate, memory, KV blocks); `retry_after_s` says when a
    retry may get through, where it is known."""

    code = Code.RESOURCE_EXHAUSTED


class PayloadTooLarge(SlimserveError):
    """A request body above the server's size limit (max_body_bytes)."""

    code = Code.PAYLOAD_TOO_LARGE


class DeadlineExceeded(SlimserveError):
    """The request's timeout passed before its answer was ready."""

    code = Code.DEADLINE_EXCEEDED


class Unauthenticated(SlimserveError):
    """No API key, or one the server does not know, where keys are required."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(SlimserveError):
    """A known key without the scope or model the call needs, or an action turned off
    by the server's settings."""

    code = Code.PERMISSION_DENIED


class Unimplemented(SlimserveError):
    """A protocol feature slimserve does not serve (an extension, a parameter, an RPC)."""

    code = Code.UNIMPLEMENTED


class ModelLoadError(FailedPrecondition):
    """A model version could not be loaded; the message holds the reason."""


class UnsafeArtifact(InvalidArgument):
    """An artifact that would execute code when loaded (pickle) or escapes the repository."""
