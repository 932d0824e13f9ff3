"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

A thin frontend over the chat contract (docs/ARCHITECTURE.md): an OpenAI request
becomes one :class:`InferRequest` with ``prompt``, ``history``, ``system`` and the
sampling inputs, and the core's responses become OpenAI's JSON or SSE chunks.
Any model whose metadata has input ``prompt`` and output ``response`` is served;
the backend is never consulted.

OpenAI clients send many optional fields. Each one is either mapped onto a chat
input, or accepted only at its neutral value (``n=1``, ``logprobs=false``, ...),
or rejected with a 400 that names it: nothing a client sends is silently dropped.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Send

from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor
from triserve.core.chat_contract import is_chat_model
from triserve.frontends.http import jsonio
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.server import InferenceServer


class FieldError(InferError):
    """An invalid request field; ``param`` names it in OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None,
                 code: ErrorCode = ErrorCode.INVALID_ARGUMENT):
        super().__init__(code, message)
        self.param = param


def error_body(error: InferError) -> dict[str, Any]:
    """OpenAI's error object for any core or request error."""
    status = error.code.http_status
    return {
        "error": {
            "message": error.message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": error.param if isinstance(error, FieldError) else None,
            "code": "model_not_found" if error.code is ErrorCode.NOT_FOUND else None,
        }
    }


def error_response(error: InferError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.code.http_status)


# --- reading the request body -------------------------------------------------------------

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                    int: "an integer", float: "a decimal", type(None): "null"}

#: Fields OpenAI defines that triserve cannot honour, with the values that ask for nothing
#: (so clients that always send them keep working) and why anything else is refused.
_NEUTRAL_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "only n=1 is supported: triserve returns one choice per request"),
    "best_of": ((None, 1), "only best_of=1 is supported: triserve returns one choice per request"),
    "logprobs": ((None, False, 0), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "top_logprobs are not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported; use repetition_penalty"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported; use repetition_penalty"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}),
                        "response_format other than {'type': 'text'} is not supported"),
    "user": ((None,), "'user' is not supported"),
}

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                    "seed", "stop", "stream", "stream_options"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """``value`` equals one of ``neutral``, without letting ``true`` pass for 1 or ``0`` for false."""
    return any(value == option and isinstance(value, bool) == isinstance(option, bool) for option in neutral)


def _type_error(name: str, expected: str, value: Any) -> FieldError:
    got = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    return FieldError(f"Invalid type for '{name}': expected {expected}, but got {got} instead.", name)


class Body:
    """A request's JSON object with typed, range-checked accessors that name the field."""

    def __init__(self, payload: dict[str, Any], allowed: set[str]):
        self.payload = payload
        for name, value in payload.items():
            if name in _NEUTRAL_ONLY:
                neutral, reason = _NEUTRAL_ONLY[name]
                if not _is_neutral(value, neutral):
                    raise FieldError(reason, name)
            elif name not in allowed:
                raise FieldError(f"Unrecognized request argument supplied: {name}", name)

    @classmethod
    async def read(cls, request: Request, allowed: set[str]) -> "Body":
        return cls(jsonio.loads_object(await request.body()), allowed)

    def string(self, name: str, required: bool = False) -> str | None:
        value = self.payload.get(name)
        if value is None:
            if required:
                raise FieldError(f"Missing required parameter: '{name}'.", name)
            return None
        if not isinstance(value, str):
            raise _type_error(name, "a string", value)
        return value

    def boolean(self, name: str) -> bool:
        value = self.payload.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _type_error(name, "a boolean", value)
        return value

    def integer(self, name: str, minimum: int | None = None) -> int | None:
        value = self.payload.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, "an integer", value)
        if minimum is not None and value < minimum:
            raise FieldError(f"Invalid value for '{name}': must be at least {minimum}, got {value}.", name)
        return value

    def number(self, name: str, low: float, high: float, low_open: bool = False) -> float | None:
        value = self.payload.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, "a decimal", value)
        if value > high or value < low or (low_open and value == low):
            bound = f"greater than {low}" if low_open else f"at least {low}"
            raise FieldError(
                f"Invalid value for '{name}': must be {bound} and at most {high}, got {value}.", name)
        return float(value)

    def stop(self) -> list[str]:
        """``stop``: a string or a list of strings (OpenAI allows both)."""
        value = self.payload.get("stop")
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise _type_error("stop", "a string or an array of strings", value)

    def include_usage(self, stream: bool) -> bool:
        """``stream_options.include_usage``; OpenAI allows ``stream_options`` only when streaming."""
        options = self.payload.get("stream_options")
        if options is None:
            return False
        if not stream:
            raise FieldError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                             "stream_options")
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise FieldError(f"Unrecognized stream_options: {', '.join(sorted(unknown))}", "stream_options")
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise _type_error("stream_options.include_usage", "a boolean", include)
        return include


