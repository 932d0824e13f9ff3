"""JSON in and out of HTTP bodies, with orjson (the hot path parses and writes one
document per inference).

A body that is not JSON, or not the JSON type a route expects, is the client's
error: it raises ``InferError`` INVALID_ARGUMENT with the parser's own message.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
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


# An escape inside a JSON string (a backslash and the character it escapes), and every byte
# that is neither a quote nor a bracket.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURAL = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_DEPTH_CHUNK = 1 << 20


def nesting_exceeds(text: bytes | memoryview, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit``.

    Runs on the raw text before any parser builds objects, in C-speed passes: escapes
    dropped, then only quotes and brackets kept, then (numpy) brackets inside strings
    ignored and the running depth taken. Invalid JSON is left for the parser to name.
    """
    structural = _ESCAPE.sub(b"", text).translate(None, _NOT_STRUCTURAL)
    if structural.count(b"[") + structural.count(b"{") <= limit:
        return False
    depth = 0
    in_string = 0
    for start in range(0, len(structural), _DEPTH_CHUNK):
        codes = np.frombuffer(structural, dtype=np.uint8, count=min(_DEPTH_CHUNK, len(structural) - start),
                              offset=start)
        quotes = np.cumsum(codes == ord('"'), dtype=np.int64) + in_string
        steps = np.where(quotes & 1, 0, _STEP[codes]).astype(np.int64)
        levels = np.cumsum(steps) + depth
        if levels.max() > limit:
            return True
        depth = int(levels[-1])
        in_string = int(quotes[-1]) & 1
    return False


def dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def sse_event(document: Any) -> bytes:
    """One server-sent event carrying ``document``, as both streaming dialects send them."""
    return b"data: " + dumps(document) + b"\n\n"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
