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
# the whole conversation as JSON, instead of prompt/history/system: an array of OpenAI-style
# messages ({"role", "content", "tool_calls", "tool_call_id", "name"}), given to the chat template as they are
MESSAGES = "messages"
TOOLS = "tools"  # JSON array of OpenAI tool definitions ({"type": "function", "function": {...}})
TOOL_CHOICE = "tool_choice"  # "auto" (default with tools) | "none" | "required" | a function's name
PARALLEL_TOOL_CALLS = "parallel_tool_calls"  # true: a constrained reply may hold several calls (default one)
JSON_SCHEMA = "json_schema"  # the reply is JSON valid against this schema (constrained decoding)
GRAMMAR = "grammar"  # the reply matches this Lark grammar (llguidance's dialect)
MIN_P = "min_p"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
LOGPROBS = "logprobs"  # true: the `logprobs` output carries each generated token's logprob
TOP_LOGPROBS = "top_logprobs"  # alternatives per token in the `logprobs` output (0..20)
IGNORE_EOS = "ignore_eos"  # true: the reply runs to its token budget past the end-of-turn token (vLLM's, llama.cpp's)

# outputs
RESPONSE = "response"
TOOL_CALLS = "tool_calls"  # final response: one JSON object per call {"id", "type", "function"}
# OUTPUT "logprobs": one JSON object per generated token {"token", "logprob", "bytes", "top_logprobs"}

#: The contract's inputs in the order auto-complete declares them. A request sends ``prompt``
#: (with ``history`` / ``system``) or ``messages``; the model checks that one of them is there.
CHAT_INPUTS: tuple[str, ...] = (
    PROMPT, HISTORY, SYSTEM, TEMPERATURE, MAX_TOKEN, HISTORY_LEN,
    MAX_NEW_TOKENS, TOP_P, TOP_K, REPETITION_PENALTY, SEED, STOP, STREAM, RAW,
    MESSAGES, TOOLS, TOOL_CHOICE, PARALLEL_TOOL_CALLS, JSON_SCHEMA, GRAMMAR,
    MIN_P, PRESENCE_PENALTY, FREQUENCY_PENALTY, LOGPROBS, TOP_LOGPROBS, IGNORE_EOS,
)
REQUIRED_INPUTS: frozenset[str] = frozenset()
CHAT_OUTPUTS: tuple[str, ...] = (RESPONSE, HISTORY, TOOL_CALLS, LOGPROBS)


def is_chat_model(metadata: dict[str, Any]) -> bool:
    """Whether KServe model metadata describes a chat model: input ``prompt``, output ``response``."""
    inputs = {tensor["name"] for tensor in metadata.get("inputs", [])}
    outputs = {tensor["name"] for tensor in metadata.get("outputs", [])}
    return PROMPT in inputs and RESPONSE in outputs