# --- messages onto the chat contract -----------------------------------------------------

_SYSTEM_ROLES = ("system", "developer")


@dataclass
class Conversation:
    """OpenAI messages in the chat contract's terms."""

    system: str = ""
    history: list[str] = field(default_factory=list)  # flattened (user, assistant) pairs
    prompt: str = ""


def _message_text(content: Any, where: str) -> str:
    """A message's text: a string, or an array of text parts (joined as OpenAI does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(f"{where}.content", "a string or an array of content parts", content)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FieldError(f"{where}.content[{index}]: only text content parts are supported, got '{kind}'",
                             "messages")
        texts.append(part["text"])
    return "".join(texts)


def conversation(messages: Any) -> Conversation:
    """Map ``messages`` onto system, history pairs and the prompt.

    System (and developer) messages are joined; user and assistant turns are paired in
    order, a turn without a partner of the other role getting an empty one; the last
    message must come from the user: it is the prompt.
    """
    if messages is None:
        raise FieldError("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise FieldError("'messages' must contain at least one message.", "messages")
    systems: list[str] = []
    pairs: list[tuple[str, str]] = []
    pending_user: str | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _type_error(where, "an object", message)
        role = message.get("role")
        if role in ("tool", "function"):
            raise FieldError(f"{where}: '{role}' messages are not supported: triserve has no tool calling",
                             "messages")
        if role not in (*_SYSTEM_ROLES, "user", "assistant"):
            raise FieldError(f"{where}: unknown role {role!r}; expected system, developer, user or assistant",
                             "messages")
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise FieldError(f"{where}: unsupported message field(s): {', '.join(sorted(unknown))}",
                             "messages")
        if "content" not in message:
            raise FieldError(f"{where}: missing 'content'", "messages")
        text = _message_text(message["content"], where)
        if role in _SYSTEM_ROLES:
            systems.append(text)
        elif role == "user":
            if pending_user is not None:
                pairs.append((pending_user, ""))
            pending_user = text
        else:
            pairs.append((pending_user or "", text))
            pending_user = None
    if pending_user is None:
        raise FieldError("The last non-system message must have role 'user': it is the prompt the model answers.",
                         "messages")
    return Conversation(system="\n\n".join(systems),
                        history=[text for pair in pairs for text in pair],
                        prompt=pending_user)


# --- building the InferRequest -----------------------------------------------------------

def _text_tensor(name: str, values: list[str]) -> InferTensor:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    return InferTensor.from_numpy(name, array, "BYTES")


class ChatInputs:
    """Collects chat-contract inputs, refusing one the model does not declare.

    Each input is added under the OpenAI field that asked for it, so the error names
    what the client sent rather than our internal input name.
    """

    def __init__(self, model_name: str, metadata: dict[str, Any]):
        self.model_name = model_name
        self.declared = [tensor["name"] for tensor in metadata.get("inputs", [])]
        self.tensors: list[InferTensor] = []

    def accepts(self, input_name: str) -> bool:
        return input_name in self.declared

    def add(self, input_name: str, values: list[str], param: str, feature: str = "") -> None:
        """Add an input; ``feature`` says what is missing when it is not ``param`` itself."""
        if not self.accepts(input_name):
            raise FieldError(
                f"model '{self.model_name}' does not support {feature or repr(param)}: it has no "
                f"'{input_name}' input (its inputs: {', '.join(self.declared)})", param)
        self.tensors.append(_text_tensor(input_name, values))

    def add_scalar(self, input_name: str, value: Any, param: str) -> None:
        if value is not None:
            self.add(input_name, [str(value)], param)


@dataclass
class Generation:
    """What the client asked for, besides the model inputs."""

    model: str
    stream: bool
    include_usage: bool
    request: InferRequest


def _model_metadata(core: InferenceServer, name: str) -> dict[str, Any]:
    try:
        metadata = core.get_model(name).metadata()
    except InferError as error:
        if error.code is ErrorCode.NOT_FOUND:
            raise FieldError(f"The model '{name}' does not exist", "model", ErrorCode.NOT_FOUND) from None
        raise
    if not is_chat_model(metadata):
        raise FieldError(f"The model '{name}' is not a chat model: a chat model has input 'prompt' "
                         "and output 'response'", "model", ErrorCode.NOT_FOUND)
    return metadata


def generation(core: InferenceServer, body: Body, request_id: str,
               text_inputs: Callable[[ChatInputs], None]) -> Generation:
    """The sampling fields common to both endpoints, plus the endpoint's text inputs."""
    model = body.string("model", required=True)
    inputs = ChatInputs(model, _model_metadata(core, model))
    text_inputs(inputs)
    max_tokens = body.integer("max_tokens", minimum=1)
    max_completion_tokens = body.integer("max_completion_tokens", minimum=1)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise FieldError("Give 'max_tokens' or 'max_completion_tokens', not two different values.",
                         "max_completion_tokens")
    if max_completion_tokens is not None:
        inputs.add_scalar("max_new_tokens", max_completion_tokens, "max_completion_tokens")
    else:
        inputs.add_scalar("max_new_tokens", max_tokens, "max_tokens")
    inputs.add_scalar("temperature", body.number("temperature", 0, 2), "temperature")
    inputs.add_scalar("top_p", body.number("top_p", 0, 1, low_open=True), "top_p")
    inputs.add_scalar("top_k", body.integer("top_k", minimum=0), "top_k")
    inputs.add_scalar("repetition_penalty",
                      body.number("repetition_penalty", 0, float("inf"), low_open=True), "repetition_penalty")
    inputs.add_scalar("seed", body.integer("seed"), "seed")
    stop = body.stop()
    if stop:
        inputs.add("stop", stop, "stop")
    stream = body.boolean("stream")
    include_usage = body.include_usage(stream)
    # A model without a `stream` input still streams: its responses arrive whole.
    if stream and inputs.accepts("stream"):
        inputs.add("stream", ["true"], "stream")
    return Generation(model, stream, include_usage,
                      InferRequest(model_name=model, id=request_id, inputs=inputs.tensors))


