"""``GET /openapi.json``: the OpenAPI 3.1 description of every HTTP route.

The KServe, generate, seed and ChatGLM parts are a file (``openapi.json`` next to this
module) stating the wire formats as clients see them; the OpenAI part is generated from
the pydantic models the routes validate with (:mod:`.openai.protocol`), so it cannot drift
from them. The answers of the edge, which every operation can give whatever its route
(the API key of :mod:`.auth`, the limits of :mod:`.limits` and :mod:`.protocol`, a bug's
500), are added to every operation here, from the same rule the edge applies, in the
path's dialect (:mod:`.refusal`). tests/test_openapi.py checks real responses of each
route, errors included, against the whole.
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

from triserve.frontends.auth import CallKind
from triserve.frontends.http.auth import call_kind
from triserve.frontends.http.openai.protocol import SCHEMAS
from triserve.frontends.http.refusal import OPENAI_PREFIX

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")
_REF = "#/components/schemas/"
_REQUESTS = {"ChatCompletionRequest", "CompletionRequest"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF + name}}}


_OPENAI_ERRORS = {
    404: "Not found (code model_not_found): no such chat model",
    429: "Rate limit (type and code rate_limit_exceeded): the model's queue is full; retry later",
    503: "Unavailable: the model is not ready (loading, restarting, failed) or the server is "
         "shutting down (draining)",
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"description": _OPENAI_ERRORS.get(status, "OpenAI error object"),
                          "content": _json("OpenAIError")} for status in statuses}


def _answer(description: str, openai: bool, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": _json("OpenAIError" if openai else "Error")}
    if headers:
        answer["headers"] = headers
    return answer


_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "Bearer", "required": True,
                                        "schema": {"type": "string"}}}


def _edge_responses(method: str, path: str) -> dict[str, dict[str, Any]]:
    """What any request to ``path`` may be answered before (or whatever) its route does."""
    openai = path.startswith(OPENAI_PREFIX)
    kind = call_kind(method.upper(), path)
    answers = {
        "400": _answer("Bad request: a body whose Content-Encoding is not gzip/deflate or does not "
                       "inflate, JSON nested deeper than --max-json-depth, or (the route's own) "
                       "input that does not fit the operation; the message names the problem", openai),
        "408": _answer("The request head or body did not arrive within --request-body-timeout; "
                       "the connection is closed", openai),
        "413": _answer("The body is over --max-request-body, or inflates past "
                       "--max-decompressed-body; the connection is closed", openai),
        "431": _answer("The request line and headers are over 64 KiB; the connection is closed", openai),
        "500": _answer("A model's own error, or a server bug: then the message holds only the "
                       "exception's type and a reference to the server log's entry "
                       "(\"internal error (T); the server log has the details under reference R\")",
                       openai),
    }
    if kind is CallKind.HEALTH:
        answers["401"] = _answer("The server has an API key (--api-key) and the request no or a wrong "
                                 "one (Authorization: Bearer <key>); not with --open-health",
                                 openai, _WWW_AUTHENTICATE)
    elif kind is CallKind.CONTROL:
        answers["401"] = _answer("The server has a model control key (--model-control-key) and the "
                                 "request no or a wrong one (Authorization: Bearer <key>)",
                                 openai, _WWW_AUTHENTICATE)
        answers["403"] = _answer("Model control is disabled: the server has an API key but no model "
                                 "control key", openai)
    elif kind is CallKind.API:
        answers["401"] = _answer("The server has an API key (--api-key) and the request no or a wrong "
                                 "one (Authorization: Bearer <key>)", openai, _WWW_AUTHENTICATE)
    return answers


def _with_edge_responses(paths: dict[str, Any]) -> None:
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status, answer in _edge_responses(method, path).items():
                if status in responses and status in ("400", "500"):
                    responses[status]["description"] = answer["description"]  # the route's errors and the edge's
                responses.setdefault(status, answer)
            operation["responses"] = dict(sorted(responses.items()))


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
    _with_edge_responses(spec["paths"])
    return json.dumps(spec).encode()


def routes() -> list[BaseRoute]:
    async def openapi(request: Request) -> Response:
        return Response(document(), media_type="application/json")

    return [Route("/openapi.json", openapi, methods=["GET"])]
