"""The chat contract (docs/ARCHITECTURE.md): the names a chat model's inputs and outputs carry.

Defined once, here in the core, because both sides speak it: the LLM backend
auto-completes and parses it, and the chat dialects (OpenAI, ChatGLM, the
LangChain classes) build requests in it and recognise a chat model by it.
"""

from __future__ import annotations

from typing import Any

# inputs (all TYPE_STRING, dims [-1]; numeric ones may also arrive as numbers)
PROMPT = "prompt"
HISTORY = "history"
SYSTEM = "system"
TEMPERATURE = "temperature"
MAX_TOKEN = "max_token"
HISTORY_LEN = "history_len"
MAX_NEW_TOKENS = "max_new_tokens"
TOP_P = "top_p"
TOP_K = "top_k"
REPETITION_PENALTY = "repetition_penalty"
SEED = "seed"
STOP = "stop"
STREAM = "stream"
RAW = "raw"

# outputs
RESPONSE = "response"

#: The contract's inputs in the order auto-complete declares them; only ``prompt`` is required.
CHAT_INPUTS: tuple[str, ...] = (
    PROMPT, HISTORY, SYSTEM, TEMPERATURE, MAX_TOKEN, HISTORY_LEN,
    MAX_NEW_TOKENS, TOP_P, TOP_K, REPETITION_PENALTY, SEED, STOP, STREAM, RAW,
)
REQUIRED_INPUTS: frozenset[str] = frozenset({PROMPT})
CHAT_OUTPUTS: tuple[str, ...] = (RESPONSE, HISTORY)


def is_chat_model(metadata: dict[str, Any]) -> bool:
    """Whether KServe model metadata describes a chat model: input ``prompt``, output ``response``."""
    inputs = {tensor["name"] for tensor in metadata.get("inputs", [])}
    outputs = {tensor["name"] for tensor in metadata.get("outputs", [])}
    return PROMPT in inputs and RESPONSE in outputs
