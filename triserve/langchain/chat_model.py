"""``ChatTriserve``: a LangChain chat model over triserve's OpenAI-compatible API.

It speaks ``/v1/chat/completions`` with httpx directly (no ``openai`` dependency)
and streams natively by reading the server's SSE chunks, sync and async.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils import from_env, secret_from_env
from pydantic import Field, SecretStr

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
        text = ""
        for choice in event.get("choices", []):
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            text += (choice.get("delta") or {}).get("content") or ""
        return ChatGenerationChunk(message=AIMessageChunk(content=text)) if text else None

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
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = 60.0
    max_retries: int = 2
    streaming: bool = False

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
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def _headers(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    @staticmethod
    def _chat_result(body: dict[str, Any]) -> ChatResult:
        choice = body["choices"][0]
        finish_reason = choice.get("finish_reason")
        message = AIMessage(content=choice["message"].get("content") or "", id=body.get("id"),
                            usage_metadata=usage_metadata(body.get("usage")),
                            response_metadata=response_metadata(body["model"], finish_reason))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": finish_reason})],
                          llm_output={"model_name": body["model"], "token_usage": body.get("usage")})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, stream=False, **kwargs)
        with sync_client(self.timeout, self.max_retries) as client:
            response = client.post(self._url, json=payload, headers=self._headers)
        raise_for_error(response)
        return self._chat_result(response.json())

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, stream=False, **kwargs)
        async with async_client(self.timeout, self.max_retries) as client:
            response = await client.post(self._url, json=payload, headers=self._headers)
        raise_for_error(response)
        return self._chat_result(response.json())

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, stream=True, **kwargs)
        assembler = _ChunkAssembler(payload["model"])
        with sync_client(self.timeout, self.max_retries) as client, \
                client.stream("POST", self._url, json=payload, headers=self._headers) as response:
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
        async with async_client(self.timeout, self.max_retries) as client, \
                client.stream("POST", self._url, json=payload, headers=self._headers) as response:
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

