"""``POST /v1/chat/completions``: OpenAI chat requests onto the chat contract and back.

A model that declares the contract's ``messages`` input (the LLM backend does) gets the
conversation as it came, tool calls and tool results included, for its chat template;
``tools`` / ``tool_choice`` / ``response_format`` / ``grammar`` / ``logprobs`` become the
inputs of the same names (``response_format`` as ``json_schema``). A chat model without
``messages`` (a Python-backend model with only ``prompt``) gets system, history pairs and
the prompt; what it cannot take is refused with a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from triserve.core.chat_contract import (
    GRAMMAR, HISTORY, JSON_SCHEMA, LOGPROBS, MESSAGES, PARALLEL_TOOL_CALLS, PROMPT, SYSTEM, TOOL_CHOICE,
    TOOLS, TOP_LOGPROBS,
)
from triserve.core.types import InferResponse
from triserve.frontends.http.openai.protocol import (
    AssistantMessage, ChatCompletionRequest, FieldError, NamedToolChoice, SystemMessage, ToolMessage,
    UserMessage,
)
from triserve.frontends.http.openai.serving import (
    ChatInputs, Choice, Endpoint, finish_reason, response_text, token_logprobs, tool_calls,
)


def message_text(content: Any) -> str:
    """A message's text: a string, or its text parts joined (as OpenAI does)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def contract_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation for the contract's ``messages`` input, in the order it came."""
    messages = []
    for message in body.messages:
        entry: dict[str, Any] = {"role": message.role, "content": message_text(message.content)}
        if getattr(message, "name", None) is not None:
            entry["name"] = message.name
        if isinstance(message, AssistantMessage) and message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    return messages


def paired_conversation(body: ChatCompletionRequest) -> tuple[str, list[str], str]:
    """System, flattened history pairs and the prompt, for a model without ``messages``.

    User and assistant turns are paired in order; the last message must be the user's.
    """
    systems, pairs, pending = [], [], None
    for index, message in enumerate(body.messages):
        if isinstance(message, SystemMessage):
            systems.append(message_text(message.content))
        elif isinstance(message, UserMessage):
            if pending is not None:
                raise FieldError(f"messages[{index}]: model '{body.model}' takes history as (user, assistant) "
                                 "pairs, so two user messages cannot follow each other", "messages")
            pending = message_text(message.content)
        elif isinstance(message, AssistantMessage) and not message.tool_calls:
            pairs.append((pending or "", message_text(message.content)))
            pending = None
        else:
            raise FieldError(f"messages[{index}]: model '{body.model}' has no tool calling (no 'messages' input)",
                             "messages")
    if pending is None:
        raise FieldError("The last non-system message must have role 'user': it is the prompt the model answers.",
                         "messages")
    return "\n\n".join(systems), [text for pair in pairs for text in pair], pending


class ChatCompletions(Endpoint):
    request_model = ChatCompletionRequest
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def inputs(self, body: ChatCompletionRequest, metadata: dict[str, Any]) -> ChatInputs:
        inputs = ChatInputs(body.model, metadata)
        if inputs.accepts(MESSAGES):
            inputs.add(MESSAGES, [json.dumps(contract_messages(body), ensure_ascii=False)], "messages")
        else:
            system, history, prompt = paired_conversation(body)
            inputs.add(PROMPT, [prompt], "messages")
            if history:
                inputs.add(HISTORY, history, "messages", "earlier turns (history)")
            if system:
                inputs.add(SYSTEM, [system], "messages", "system messages")
        inputs.add_sampling(body, body.reply_limit)
        if body.tools:
            inputs.add(TOOLS, [json.dumps([tool.model_dump(exclude_none=True) for tool in body.tools],
                                          ensure_ascii=False)], "tools", "tool calling")
            choice = body.tool_choice
            name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
            if name is not None:
                inputs.add(TOOL_CHOICE, [name], "tool_choice")
            if body.parallel_tool_calls is not None:
                inputs.add_scalar(PARALLEL_TOOL_CALLS, body.parallel_tool_calls, "parallel_tool_calls")
        response_format = body.response_format
        if response_format is not None and response_format.type != "text":
            schema = {"type": "object"}
            if response_format.type == "json_schema" and response_format.json_schema.schema_ is not None:
                schema = response_format.json_schema.schema_
            inputs.add(JSON_SCHEMA, [json.dumps(schema, ensure_ascii=False)], "response_format",
                       "structured output (response_format)")
        if body.grammar is not None:
            inputs.add(GRAMMAR, [body.grammar], "grammar")
        if body.logprobs:
            inputs.add(LOGPROBS, ["true"], "logprobs")
            inputs.add_scalar(TOP_LOGPROBS, body.top_logprobs, "top_logprobs")
        return inputs

    def choice_body(self, index: int, choice: Choice, body: ChatCompletionRequest) -> dict[str, Any]:
        content = "".join(choice.pieces)
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not choice.calls else None}
        if choice.calls:
            message["tool_calls"] = choice.calls
        return {"index": index, "message": message,
                "logprobs": {"content": choice.logprobs} if body.logprobs else None,
                "finish_reason": finish_reason(choice.final)}

    def chunk_choices(self, index: int, response: InferResponse, body: ChatCompletionRequest,
                      first: bool, state: dict[str, Any]) -> list[dict[str, Any]]:
        def choice(delta: dict[str, Any], logprobs: list | None = None, reason: str | None = None) -> dict[str, Any]:
            return {"index": index, "delta": delta,
                    "logprobs": {"content": logprobs} if logprobs is not None else None, "finish_reason": reason}

        choices = [choice({"role": "assistant", "content": ""})] if first else []
        text = response_text(response)
        logprobs = token_logprobs(response) if body.logprobs else None
        if text or logprobs:
            choices.append(choice({"content": text}, logprobs))
        if response.final:
            for position, call in enumerate(tool_calls(response)):
                function = call["function"]
                choices.append(choice({"tool_calls": [{"index": position, "id": call["id"], "type": "function",
                                                       "function": {"name": function["name"], "arguments": ""}}]}))
                choices.append(choice({"tool_calls": [{"index": position,
                                                       "function": {"arguments": function["arguments"]}}]}))
            choices.append(choice({}, reason=finish_reason(response)))
        return choices
