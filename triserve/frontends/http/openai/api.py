"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

A thin frontend over the chat contract (docs/ARCHITECTURE.md): any model whose metadata
has input ``prompt`` and output ``response`` is served; the backend is never consulted.
Request and response types are in :mod:`.protocol`; :mod:`.serving_chat` and
:mod:`.serving_completion` turn requests into chat-contract inputs and the core's
responses into OpenAI's JSON or SSE chunks (through the shared :mod:`..sse` path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from triserve.core.chat_contract import is_chat_model
from triserve.core.errors import InferError
from triserve.frontends.http.jsonio import JSONResponse
from triserve.frontends.http.openai.serving import error_response, model_metadata
from triserve.frontends.http.openai.serving_chat import ChatCompletions
from triserve.frontends.http.openai.serving_completion import Completions

if TYPE_CHECKING:
    from triserve.core.api import Core


def model_card(name: str) -> dict[str, Any]:
    # "created" is required by OpenAI's schema; the core does not expose load times.
    return {"id": name, "object": "model", "created": 0, "owned_by": "triserve"}


def routes(core: Core) -> list[BaseRoute]:
    """The OpenAI-compatible routes, for the HTTP app to mount."""

    async def list_models(request: Request) -> Response:
        names = [name for name in core.model_names() if is_chat_model(core.get_model(name).metadata())]
        return JSONResponse({"object": "list", "data": [model_card(name) for name in names]})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            model_metadata(core, name)
        except InferError as error:
            return error_response(error)
        return JSONResponse(model_card(name))

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", ChatCompletions(core).handle, methods=["POST"]),
        Route("/v1/completions", Completions(core).handle, methods=["POST"]),
    ]
