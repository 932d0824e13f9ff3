"""OpenAI's request and response bodies as pydantic models (as vLLM's ``protocol.py``).

Requests are validated from the raw body (``model_validate_json``) in strict mode with
unknown fields forbidden, so a wrong type, an out-of-range value or a field triserve does
not know is a 400 that names it (:func:`field_error`). Fields OpenAI defines that
triserve cannot honour are accepted only at their neutral value. The OpenAPI document's
OpenAI part is generated from these models (triserve/frontends/http/openapi.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from triserve.core.errors import QUEUE_FULL, ErrorCode, InferError

# --- errors -------------------------------------------------------------------------------


class FieldError(InferError):
    """An invalid request field; ``param`` names it in OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None,
                 code: ErrorCode = ErrorCode.INVALID_ARGUMENT):
        super().__init__(code, message)
        self.param = param


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(error: InferError) -> dict[str, Any]:
    """OpenAI's error object for any core or request error. A full queue (``QueueFullError``:
    the LLM engine's or the core's) is OpenAI's 429 rate-limit error."""
    status = error_status(error)
    kind = ("rate_limit_exceeded" if status == 429 else
            "invalid_request_error" if status < 500 else "server_error")
    code = ("model_not_found" if error.code is ErrorCode.NOT_FOUND else
            "rate_limit_exceeded" if status == 429 else None)
    return {"error": {"message": error.message, "type": kind,
                      "param": error.param if isinstance(error, FieldError) else None, "code": code}}


def error_status(error: InferError) -> int:
    if error.code is ErrorCode.UNAVAILABLE and error.message.startswith(QUEUE_FULL):
        return 429  # a full queue (QueueFullError): OpenAI's rate-limit answer
    return error.code.http_status


_BOUNDS = {"greater_than_equal": ("ge", "at least"), "less_than_equal": ("le", "at most"),
           "greater_than": ("gt", "greater than"), "less_than": ("lt", "less than")}


def field_error(exc: ValidationError) -> FieldError:
    """The first problem pydantic found, in OpenAI's words, naming the field."""
    problem = exc.errors(include_url=False)[0]
    location = [part for index, part in enumerate(problem["loc"])
                if index == 0 or isinstance(part, int) or not _is_union_label(part)]
    kind = problem["type"]
    if kind == "json_invalid":
        return FieldError(f"malformed JSON in request body: {problem['ctx'].get('error', problem['msg'])}")
    if kind == "value_error":  # a model validator's message names its field first, in quotes
        message = str(problem["ctx"]["error"])
        named = re.search(r"'(\w+)'", message)
        return FieldError(message, location[0] if location else named.group(1) if named else None)
    if not location:
        if kind in ("model_type", "model_attributes_type"):
            return FieldError("request body must be a JSON object")
        return FieldError(problem["msg"])
    param = str(location[0])
    where = ".".join(str(part) if isinstance(part, str) else f"[{part}]" for part in location).replace(".[", "[")
    if kind == "missing":
        return FieldError(f"Missing required parameter: '{where}'.", param)
    if kind == "extra_forbidden":
        if len(location) == 1:
            return FieldError(f"Unrecognized request argument supplied: {param}", param)
        return FieldError(f"Unrecognized field '{where}'", param)
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return FieldError(f"Invalid value for '{where}': must be {words} {problem['ctx'][key]}, "
                          f"got {problem['input']!r}.", param)
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("union_tag_invalid", "literal_error"):
        return FieldError(f"Invalid type for '{where}': {problem['msg']} (got {problem['input']!r:.60}).", param)
    return FieldError(f"Invalid value for '{where}': {problem['msg']}", param)


_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "function"}


def _is_union_label(part: str) -> bool:
    """Parts of pydantic's error location that name a union member, not a field."""
    return (part in _ROLE_TAGS or part in ("str", "int", "float", "bool", "dict", "list", "none")
            or any(char in part for char in "[]-,") or part[:1].isupper())


# --- requests -----------------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


Content = Union[str, list[TextPart]]


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage],
                    Field(discriminator="role")]


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'response_format': 'json_schema' is required with type 'json_schema' and only allowed with it")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


Stop = Union[str, list[str], None]


class SamplingRequest(Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # beyond OpenAI, as vLLM
    min_p: float | None = Field(default=None, ge=0, le=1)  # beyond OpenAI, as vLLM
    repetition_penalty: float | None = Field(default=None, gt=0)  # beyond OpenAI, as vLLM
    ignore_eos: bool = False  # beyond OpenAI, as vLLM and llama.cpp: generate to max_tokens past the turn's end
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Stop = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _common_checks(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        if self.logit_bias:
            raise ValueError("'logit_bias' is not supported")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # triserve's own (as vLLM's guided_grammar): constrain the reply to a Lark grammar
    grammar: str | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> "ChatCompletionRequest":
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("Give 'max_tokens' or 'max_completion_tokens', not two different values.")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = {tool.function.name for tool in self.tools or []}
            if not names:
                raise ValueError("'tool_choice' other than 'none' or 'auto' needs 'tools'")
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                raise ValueError(f"'tool_choice' names function {self.tool_choice.function.name!r}, which is not in 'tools'")
        return self

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: Literal[False] = False
    suffix: Literal[None, ""] = None
    best_of: Literal[None, 1] = None


# --- responses ----------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


#: Every model the OpenAPI document describes, by the name it has there.
SCHEMAS: dict[str, type[BaseModel]] = {
    "ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest,
    "ChatCompletion": ChatCompletion, "ChatCompletionChunk": ChatCompletionChunk, "Completion": Completion,
    "OpenAIModel": Model, "OpenAIModelList": ModelList, "OpenAIError": ErrorResponse,
}
