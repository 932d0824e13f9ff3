"""``ChatTriserve``: a LangChain chat model over triserve's OpenAI-compatible API.

It speaks ``/v1/chat/completions`` with httpx directly (no ``openai`` dependency)
and streams natively by reading the server's SSE chunks, sync and async. Tools
(``bind_tools``) and structured output (``with_structured_output``: ``json_schema``,
``function_calling``, ``json_mode``) use the server's constrained decoding, so a
forced tool call or a schema'd answer always parses. One HTTP client per model
object (and event loop, for async) keeps connections open between calls.
"""

from __future__ import annotations

import asyncio
from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser, PydanticToolsParser,
)
from langchain_core.output_parsers.openai_tools import make_invalid_tool_call, parse_tool_call
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import from_env, secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, field_validator

from triserve.langchain.transport import (
    SSE_DONE, TriserveError, async_client, bearer_headers, raise_for_error, sse_event, sync_client,
)

PROVIDER = "triserve"


def usage_metadata(usage: dict[str, Any] | None) -> UsageMetadata | None:
    """LangChain's usage from OpenAI's ``usage`` object."""
    if not usage:
        return None
    metadata = UsageMetadata(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
                             total_tokens=usage["total_tokens"])
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        metadata["input_token_details"] = InputTokenDetails(cache_read=cached)
    return metadata


def response_metadata(model: str, finish_reason: str | None) -> dict[str, Any]:
    return {"model_name": model, "finish_reason": finish_reason, "model_provider": PROVIDER}


def openai_base_url(url: str) -> str:
    """The OpenAI API's base: the server's root gets ``/v1`` appended; a URL already ending in
    ``/v1`` is kept."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def tool_calls_of(message: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """LangChain's tool calls (and the invalid ones) of an OpenAI response message."""
    calls, invalid = [], []
    for raw in message.get("tool_calls") or []:
        try:
            calls.append(parse_tool_call(raw, return_id=True))
        except Exception as exc:  # the arguments are not JSON: LangChain keeps it as invalid
            invalid.append(make_invalid_tool_call(raw, str(exc)))
    return calls, invalid


def openai_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> Any:
    """LangChain's ``tool_choice`` values in OpenAI's terms: ``any`` / ``True`` is
    ``required``; a tool's name (or ``True`` with one tool) forces that tool."""
    if tool_choice in (None, "auto", "none", "required") or isinstance(tool_choice, dict):
        return tool_choice
    if tool_choice == "any" or (tool_choice is True and len(tools) != 1):
        return "required"
    if tool_choice is True:
        tool_choice = tools[0]["function"]["name"]
    if isinstance(tool_choice, str):
        return {"type": "function", "function": {"name": tool_choice}}
    raise ValueError(f"tool_choice: unsupported value {tool_choice!r}")


def openai_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """Messages as OpenAI dicts. ``name`` is left out: the chat contract has no speaker
    names (LangChain's convention for such providers is to ignore them)."""
    converted = convert_to_openai_messages(messages)
    return [{key: value for key, value in message.items() if key != "name"} for message in converted]


class _ChunkAssembler:
    """Turns OpenAI SSE events into LangChain chunks.

    Text pieces become chunks as they arrive; finish reason, model name and usage are
    held back for one closing chunk, so exactly one chunk carries them (LangChain sums
    usage and concatenates strings when it merges chunks).
    """

    def __init__(self, model: str):
        self.model = model
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, event: dict[str, Any]) -> ChatGenerationChunk | None:
        if "error" in event:
            error = event["error"]
            raise TriserveError(200, error.get("message", str(error)) if isinstance(error, dict) else str(error))
        self.model = event.get("model", self.model)
        if event.get("usage"):
            self.usage = event["usage"]
        text, calls = "", []
        for choice in event.get("choices", []):
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                calls.append(tool_call_chunk(name=function.get("name"), args=function.get("arguments"),
                                             id=call.get("id"), index=call.get("index")))
        if not text and not calls:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))

    def closing_chunk(self) -> ChatGenerationChunk:
        if self.finish_reason is None:
            raise TriserveError(200, "the response stream ended before the completion finished")
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage_metadata(self.usage),
                                   response_metadata=response_metadata(self.model, self.finish_reason),
                                   chunk_position="last"),
            generation_info={"finish_reason": self.finish_reason},
        )


