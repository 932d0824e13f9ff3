"""``GET /openapi.json``: the OpenAPI 3.1 description of every HTTP route.

The KServe, generate, seed and ChatGLM parts are a file (``openapi.json`` next to this
module) stating the wire formats as clients see them; the OpenAI part is generated from
the pydantic models the routes validate with (:mod:`.openai.protocol`), so it cannot drift
from them. tests/test_openapi.py checks real responses of each route against the whole.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from triserve.frontends.http.openai.protocol import SCHEMAS

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")
_REF = "#/components/schemas/"
_REQUESTS = {"ChatCompletionRequest", "CompletionRequest"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF + name}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": "OpenAI error object", "content": _json("OpenAIError")}
            for status in statuses}


def _openai_paths() -> dict[str, Any]:
    completion_errors = _errors(400, 404, 429, 500, 503)
    return {
        "/v1/models": {"get": {"tags": ["OpenAI"], "summary": "The chat models",
                               "responses": {"200": {"description": "OK", "content": _json("OpenAIModelList")}}}},
        "/v1/models/{model}": {"get": {
            "tags": ["OpenAI"], "summary": "One chat model",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", "content": _json("OpenAIModel")}, **_errors(404)}}},
        "/v1/chat/completions": {"post": {
            "tags": ["OpenAI"],
            "summary": "Chat completion (stream: server-sent chat.completion.chunk events, then data: [DONE])",
            "requestBody": {"required": True, "content": _json("ChatCompletionRequest")},
            "responses": {"200": {"description": "OK", "content": {
                **_json("ChatCompletion"),
                "text/event-stream": {"schema": {"$ref": _REF + "ChatCompletionChunk"}}}},
                **completion_errors}}},
        "/v1/completions": {"post": {
            "tags": ["OpenAI"], "summary": "Text completion (raw prompt, no chat template)",
            "requestBody": {"required": True, "content": _json("CompletionRequest")},
            "responses": {"200": {"description": "OK", "content": {
                **_json("Completion"), "text/event-stream": {"schema": {"$ref": _REF + "Completion"}}}},
                **completion_errors}}},
    }


def _openai_schemas() -> dict[str, Any]:
    """Components for the OpenAI models (requests as validated, responses as serialized)."""
    names = {model.__name__: name for name, model in SCHEMAS.items()}
    _, document = models_json_schema(
        [(model, "validation" if name in _REQUESTS else "serialization") for name, model in SCHEMAS.items()],
        ref_template=_REF + "{model}")
    text = json.dumps(document["$defs"])
    for class_name, name in names.items():
        text = text.replace(f'"{_REF}{class_name}"', f'"{_REF}{name}"')
    return {names.get(key, key): value for key, value in json.loads(text).items()}


@cache
def document() -> bytes:
    spec = json.loads(DOCUMENT_PATH.read_bytes())
    schemas = spec["components"]["schemas"]
    generated = _openai_schemas()
    clash = sorted(set(generated) & set(schemas))
    if clash:
        raise RuntimeError(f"openapi.json already has schemas named {clash}")
    schemas.update(copy.deepcopy(generated))
    spec["paths"].update(_openai_paths())
    return json.dumps(spec).encode()


def routes() -> list[BaseRoute]:
    async def openapi(request: Request) -> Response:
        return Response(document(), media_type="application/json")

    return [Route("/openapi.json", openapi, methods=["GET"])]
