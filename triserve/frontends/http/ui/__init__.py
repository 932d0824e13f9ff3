"""The chat page: ``GET /`` and ``GET /ui`` serve a small static page (no build step, no CDN)
that talks to the OpenAI routes (``/v1/models``, ``/v1/chat/completions`` streamed).

Only the files in ``static/`` are served, by name, read once: no path from the request
reaches the file system. ChatGLM's ``POST /`` is another route on the same path.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

_STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
# The page changes with the server; a browser asks again each time (answers are small).
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}


def _load() -> dict[str, tuple[bytes, str]]:
    return {path.name: (path.read_bytes(), _TYPES[path.suffix])
            for path in sorted(_STATIC.iterdir()) if path.suffix in _TYPES}


def routes() -> list[BaseRoute]:
    files = _load()
    page, page_type = files["index.html"]

    async def index(request: Request) -> Response:
        return Response(page, media_type=page_type, headers=_HEADERS)

    async def asset(request: Request) -> Response:
        found = files.get(request.path_params["name"])
        if found is None:
            return Response(b'{"error":"no such file"}', status_code=404, media_type="application/json")
        return Response(found[0], media_type=found[1], headers=_HEADERS)

    async def to_page(request: Request) -> Response:
        return RedirectResponse("/ui", status_code=308)

    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/ui", index, methods=["GET", "HEAD"]),
        Route("/ui/", to_page, methods=["GET", "HEAD"]),
        Route("/ui/{name}", asset, methods=["GET", "HEAD"]),
    ]