def chat_generation(core: InferenceServer, body: Body, request_id: str) -> Generation:
    def text_inputs(inputs: ChatInputs) -> None:
        turns = conversation(body.payload.get("messages"))
        inputs.add("prompt", [turns.prompt], "messages")
        if turns.history:
            inputs.add("history", turns.history, "messages", "earlier turns (history)")
        if turns.system:
            inputs.add("system", [turns.system], "messages", "system messages")
    return generation(core, body, request_id, text_inputs)


def completion_generation(core: InferenceServer, body: Body, request_id: str) -> Generation:
    def text_inputs(inputs: ChatInputs) -> None:
        prompt = body.payload.get("prompt")
        if not isinstance(prompt, str):
            raise _type_error("prompt", "a string (token arrays and prompt batches are not supported)", prompt)
        inputs.add("prompt", [prompt], "prompt")
        inputs.add("raw", ["true"], "prompt", "text completion without a chat template")
    return generation(core, body, request_id, text_inputs)


# --- responses --------------------------------------------------------------------------

def response_text(response: InferResponse) -> str:
    tensor = response.output("response")
    if tensor is None:
        return ""
    return b"".join(tensor.data.reshape(-1)).decode("utf-8")


def usage(parameters: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI usage from the final response's token counts (absent when the model reports none)."""
    if "prompt_tokens" not in parameters:
        return None
    prompt_tokens = int(parameters["prompt_tokens"])
    completion_tokens = int(parameters.get("completion_tokens", 0))
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if "cached_tokens" in parameters:
        counts["prompt_tokens_details"] = {"cached_tokens": int(parameters["cached_tokens"])}
    return counts


class CompletionFormat(ABC):
    """OpenAI's envelope for one completion: its id, and the shape of bodies and chunks."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model: str, completion_id: str):
        self.id = completion_id
        self.created = int(time.time())
        self.model = model

    @classmethod
    def new_id(cls) -> str:
        return f"{cls.id_prefix}{uuid.uuid4().hex}"

    def envelope(self, object_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def body(self, text: str, finish_reason: str, counts: dict[str, Any] | None) -> dict[str, Any]:
        return self.envelope(self.object_name, [self.whole_choice(text, finish_reason)], usage=counts)

    @abstractmethod
    def whole_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        """One choice of a non-streamed body."""

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    @abstractmethod
    def piece_chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """One streamed chunk carrying a piece of text and/or the finish reason."""


class ChatCompletionFormat(CompletionFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def whole_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}

    def delta_chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return self.envelope(self.chunk_object_name, [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [self.delta_chunk({"role": "assistant", "content": ""}, None)]

    def piece_chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return self.delta_chunk({} if text is None else {"content": text}, finish_reason)


class TextCompletionFormat(CompletionFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def whole_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def piece_chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return self.envelope(self.chunk_object_name, [self.whole_choice(text or "", finish_reason)])


_SSE_DONE = b"data: [DONE]\n\n"


async def _next_response(responses: AsyncIterator[InferResponse]) -> InferResponse:
    """The next response; a stream that ends without a final response is a server fault."""
    try:
        response = await anext(responses)
    except StopAsyncIteration:
        raise InferError.internal("the model's response stream ended without a final response") from None
    if response.error is not None:
        raise response.error
    return response


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body iterator however the stream ends.

    When the client goes away Starlette cancels the send loop and abandons the body
    iterator; closing it here (shielded from that cancellation) runs its ``finally``,
    which closes the core's stream and so cancels generation in the backend.
    """

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _sse_events(fmt: CompletionFormat, first: InferResponse, responses: AsyncIterator[InferResponse],
                      include_usage: bool) -> AsyncIterator[bytes]:
    # With include_usage OpenAI sends "usage": null on every chunk but the usage chunk.
    extra = {"usage": None} if include_usage else {}
    try:
        for chunk in fmt.opening_chunks():
            yield jsonio.sse_event({**chunk, **extra})
        response = first
        while True:
            piece = response_text(response)
            if piece:
                yield jsonio.sse_event({**fmt.piece_chunk(piece, None), **extra})
            if response.final:
                break
            response = await _next_response(responses)
        finish_reason = str(response.parameters.get("finish_reason", "stop"))
        yield jsonio.sse_event({**fmt.piece_chunk(None, finish_reason), **extra})
        if include_usage:
            yield jsonio.sse_event(fmt.envelope(fmt.chunk_object_name, [], usage=usage(response.parameters)))
        yield _SSE_DONE
    except InferError as error:
        yield jsonio.sse_event(error_body(error))
    finally:
        await responses.aclose()


async def complete(core: InferenceServer, gen: Generation, fmt: CompletionFormat) -> Response:
    """Run one generation and answer as JSON, or as SSE chunks when streaming.

    The first response is awaited before answering, so request errors (bad input,
    model not ready) still get their HTTP status instead of a 200 stream.
    """
    responses = core.stream(gen.request)
    try:
        first = await _next_response(responses)
    except BaseException:
        await responses.aclose()
        raise
    if gen.stream:
        return ClosingStreamingResponse(_sse_events(fmt, first, responses, gen.include_usage),
                                        media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})
    pieces = [response_text(first)]
    final = first
    try:
        while not final.final:
            final = await _next_response(responses)
            pieces.append(response_text(final))
    finally:
        await responses.aclose()
    finish_reason = str(final.parameters.get("finish_reason", "stop"))
    return JSONResponse(fmt.body("".join(pieces), finish_reason, usage(final.parameters)))


