"""ChatGLM's own ``api.py``: ``POST /`` with ``{"prompt", "history", "max_length", "top_p",
"temperature"}`` answering ``{"response", "history", "status", "time"}``.

Clients written for ChatGLM (``langchain_community.llms.ChatGLM`` among them) work
unchanged against any chat model (see the chat contract in docs/ARCHITECTURE.md).
Each field goes to the model input of the same meaning when the model declares it,
otherwise to a request parameter of that name, so nothing the client sent is lost.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse
from triserve.core.chat_contract import is_chat_model
from triserve.frontends.http import jsonio, tensors
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.api import ModelView
    from triserve.core.api import Core

# api.py's request field -> chat contract input.
_FIELD_TO_INPUT = {"max_length": "max_token", "top_p": "top_p", "temperature": "temperature"}
# What api.py's numeric fields must be (its model.chat would fail on anything else).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"max_length": (int,), "top_p": (int, float), "temperature": (int, float)}
# api.py's defaults, sent only to models that declare the input.
_DEFAULTS = {"max_token": 2048, "top_p": 0.7, "temperature": 0.95}
# Chat contract inputs a client may also send by their own name.
_EXTRA_INPUTS = frozenset(
    {"system", "history_len", "max_new_tokens", "top_k", "repetition_penalty", "seed", "stop"}
)


def find_chat_model(core: Core, name: str | None) -> ModelView:
    """The named model, which must be a chat model; without a name, the first ready one."""
    if name:
        model = core.get_model(name)
        if not is_chat_model(model.metadata()):
            raise InferError.invalid(f"model '{name}' is not a chat model (input 'prompt', output 'response')")
        return model
    for candidate in core.model_names():
        model = core.get_model(candidate)
        if is_chat_model(model.metadata()):
            return model
    raise InferError.unavailable(
        "no chat model is ready (a model with input 'prompt' and output 'response'); "
        "choose one with --chatglm-model"
    )


def decode_chat_request(metadata: dict[str, Any], document: dict[str, Any]) -> InferRequest:
    """ChatGLM's request as an inference request on the chat model ``metadata`` describes."""
    fields = dict(document)
    prompt = fields.pop("prompt", None)
    if not isinstance(prompt, str):
        raise InferError.invalid("'prompt' is required and must be a string")
    pairs = _history_pairs(fields.pop("history", None))
    sent: dict[str, Any] = {"prompt": prompt, "history": [text for pair in pairs for text in pair]}
    for key, value in fields.items():
        if key in _FIELD_TO_INPUT:
            if value is not None and (isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[key])):
                raise InferError.invalid(f"'{key}' must be a number, not {value!r:.40}")
            key = _FIELD_TO_INPUT[key]
        elif key not in _EXTRA_INPUTS:
            raise InferError.invalid(
                f"unknown field '{key}'; ChatGLM's api.py takes prompt, history, "
                f"{', '.join(_FIELD_TO_INPUT)} (and the chat inputs {', '.join(sorted(_EXTRA_INPUTS))})"
            )
        if value is not None:
            sent[key] = value
    # api.py passes the whole history to the model.
    defaults = {**_DEFAULTS, "history_len": len(pairs)}

    declared = {entry["name"]: entry for entry in metadata["inputs"]}
    inputs = []
    parameters = {}
    for name, value in {**defaults, **sent}.items():
        if name in declared:
            entry = declared[name]
            inputs.append(tensors.tensor_from_value(name, entry["datatype"], value, len(entry["shape"])))
        elif name in sent:
            parameters[name] = value
    return InferRequest(metadata["name"], inputs=inputs, parameters=parameters)


def chat_document(response: InferResponse, prompt: str, history: list[list[str]]) -> dict[str, Any]:
    """api.py's answer; the model's ``history`` output (``[q1, a1, ...]``) becomes pairs."""
    response_tensor = response.output("response")
    if response_tensor is None:
        raise InferError.internal(f"model '{response.model_name}' sent no 'response' output")
    text = "".join(tensors.json_data(response_tensor))
    history_tensor = response.output("history")
    if history_tensor is None:
        history = [*history, [prompt, text]]
    else:
        flat = tensors.json_data(history_tensor)
        history = [flat[i : i + 2] for i in range(0, len(flat), 2)]
    return {
        "response": text,
        "history": history,
        "status": 200,
        "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }


def _history_pairs(history: Any) -> list[list[str]]:
    if history is None:
        return []
    if not isinstance(history, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)
        for pair in history
    ):
        raise InferError.invalid("'history' must be a list of [question, answer] pairs of strings")
    return history


def routes(core: Core, model_name: str | None) -> list[BaseRoute]:
    """``POST /`` on ``model_name``, or on the first ready chat model when it is None."""

    async def chat(request: Request) -> Response:
        document = jsonio.loads_object(await request.body())
        model = find_chat_model(core, model_name)
        infer_request = decode_chat_request(model.metadata(), document)
        response = await until_disconnected(request.receive, core.infer(infer_request))
        return JSONResponse(chat_document(response, document["prompt"], document.get("history") or []))

    return [Route("/", chat, methods=["POST"])]
