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
    code = Code.INVALID_ARGUMENT


class ConfigError(InvalidArgument):
    """A configuration file or setting is wrong; the message names file, field, value, fix."""


class NotFound(SlimserveError):
    code = Code.NOT_FOUND


class AlreadyExists(SlimserveError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(SlimserveError):
    code = Code.FAILED_PRECONDITION


class Unavailable(SlimserveError):
    code = Code.UNAVAILABLE


class ResourceExhausted(SlimserveError):
    code = Code.RESOURCE_EXHAUSTED


class PayloadTooLarge(SlimserveError):
    code = Code.PAYLOAD_TOO_LARGE


class DeadlineExceeded(SlimserveError):
    code = Code.DEADLINE_EXCEEDED


class Unauthenticated(SlimserveError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(SlimserveError):
    code = Code.PERMISSION_DENIED


class Unimplemented(SlimserveError):
    code = Code.UNIMPLEMENTED


class ModelLoadError(FailedPrecondition):
    """A model version could not be loaded; the message holds the reason."""


class UnsafeArtifact(InvalidArgument):
    """An artifact that would execute code when loaded (pickle) or escapes the repository."""