# --- routes -------------------------------------------------------------------------------

def model_card(name: str) -> dict[str, Any]:
    # "created" is required by OpenAI's schema; the core does not expose load times.
    return {"id": name, "object": "model", "created": 0, "owned_by": "triserve"}


def routes(core: InferenceServer) -> list[BaseRoute]:
    """The OpenAI-compatible routes, for the HTTP app to mount."""

    async def list_models(request: Request) -> Response:
        names = [name for name in core.model_names() if is_chat_model(core.get_model(name).metadata())]
        return JSONResponse({"object": "list", "data": [model_card(name) for name in names]})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            _model_metadata(core, name)
        except InferError as error:
            return error_response(error)
        return JSONResponse(model_card(name))

    def endpoint(allowed: set[str], build: Callable[[InferenceServer, Body, str], Generation],
                 fmt_class: type[CompletionFormat]) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                body = await Body.read(request, allowed)
                completion_id = fmt_class.new_id()
                gen = build(core, body, completion_id)
                # A stream watches for the client itself; until it starts, and for a JSON answer, this does.
                return await until_disconnected(request.receive,
                                                complete(core, gen, fmt_class(gen.model, completion_id)))
            except InferError as error:
                return error_response(error)
        return handle

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", endpoint(CHAT_FIELDS, chat_generation, ChatCompletionFormat),
              methods=["POST"]),
        Route("/v1/completions", endpoint(COMPLETION_FIELDS, completion_generation, TextCompletionFormat),
              methods=["POST"]),
    ]
