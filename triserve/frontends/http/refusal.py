"""Answering a request the server refuses before any route sees it (auth, limits).

The refusal speaks the dialect of the path it was sent to: OpenAI's error object
under ``/v1/`` (so the ``openai`` client raises its usual ``AuthenticationError``
or ``BadRequestError``), Triton's ``{"error": "<message>"}`` everywhere else.
"""

from __future__ import annotations

from starlette.types import Scope, Send

from triserve.core.errors import InferError
from triserve.frontends.http import jsonio
from triserve.frontends.http.errors import error_body
from triserve.frontends.http.openai.protocol import error_body as openai_error_body

OPENAI_PREFIX = "/v1/"


def refusal_body(path: str, message: str, openai_code: str | None = None) -> bytes:
    if path.startswith(OPENAI_PREFIX):
        document = openai_error_body(InferError.invalid(message))
        document["error"]["code"] = openai_code
        return jsonio.dumps(document)
    return jsonio.dumps(error_body(message))


async def refuse(scope: Scope, send: Send, status: int, message: str, *, openai_code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> None:
    """Send the whole error response. ``close`` asks the server to drop the connection after it
    (an unread body is then never read: the client cannot keep streaming it in)."""
    body = refusal_body(scope.get("path", ""), message, openai_code)
    response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        *(headers or [])]
    if close:
        response_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body})
