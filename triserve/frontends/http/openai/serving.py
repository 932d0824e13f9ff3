"""What both OpenAI endpoints share: the model lookup, building chat-contract inputs, running
``n`` generations side by side, and reading the core's responses.

A request becomes ``n`` core requests (one per choice; with a seed, choice ``i`` uses
``seed + i`` so that the choices differ but repeat). Their responses are merged in arrival
order; the endpoint turns each into OpenAI's JSON or SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from triserve.core.chat_contract import (
    IGNORE_EOS, LOGPROBS, MAX_NEW_TOKENS, MIN_P, RESPONSE, TOOL_CALLS, FREQUENCY_PENALTY, PRESENCE_PENALTY,
    REPETITION_PENALTY, SEED, STOP, STREAM, TEMPERATURE, TOP_K, TOP_P, is_chat_model,
)
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor
from triserve.frontends.http import sse
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import JSONResponse
from triserve.frontends.http.openai.protocol import (
    FieldError, SamplingRequest, error_body, error_status, field_error,
)

if TYPE_CHECKING:
    from triserve.core.api import Core


def error_response(error: InferError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error_status(error))


def parse_body(model: type[SamplingRequest], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise field_error(exc) from None


def model_metadata(core: Core, name: str) -> dict[str, Any]:
    """A chat model's metadata; any other name is OpenAI's 404 ``model_not_found``."""
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


def text_tensor(name: str, values: list[str]) -> InferTensor:
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
        self.values: dict[str, list[str]] = {}

    def accepts(self, input_name: str) -> bool:
        return input_name in self.declared

    def add(self, input_name: str, values: list[str], param: str, feature: str = "") -> None:
        """Add an input; ``feature`` says what is missing when it is not ``param`` itself."""
        if not self.accepts(input_name):
            raise FieldError(
                f"model '{self.model_name}' does not support {feature or repr(param)}: it has no "
                f"'{input_name}' input (its inputs: {', '.join(self.declared)})", param)
        self.values[input_name] = values

    def add_scalar(self, input_name: str, value: Any, param: str) -> None:
        if value is not None:
            self.add(input_name, [json.dumps(value) if isinstance(value, bool) else str(value)], param)

    def add_sampling(self, body: SamplingRequest, max_tokens: int | None) -> None:
        """The sampling fields both endpoints share (unset ones are left to the model's defaults)."""
        self.add_scalar(MAX_NEW_TOKENS, max_tokens, "max_tokens")
        self.add_scalar(SEED, body.seed, "seed")
        if body.ignore_eos:
            self.add(IGNORE_EOS, ["true"], "ignore_eos")
        for input_name, value in ((TEMPERATURE, body.temperature), (TOP_P, body.top_p), (TOP_K, body.top_k),
                                  (MIN_P, body.min_p), (REPETITION_PENALTY, body.repetition_penalty),
                                  (PRESENCE_PENALTY, body.presence_penalty),
                                  (FREQUENCY_PENALTY, body.frequency_penalty)):
            self.add_scalar(input_name, value, input_name)
        if body.stop_list:
            if "" in body.stop_list:
                raise FieldError("Invalid value for 'stop': an empty string would end every reply at once", "stop")
            self.add(STOP, body.stop_list, "stop")
        # A model without a `stream` input still streams: its responses arrive whole.
        if body.stream and self.accepts(STREAM):
            self.add(STREAM, ["true"], "stream")

    def requests(self, body: SamplingRequest, request_id: str) -> list[InferRequest]:
        """One core request per choice."""
        requests = []
        for index in range(body.n):
            values = dict(self.values)
            if body.seed is not None:
                values[SEED] = [str(body.seed + index)]
            parameters = {"user": body.user} if body.user is not None else {}
            requests.append(InferRequest(model_name=self.model_name, id=f"{request_id}-{index}",
                                         inputs=[text_tensor(name, v) for name, v in values.items()],
                                         parameters=parameters))
        return requests


# --- reading responses --------------------------------------------------------------------

def texts(response: InferResponse, name: str) -> list[str]:
    tensor = response.output(name)
    if tensor is None:
        return []
    return [bytes(item).decode("utf-8") for item in tensor.data.reshape(-1)]


def response_text(response: InferResponse) -> str:
    return "".join(texts(response, RESPONSE))


def tool_calls(response: InferResponse) -> list[dict[str, Any]]:
    return [json.loads(call) for call in texts(response, TOOL_CALLS)]


def token_logprobs(response: InferResponse) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in texts(response, LOGPROBS)]


def finish_reason(response: InferResponse) -> str:
    return str(response.parameters.get("finish_reason", "stop"))


