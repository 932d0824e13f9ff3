"""One error type for the whole request path.

Backends and the core raise :class:`InferError` with a code; each frontend maps
the code onto its own wire (HTTP status, gRPC status, OpenAI error object), so
no frontend needs to know where an error came from.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Error categories, named after Triton's TRITONSERVER_Error codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    UNSUPPORTED = "UNSUPPORTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}


class InferError(Exception):
    """An error that reaches the client with its code and message."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"InferError({self.code.name}, {self.message!r})"

    def __reduce__(self):
        # pickled whole (code and message) when it crosses a process, e.g. from a Ray replica
        return (type(self), (self.code, self.message))

    @classmethod
    def invalid(cls, message: str) -> "InferError":
        return cls(ErrorCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> "InferError":
        return cls(ErrorCode.NOT_FOUND, message)

    @classmethod
    def unavailable(cls, message: str) -> "InferError":
        return cls(ErrorCode.UNAVAILABLE, message)

    @classmethod
    def internal(cls, message: str) -> "InferError":
        return cls(ErrorCode.INTERNAL, message)


QUEUE_FULL = "Exceeds maximum queue size"  # Triton's text, UNAVAILABLE


class QueueFullError(InferError):
    """A request refused at once because a bounded queue is full: UNAVAILABLE (HTTP 503, gRPC
    UNAVAILABLE), Triton's text first, so a client may retry later. The core queue's
    ``max_queue_size`` and the LLM engine's waiting queue both raise it; a frontend may give it
    its own overload status (OpenAI answers 429)."""

    def __init__(self, detail: str):
        super().__init__(ErrorCode.UNAVAILABLE, f"{QUEUE_FULL}: {detail}")
