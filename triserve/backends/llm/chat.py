"""The chat contract: what a chat request says, checked, and how it becomes tokens.

The seed's ChatGLM2 deployment sends every input as a BYTES string ("0.01",
"16000") and flattens the history into ``[q1, a1, q2, a2, ...]``; OpenAI-style
frontends send numbers as numbers. Both arrive here as numpy arrays, so this
module reads inputs from a plain ``name -> array`` mapping: the LLM backend
and a Triton Python-backend ``model.py`` (examples/chatglm2-6b) share it.

Every problem is an ``InferError.invalid`` whose message starts with the name
of the input, so a client knows what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from jinja2 import TemplateError

from triserve.backends.llm import tools as tool_format
from triserve.core.chat_contract import (
    CHAT_INPUTS, FREQUENCY_PENALTY, GRAMMAR, HISTORY, IGNORE_EOS, JSON_SCHEMA, LOGPROBS, MESSAGES, MIN_P,
    PARALLEL_TOOL_CALLS, PRESENCE_PENALTY, PROMPT, STOP, TOOL_CHOICE, TOOLS, TOP_LOGPROBS,
)
from triserve.core.errors import InferError
from triserve.core.types import InferRequest

#: The sampling values a request leaves unset, after the model's generation_config:
#: OpenAI's defaults (sampling at temperature 1, no truncation, no penalties).
OPENAI_SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
    "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
_SAMPLING_FIELDS = tuple(OPENAI_SAMPLING_DEFAULTS)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat turn, parsed and checked; sampling values are the client's (None: not sent,
    see :meth:`resolved`)."""

    prompt: str | None
    history: tuple[tuple[str, str], ...] = ()  # every pair the client sent
    history_len: int | None = None  # keep the last N pairs for the model (None: all)
    system: str | None = None
    raw: bool = False
    stream: bool = False
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_token: int | None = None
    max_new_tokens: int | None = None
    conversation: tuple[dict[str, Any], ...] | None = None  # `messages`, checked
    tools: tuple[dict[str, Any], ...] = ()  # the `function` objects of the tool definitions
    tool_choice: str = "auto"  # auto | none | required | a function name
    parallel_tool_calls: bool | None = None  # None: not sent (constrained calls: one)
    json_schema: str | None = None
    grammar: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = False  # generate to the token budget: the end-of-turn tokens do not end the reply

    def resolved(self, *defaults: Mapping[str, Any]) -> "ChatRequest":
        """This request with every unset sampling value taken from the first of ``defaults``
        that has it (the model's generation_config), else OpenAI's defaults."""
        values = {}
        for name in _SAMPLING_FIELDS:
            if getattr(self, name) is None:
                values[name] = next((d[name] for d in defaults if d.get(name) is not None),
                                    OPENAI_SAMPLING_DEFAULTS[name])
        return dataclasses.replace(self, **values)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def context_history(self) -> tuple[tuple[str, str], ...]:
        """The pairs the model sees: the last ``history_len`` (ChatGLM's ``history[-n:]``)."""
        if self.history_len is None:
            return self.history
        return self.history[len(self.history) - self.history_len:] if self.history_len else ()

    def messages(self) -> list[dict[str, Any]]:
        """The conversation in the role/content form every HF chat template reads: ``messages``
        as they came, or system, history pairs and the prompt."""
        if self.conversation is not None:
            return [dict(message) for message in self.conversation]
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for question, answer in self.context_history:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": self.prompt})
        return messages

    def history_with(self, reply: str) -> np.ndarray:
        """The ``history`` output: the client's whole history, then this turn, flattened.

        ``history_len`` limits what the model reads, not the record the client keeps.
        """
        flat = [text for pair in self.history for text in pair] + [self.prompt or "", reply]
        array = np.empty(len(flat), dtype=np.object_)
        array[:] = [text.encode("utf-8") for text in flat]
        return array

    def reply_budget(self, prompt_tokens: int, context: int, model_name: str) -> int:
        """How many tokens the reply may have.

        ``max_token`` is ChatGLM's ``max_length`` (prompt + reply), capped at the
        context; ``max_new_tokens`` caps the reply itself. A request that leaves
        no room for a reply is an error rather than an empty answer.
        """
        if prompt_tokens >= context:
            raise InferError.invalid(
                f"prompt is {prompt_tokens} tokens; the context of model '{model_name}' is {context} tokens"
            )
        max_length = context if self.max_token is None else min(self.max_token, context)
        if max_length <= prompt_tokens:
            raise InferError.invalid(
                f"max_token ({self.max_token}) must be larger than the prompt ({prompt_tokens} tokens): "
                "it counts the prompt and the reply together"
            )
        budget = max_length - prompt_tokens
        return budget if self.max_new_tokens is None else min(budget, self.max_new_tokens)


def parse_chat_request(request: InferRequest) -> ChatRequest:
    """The chat contract of a core request."""
    return parse_chat_inputs({tensor.name: tensor.data for tensor in request.inputs})


