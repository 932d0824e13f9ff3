"""The core: model repository, scheduling, instances and statistics.

Frontends decode a wire format into :class:`InferRequest` and call the core;
the core hands requests to a backend and streams :class:`InferResponse` back.
"""

from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor, RequestedOutput

__all__ = [
    "ErrorCode",
    "InferError",
    "InferRequest",
    "InferResponse",
    "InferTensor",
    "RequestedOutput",
]
