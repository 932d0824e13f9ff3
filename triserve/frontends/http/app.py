"""The HTTP frontend: one Starlette app assembling the routes of every dialect.

Each dialect module owns its routes; this module only puts them together (the
most specific first, ChatGLM's catch-all ``POST /`` last) and installs the shared
error handlers, so every route answers errors as ``{"error": "<message>"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from starlette.applications import Starlette

from triserve.frontends.http import chatglm, generate, kserve, legacy, openai, openapi
from triserve.frontends.http.errors import EXCEPTION_HANDLERS

if TYPE_CHECKING:
    from triserve.core.server import InferenceServer


class HttpOptions(Protocol):
    """What the HTTP app is configured with (the CLI's parsed arguments fit)."""

    chatglm_model: str | None  # the model behind ChatGLM's api.py; None: the first chat model


def create_app(core: InferenceServer, options: HttpOptions) -> Starlette:
    routes = [
        *kserve.routes(core),
        *generate.routes(core),
        *openai.routes(core),
        *openapi.routes(),
        *legacy.routes(core),
        *chatglm.routes(core, options.chatglm_model),
    ]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