def parse_chat_inputs(inputs: Mapping[str, np.ndarray]) -> ChatRequest:
    """Read and check the contract's inputs; an empty tensor counts as not sent."""
    unknown = sorted(set(inputs) - set(CHAT_INPUTS))
    if unknown:
        raise InferError.invalid(
            f"unexpected input {', '.join(repr(n) for n in unknown)}; a chat model takes "
            + ", ".join(CHAT_INPUTS)
        )
    values = {name: np.asarray(array).reshape(-1) for name, array in inputs.items()}
    scalars = {name: _single(name, flat) for name, flat in values.items()
               if name not in (HISTORY, STOP)}
    if (scalars.get(PROMPT) is None) == (scalars.get(MESSAGES) is None):
        raise InferError.invalid(
            "prompt is required: the user's message as one BYTES element (or, instead of prompt, "
            "history and system, messages: the whole conversation as a JSON array)"
            if scalars.get(PROMPT) is None else
            "prompt and messages: send one of them (messages is the whole conversation)")

    history_texts = [_text("history", item) for item in values.get("history", ())]
    if len(history_texts) % 2:
        raise InferError.invalid(
            f"history has {len(history_texts)} elements; it must be [question, answer] pairs "
            "flattened as [q1, a1, q2, a2, ...] (an even count)"
        )
    stop = tuple(_text("stop", item) for item in values.get("stop", ()))
    if "" in stop:
        raise InferError.invalid("stop: an empty stop string would end every reply at once")

    def number(name: str, kind: type, default: Any) -> Any:
        value = scalars.get(name)
        return default if value is None else (_integer if kind is int else _float)(name, value)

    def text(name: str) -> str | None:
        return None if scalars.get(name) is None else _text(name, scalars[name])

    tools = tool_format.parse_tools(text(TOOLS))
    chat = ChatRequest(
        prompt=text(PROMPT),
        history=tuple(zip(history_texts[0::2], history_texts[1::2])),
        history_len=number("history_len", int, None),
        system=None if scalars.get("system") is None else _text("system", scalars["system"]),
        raw=scalars.get("raw") is not None and _boolean("raw", scalars["raw"]),
        stream=scalars.get("stream") is not None and _boolean("stream", scalars["stream"]),
        stop=stop,
        temperature=number("temperature", float, None),
        top_p=number("top_p", float, None),
        top_k=number("top_k", int, None),
        min_p=number(MIN_P, float, None),
        repetition_penalty=number("repetition_penalty", float, None),
        presence_penalty=number(PRESENCE_PENALTY, float, None),
        frequency_penalty=number(FREQUENCY_PENALTY, float, None),
        seed=number("seed", int, None),
        max_token=number("max_token", int, None),
        max_new_tokens=number("max_new_tokens", int, None),
        conversation=tool_format.parse_messages(text(MESSAGES)),
        tools=tools,
        tool_choice=tool_format.parse_tool_choice(text(TOOL_CHOICE), tools),
        parallel_tool_calls=(None if scalars.get(PARALLEL_TOOL_CALLS) is None
                             else _boolean(PARALLEL_TOOL_CALLS, scalars[PARALLEL_TOOL_CALLS])),
        json_schema=text(JSON_SCHEMA),
        grammar=text(GRAMMAR),
        logprobs=scalars.get(LOGPROBS) is not None and _boolean(LOGPROBS, scalars[LOGPROBS]),
        top_logprobs=number(TOP_LOGPROBS, int, None),
        ignore_eos=scalars.get(IGNORE_EOS) is not None and _boolean(IGNORE_EOS, scalars[IGNORE_EOS]),
    )
    _check(chat)
    return chat


#: Upper bounds of the numeric inputs (each refusal names the allowed range).
TEMPERATURE_MAX = 100.0  # OpenAI allows 2; far beyond it every token is about as likely
REPETITION_PENALTY_MAX = 100.0
INT64_MAX = 2**63 - 1  # top_k and seed: what every dialect's integer (and torch) carries
TOKENS_MAX = 2**31 - 1  # max_token, max_new_tokens, history_len (capped at the context anyway)


