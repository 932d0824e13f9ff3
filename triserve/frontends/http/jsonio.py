"""JSON in and out of HTTP bodies, with orjson (the hot path parses and writes one
document per inference).

A body that is not JSON, or not the JSON type a route expects, is the client's
error: it raises ``InferError`` INVALID_ARGUMENT with the parser's own message.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from triserve.core.errors import InferError


def loads(body: bytes | memoryview | str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InferError.invalid(f"malformed JSON in request body: {exc}") from None


def loads_object(body: bytes | memoryview | str, *, empty_ok: bool = False) -> dict[str, Any]:
    """Parse a body that must be a JSON object; with ``empty_ok`` an empty body is ``{}``."""
    if empty_ok and not body:
        return {}
    document = loads(body)
    if not isinstance(document, dict):
        raise InferError.invalid(
            f"request body must be a JSON object, not {type(document).__name__}"
        )
    return document


def dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def sse_event(document: Any) -> bytes:
    """One server-sent event carrying ``document``, as both streaming dialects send them."""
    return b"data: " + dumps(document) + b"\n\n"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
