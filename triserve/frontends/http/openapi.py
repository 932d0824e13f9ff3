"""``GET /openapi.json``: the OpenAPI 3.1 description of every HTTP route.

The document is a file (``openapi.json`` next to this module) rather than generated,
so it states the wire formats as clients see them; tests/test_openapi.py checks real
responses of each route against it.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")


def routes() -> list[BaseRoute]:
    document = DOCUMENT_PATH.read_bytes()

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    return [Route("/openapi.json", openapi, methods=["GET"])]