def _check(chat: ChatRequest) -> None:
    """Range checks, each naming its input and the allowed range (None: the model's default).

    Legal values at the edge are the sampler's to handle: a temperature below
    ``sampling.GREEDY_BELOW`` is greedy, a tiny top_p keeps the likeliest token,
    a tiny repetition_penalty pushes logits to the float range's ends (never inf).
    """
    if chat.temperature is not None and not 0 <= chat.temperature <= TEMPERATURE_MAX:
        raise InferError.invalid(
            f"temperature must be in [0, {TEMPERATURE_MAX:g}] (0 = greedy), got {chat.temperature!r}")
    if chat.top_p is not None and not 0 < chat.top_p <= 1:
        raise InferError.invalid(f"top_p must be in (0, 1], got {chat.top_p!r}")
    if chat.top_k is not None and not 0 <= chat.top_k <= INT64_MAX:
        raise InferError.invalid(f"top_k must be in [0, {INT64_MAX}] (0 = no limit), got {chat.top_k}")
    if chat.min_p is not None and not 0 <= chat.min_p <= 1:
        raise InferError.invalid(f"min_p must be in [0, 1], got {chat.min_p!r}")
    if chat.repetition_penalty is not None and not 0 < chat.repetition_penalty <= REPETITION_PENALTY_MAX:
        raise InferError.invalid(
            f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX:g}] (1 = none), "
            f"got {chat.repetition_penalty!r}")
    for name in (PRESENCE_PENALTY, FREQUENCY_PENALTY):
        value = getattr(chat, name)
        if value is not None and not -2 <= value <= 2:
            raise InferError.invalid(f"{name} must be in [-2, 2], got {value!r}")
    if chat.top_logprobs is not None and not 0 <= chat.top_logprobs <= 20:
        raise InferError.invalid(f"top_logprobs must be in [0, 20], got {chat.top_logprobs}")
    constraints = [name for name in (JSON_SCHEMA, GRAMMAR) if getattr(chat, name) is not None]
    if chat.tool_choice not in ("auto", "none"):
        constraints.append(TOOL_CHOICE)
    if len(constraints) > 1:
        raise InferError.invalid(f"{' and '.join(constraints)}: a reply can follow only one of them")
    if chat.conversation is not None and (chat.history or chat.system is not None or chat.raw):
        raise InferError.invalid(
            "messages: it is the whole conversation, so history, system and raw cannot be sent with it")
    if chat.history_len is not None and not 0 <= chat.history_len <= TOKENS_MAX:
        raise InferError.invalid(f"history_len must be in [0, {TOKENS_MAX}], got {chat.history_len}")
    if chat.seed is not None and not 0 <= chat.seed <= INT64_MAX:
        raise InferError.invalid(f"seed must be in [0, {INT64_MAX}], got {chat.seed}")
    for name, value in (("max_token", chat.max_token), ("max_new_tokens", chat.max_new_tokens)):
        if value is not None and not 1 <= value <= TOKENS_MAX:
            raise InferError.invalid(f"{name} must be in [1, {TOKENS_MAX}], got {value}")
    if chat.raw and (chat.history or chat.system is not None or chat.tools):
        raise InferError.invalid(
            "raw: a raw prompt is the whole text, so history and system cannot be sent with it"
        )


def render_prompt(tokenizer: Any, chat: ChatRequest, chat_template: str | None = None) -> list[int]:
    """The prompt's token ids: the tokenizer's own chat template, or the raw text.

    ``chat_template`` overrides the tokenizer's (for models that ship none).
    """
    if chat.raw:
        return list(tokenizer(chat.prompt)["input_ids"])
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InferError.invalid(
            "raw: this model has no chat template, so send the whole prompt text with raw=true"
        )
    messages, options = chat.messages(), {}
    knows_tools = tool_format.template_knows_tools(chat_template or tokenizer.chat_template)
    if chat.uses_tools:
        if knows_tools:
            options["tools"] = [{"type": "function", "function": tool} for tool in chat.tools]
        else:
            messages = tool_format.messages_with_tools(messages, chat.tools)
    messages = tool_format.template_messages(messages, knows_tools)
    try:
        encoded = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=True, tokenize=True, **options
        )
    except TemplateError as exc:  # the template refuses these messages, e.g. a system role
        raise InferError.invalid(f"chat template: {exc}") from None
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Tokens that end a reply: EOS, and the token the chat template closes a turn with.

    Chat models often end a turn with a token that is not their EOS (Llama 3's
    ``<|eot_id|>``, ChatML's ``<|im_end|>`` in some exports); the template shows it.
    """
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063reply\u2063"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                tokenize=False)
        except TemplateError:
            return frozenset(ids)  # a template that refuses this shape names no turn end
        after = tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
        if after and after[0] in tokenizer.all_special_ids:
            ids.add(after[0])
    return frozenset(ids)


def _single(name: str, flat: np.ndarray) -> Any:
    if flat.size > 1:
        raise InferError.invalid(f"{name}: expected one value, got {flat.size}")
    return flat[0] if flat.size else None


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, (bytes, bytearray, np.bytes_)):
        raise InferError.invalid(f"{name} must be text (BYTES), got {type(value).__name__} {value!r}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InferError.invalid(
            f"{name} is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None


def _integer(name: str, value: Any) -> int:
    if isinstance(value, (np.integer, np.bool_, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        if float(value).is_integer():
            return int(value)
        raise InferError.invalid(f"{name}: {float(value)!r} is not an integer")
    text = _text(name, value).strip()
    try:
        return int(text)
    except ValueError:
        raise InferError.invalid(f"{name}: {text!r} is not an integer") from None


def _float(name: str, value: Any) -> float:
    if isinstance(value, (np.integer, np.floating, np.bool_, int, float)):
        number = float(value)
        text = repr(number)
    else:
        text = _text(name, value).strip()
        try:
            number = float(text)
        except ValueError:
            raise InferError.invalid(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise InferError.invalid(f"{name}: {text!r} is not a finite number")
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, (np.bool_, bool, np.integer, int)):
        return bool(value)
    text = _text(name, value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InferError.invalid(f"{name}: {text!r} is not a boolean (true/false, 1/0)")
