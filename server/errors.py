"""Errors the service layer maps to gRPC status codes (nothing below the servicer imports grpc)."""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be served; the message says what to fix."""

    code = "INTERNAL"


class InvalidArgument(ServeError):
    code = "INVALID_ARGUMENT"


class NotFound(ServeError):
    code = "NOT_FOUND"


class AlreadyExists(ServeError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServeError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServeError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # a bounded metric label: capacity, key_limit, queue_full, session_queue_full


class OutOfRange(ServeError):
    code = "OUT_OF_RANGE"


class Aborted(ServeError):
    code = "ABORTED"


class Unavailable(ServeError):
    code = "UNAVAILABLE"


class Unauthenticated(ServeError):
    code = "UNAUTHENTICATED"
