"""Every HTTP error answers with Triton's shape, ``{"error": "<message>"}``.

Routes raise :class:`InferError`; the handlers here turn it (and Starlette's own
404/405, and anything unexpected) into that JSON with the status its code maps
to, so no route formats errors itself and clients always get a readable message.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from triserve.core.errors import InferError
from triserve.frontends.faults import report_bug
from triserve.frontends.http.jsonio import JSONResponse

logger = logging.getLogger("triserve.http")


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def error_response(error: InferError) -> Response:
    return JSONResponse(error_body(error.message), status_code=error.code.http_status)


async def _on_infer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InferError)
    return error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)


def unexpected_error_body(method: str, path: str, exc: Exception) -> dict[str, str]:
    """Log a bug with its traceback; the client gets a 500 with this body (no server internals:
    see :mod:`triserve.frontends.faults`), the server keeps serving."""
    return error_body(report_bug(logger, f"serving {method} {path}", exc))


async def _on_client_disconnect(request: Request, exc: Exception) -> Response:
    # No one is left to read it: 499 is nginx's "client closed request", for the access log.
    return Response(status_code=499)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return JSONResponse(unexpected_error_body(request.method, request.url.path, exc), status_code=500)


EXCEPTION_HANDLERS = {
    InferError: _on_infer_error,
    HTTPException: _on_http_exception,
    ClientDisconnect: _on_client_disconnect,
    Exception: _on_unexpected,
}
