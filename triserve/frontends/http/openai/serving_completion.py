"""``POST /v1/completions``: a raw text prompt (no chat template) onto the chat contract."""

from __future__ import annotations

from typing import Any

from triserve.core.chat_contract import LOGPROBS, PROMPT, RAW, TOP_LOGPROBS
from triserve.core.types import InferResponse
from triserve.frontends.http.openai.protocol import CompletionRequest
from triserve.frontends.http.openai.serving import (
    ChatInputs, Choice, Endpoint, finish_reason, response_text, token_logprobs,
)


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The completions API's logprobs object from the contract's per-token entries."""
    tokens, offsets = [], []
    for entry in entries:
        tokens.append(entry["token"])
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in entries],
            "text_offset": offsets}


class Completions(Endpoint):
    request_model = CompletionRequest
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def inputs(self, body: CompletionRequest, metadata: dict[str, Any]) -> ChatInputs:
        inputs = ChatInputs(body.model, metadata)
        inputs.add(PROMPT, [body.prompt], "prompt")
        inputs.add(RAW, ["true"], "prompt", "text completion without a chat template")
        inputs.add_sampling(body, body.max_tokens)
        if body.logprobs is not None:
            inputs.add(LOGPROBS, ["true"], "logprobs")
            inputs.add_scalar(TOP_LOGPROBS, body.logprobs, "logprobs")
        return inputs

    def choice_body(self, index: int, choice: Choice, body: CompletionRequest) -> dict[str, Any]:
        return {"index": index, "text": "".join(choice.pieces),
                "logprobs": legacy_logprobs(choice.logprobs, 0) if body.logprobs is not None else None,
                "finish_reason": finish_reason(choice.final)}

    def chunk_choices(self, index: int, response: InferResponse, body: CompletionRequest,
                      first: bool, state: dict[str, Any]) -> list[dict[str, Any]]:
        text = response_text(response)
        logprobs = None
        if body.logprobs is not None:
            offset = state.get(index, 0)
            logprobs = legacy_logprobs(token_logprobs(response), offset)
            state[index] = offset + sum(len(token) for token in logprobs["tokens"])
        choices = []
        if text or logprobs and logprobs["tokens"]:
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
        if response.final:
            choices.append({"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(response)})
        return choices