def usage(finals: list[InferResponse]) -> dict[str, Any] | None:
    """OpenAI usage: the prompt once, the completions of every choice summed (absent when the
    model reports no token counts)."""
    if not finals or "prompt_tokens" not in finals[0].parameters:
        return None
    parameters = finals[0].parameters
    prompt_tokens = int(parameters["prompt_tokens"])
    completion_tokens = sum(int(final.parameters.get("completion_tokens", 0)) for final in finals)
    counts: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    if "cached_tokens" in parameters:
        counts["prompt_tokens_details"] = {"cached_tokens": int(parameters["cached_tokens"])}
    return counts


async def merged(firsts: list[InferResponse], streams: list[AsyncIterator[InferResponse]]
                 ) -> AsyncIterator[tuple[int, InferResponse]]:
    """``(choice index, response)`` of every choice's responses in arrival order, until each
    has sent its final one. Closing this closes (so cancels) every stream."""
    queue: asyncio.Queue[tuple[int, InferResponse | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, response: InferResponse, stream: AsyncIterator[InferResponse]) -> None:
        try:
            while True:
                queue.put_nowait((index, response, None))
                if response.final:
                    return
                response = await sse.next_response(stream)
        except InferError as error:
            queue.put_nowait((index, None, error))

    tasks = [asyncio.create_task(pump(i, first, stream)) for i, (first, stream) in enumerate(zip(firsts, streams))]
    try:
        remaining = len(tasks)
        while remaining:
            index, response, error = await queue.get()
            if error is not None:
                raise error
            yield index, response
            remaining -= response.final
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await sse.closing(stream)


# --- the shape of one endpoint's answers ---------------------------------------------------

@dataclass
class Choice:
    """What one choice has said so far."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    final: InferResponse | None = None


class Endpoint(ABC):
    """One OpenAI endpoint: its request model, how it becomes chat inputs, and its answers."""

    request_model: type[SamplingRequest]
    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, core: Core):
        self.core = core

    @abstractmethod
    def inputs(self, body: Any, metadata: dict[str, Any]) -> ChatInputs:
        """The chat inputs of a validated request."""

    @abstractmethod
    def choice_body(self, index: int, choice: Choice, body: Any) -> dict[str, Any]:
        """One choice of a whole (non-streamed) answer."""

    @abstractmethod
    def chunk_choices(self, index: int, response: InferResponse, body: Any, first: bool,
                      state: dict[str, Any]) -> list[dict[str, Any]]:
        """The streamed choice objects one response becomes (``state``: this stream's, to keep)."""

    async def handle(self, request: Request) -> Response:
        try:
            body = parse_body(self.request_model, await request.body())
            completion_id = f"{self.id_prefix}{uuid.uuid4().hex}"
            inputs = self.inputs(body, model_metadata(self.core, body.model))
            streams = [self.core.stream(infer) for infer in inputs.requests(body, completion_id)]
            try:
                firsts = await until_disconnected(
                    request.receive, asyncio.gather(*(sse.next_response(stream) for stream in streams)))
            except BaseException:
                for stream in streams:
                    await sse.closing(stream)
                raise
            envelope = {"id": completion_id, "created": int(time.time()), "model": body.model}
            if body.stream:
                return sse.EventStreamResponse(self._events(envelope, body, firsts, streams))
            return JSONResponse(await until_disconnected(request.receive,
                                                         self._whole(envelope, body, firsts, streams)))
        except InferError as error:
            return error_response(error)

    async def _whole(self, envelope: dict[str, Any], body: Any, firsts: list[InferResponse],
                     streams: list[AsyncIterator[InferResponse]]) -> dict[str, Any]:
        choices = [Choice() for _ in firsts]
        responses = merged(firsts, streams)
        try:
            async for index, response in responses:
                choice = choices[index]
                choice.pieces.append(response_text(response))
                choice.logprobs += token_logprobs(response)
                if response.final:
                    choice.calls = tool_calls(response)
                    choice.final = response
        finally:
            await responses.aclose()
        return {**envelope, "object": self.object_name,
                "choices": [self.choice_body(i, choice, body) for i, choice in enumerate(choices)],
                "usage": usage([choice.final for choice in choices])}

    async def _events(self, envelope: dict[str, Any], body: Any, firsts: list[InferResponse],
                      streams: list[AsyncIterator[InferResponse]]) -> AsyncIterator[bytes]:
        # With include_usage OpenAI sends "usage": null on every chunk but the usage chunk.
        extra = {"usage": None} if body.include_usage else {}
        chunk = {**envelope, "object": self.chunk_object_name}
        finals: list[InferResponse] = []
        started: set[int] = set()
        state: dict[str, Any] = {}
        responses = merged(firsts, streams)
        try:
            async for index, response in responses:
                for choice in self.chunk_choices(index, response, body, index not in started, state):
                    yield sse.event({**chunk, "choices": [choice], **extra})
                started.add(index)
                if response.final:
                    finals.append(response)
            if body.include_usage:
                yield sse.event({**chunk, "choices": [], "usage": usage(finals)})
            yield sse.DONE
        except InferError as error:
            yield sse.event(error_body(error))
        finally:
            await responses.aclose()