class ChatTriserve(BaseChatModel):
    """Chat with a model served by triserve (or any OpenAI-compatible server).

    ```python
    from triserve.langchain import ChatTriserve

    chat = ChatTriserve(model="smollm2", base_url="http://127.0.0.1:8000/v1", max_tokens=64)
    chat.invoke("Hello!")
    ```

    ``base_url`` and ``api_key`` default to ``TRISERVE_BASE_URL`` and ``TRISERVE_API_KEY``.
    The key is sent as a bearer token (a server started with ``--api-key`` needs it).
    """

    model: str = "smollm2"
    base_url: str = Field(default_factory=from_env("TRISERVE_BASE_URL", default="http://127.0.0.1:8000/v1"))
    api_key: SecretStr | None = Field(default_factory=secret_from_env("TRISERVE_API_KEY", default=None))
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = 60.0
    max_retries: int = 2
    streaming: bool = False

    _sync_client: httpx.Client | None = PrivateAttr(default=None)
    _async_clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = PrivateAttr(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _openai_base(cls, url: str) -> str:
        return openai_base_url(url)

    def _client(self) -> httpx.Client:
        if self._sync_client is None:
            self._sync_client = sync_client(self.timeout, self.max_retries)
        return self._sync_client

    def _aclient(self) -> httpx.AsyncClient:
        """This event loop's client (an ``httpx.AsyncClient`` belongs to the loop it runs on)."""
        loop = asyncio.get_running_loop()
        for key, (client_loop, _) in list(self._async_clients.items()):
            if client_loop.is_closed():
                del self._async_clients[key]
        entry = self._async_clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, async_client(self.timeout, self.max_retries))
            self._async_clients[id(loop)] = entry
        return entry[1]

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, parallel_tool_calls: bool | None = None,
                   strict: bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools the model may call; ``tool_choice`` ``"any"`` / ``"required"`` / a tool's name
        makes the server constrain the reply to a valid call."""
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = openai_tool_choice(tool_choice, formatted)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: dict | type | None = None, *,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Answers as ``schema`` (a pydantic class, TypedDict or JSON schema): ``json_schema``
        constrains the reply to the schema, ``function_calling`` forces a call of a tool of that
        schema, ``json_mode`` constrains it to any JSON object (describe the keys in the prompt)."""
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if schema is None and method != "json_mode":
            raise ValueError(f"with_structured_output: method '{method}' needs a schema")
        traced = {"kwargs": {"method": method, "strict": strict},
                  "schema": convert_to_json_schema(schema) if schema is not None else None}
        if method == "function_calling":
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, strict=strict,
                                  ls_structured_output_format=traced, **kwargs)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                json_schema = convert_to_json_schema(schema)
                name = json_schema.get("title") or "response"
                response_format = {"type": "json_schema", "json_schema": {
                    "name": "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64],
                    "schema": json_schema, "strict": True}}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced, **kwargs)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"with_structured_output: unknown method {method!r}; expected json_schema, "
                             "function_calling or json_mode")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([no_parse], exception_key="parsing_error")

    @property
    def _llm_type(self) -> str:
        return "triserve-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, **self._sampling_params()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_name=kwargs.get("model", self.model),
                                 ls_model_type="chat")
        if (temperature := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = temperature
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    def _sampling_params(self) -> dict[str, Any]:
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                  "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                  "seed": self.seed, "stop": self.stop or None}
        return {key: value for key, value in params.items() if value is not None}

    def _payload(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool,
                 **kwargs: Any) -> dict[str, Any]:
        """The request body; per-call kwargs (``model``, ``temperature``, ...) override fields."""
        kwargs.pop("stream", None)  # invoke(stream=True) only picks the streaming path
        payload: dict[str, Any] = {"model": self.model, **self._sampling_params(), **kwargs,
                                   "messages": openai_messages(messages), "stream": stream}
        if stop:
            payload["stop"] = stop
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    @property
    def _url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def _headers(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    @staticmethod
    def _chat_result(body: dict[str, Any]) -> ChatResult:
        generations = []
        for choice in body["choices"]:
            finish_reason = choice.get("finish_reason")
            calls, invalid = tool_calls_of(choice["message"])
            message = AIMessage(content=choice["message"].get("content") or "", id=body.get("id"),
                                tool_calls=calls, invalid_tool_calls=invalid,
                                usage_metadata=usage_metadata(body.get("usage")),
                                response_metadata=response_metadata(body["model"], finish_reason))
            generations.append(ChatGeneration(message=message, generation_info={"finish_reason": finish_reason}))
        return ChatResult(generations=generations,
                          llm_output={"model_name": body["model"], "token_usage": body.get("usage")})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, stream=False, **kwargs)
        response = self._client().post(self._url, json=payload, headers=self._headers)
        raise_for_error(response)
        return self._chat_result(response.json())

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, stream=False, **kwargs)
        response = await self._aclient().post(self._url, json=payload, headers=self._headers)
        raise_for_error(response)
        return self._chat_result(response.json())

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, stream=True, **kwargs)
        assembler = _ChunkAssembler(payload["model"])
        with self._client().stream("POST", self._url, json=payload, headers=self._headers) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_error(response)
            for line in response.iter_lines():
                event = sse_event(line)
                if event is SSE_DONE:
                    break
                if event is not None and (chunk := assembler.feed(event)) is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        yield assembler.closing_chunk()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, stream=True, **kwargs)
        assembler = _ChunkAssembler(payload["model"])
        async with self._aclient().stream("POST", self._url, json=payload, headers=self._headers) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for_error(response)
            async for line in response.aiter_lines():
                event = sse_event(line)
                if event is SSE_DONE:
                    break
                if event is not None and (chunk := assembler.feed(event)) is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        yield assembler.closing_chunk()

