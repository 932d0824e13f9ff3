"""Every HTTP error answers with Triton's shape, ``{"error": "<message>"}``.

Routes raise :class:`InferError`; the app's exception handlers (:mod:`.refusal`, which
answers in the path's dialect: OpenAI's shape under ``/v1/``) turn it, Starlette's own
404/405 and anything unexpected into an error with the status its code maps to, so no
route formats errors itself and clients always get a readable message.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from triserve.core.errors import InferError
from triserve.frontends.faults import report_bug
from triserve.frontends.http.jsonio import JSONResponse

logger = logging.getLogger("triserve.http")


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def error_response(error: InferError) -> Response:
    return JSONResponse(error_body(error.message), status_code=error.code.http_status)


def unexpected_error_body(method: str, path: str, exc: Exception) -> dict[str, str]:
    """Log a bug with its traceback; the client gets a 500 with this body (no server internals:
    see :mod:`triserve.frontends.faults`), the server keeps serving."""
    return error_body(report_bug(logger, f"serving {method} {path}", exc))


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    # No one is left to read it: 499 is nginx's "client closed request", for the access log.
    return Response(status_code=499)
