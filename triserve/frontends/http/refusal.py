"""Answering a request no route answered: refused before any route sees it (auth, limits),
matching no route (Starlette's 404/405), or failed by a bug (500).

The answer speaks the dialect of the path it was sent to: OpenAI's error object
under ``/v1/`` (so the ``openai`` client raises its usual ``AuthenticationError``
or ``BadRequestError``), Triton's ``{"error": "<message>"}`` everywhere else.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Scope, Send

from triserve.core.errors import InferError
from triserve.frontends.http import errors, jsonio
from triserve.frontends.http.errors import error_body
from triserve.frontends.http.openai.protocol import error_body as openai_error_body
from triserve.frontends.http.openai.protocol import error_status as openai_error_status

OPENAI_PREFIX = "/v1/"


def refusal_body(path: str, message: str, openai_code: str | None = None, server_error: bool = False) -> bytes:
    if path.startswith(OPENAI_PREFIX):
        document = openai_error_body(InferError.internal(message) if server_error else InferError.invalid(message))
        document["error"]["code"] = openai_code
        return jsonio.dumps(document)
    return jsonio.dumps(error_body(message))


async def _on_infer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InferError)
    if request.url.path.startswith(OPENAI_PREFIX):
        return Response(jsonio.dumps(openai_error_body(exc)), status_code=openai_error_status(exc),
                        media_type="application/json")
    return errors.error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    return Response(refusal_body(path, f"{request.method} {path}: {exc.detail}"), status_code=exc.status_code,
                    headers=exc.headers, media_type="application/json")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    message = errors.unexpected_error_body(request.method, request.url.path, exc)["error"]
    return Response(refusal_body(request.url.path, message, server_error=True), status_code=500,
                    media_type="application/json")


# Starlette's exception handlers, each answer in the path's dialect.
EXCEPTION_HANDLERS = {
    InferError: _on_infer_error,
    HTTPException: _on_http_exception,
    ClientDisconnect: errors.on_client_disconnect,
    Exception: _on_unexpected,
}


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
