"""Constrained decoding: a grammar limits which tokens a sequence may sample next.

Built on llguidance (Microsoft's grammar engine, also used by vLLM and llama.cpp): a
JSON schema or a Lark grammar is compiled against the model's tokenizer, and before
each sampling step the matcher writes the set of allowed next tokens as a bitmask
over the vocabulary; the sampler sets every other token's logit to -inf. Why
llguidance (bench/grammar_libs.py, docs/llm.md): it compiles a schema in about 2 ms
(xgrammar and outlines-core take about 700 ms on this vocabulary, per request schema),
its mask costs tens of microseconds per token, it speaks JSON schema and Lark with
JSON schemas embedded (which tool calls need), and its wheel has no dependencies
(xgrammar's pulls triton).

:class:`GrammarCompiler` (one per model, built once at load) turns a request's
constraint into a :class:`Guide`; compiling runs in a worker thread. A guide belongs
to one sequence and is used only on the engine thread (``fill_mask``, ``accept``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch

from triserve.core.errors import InferError

#: JSON without free whitespace between tokens: a small model given the choice fills
#: objects with newlines; ", " and ": " are how models (and json.dumps) write JSON.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its reply to: a JSON schema or a Lark grammar (llguidance's
    dialect, which may embed JSON schemas with ``%json``)."""

    kind: str  # "json_schema" | "grammar"
    source: str  # the schema (JSON text) or the Lark grammar
    label: str  # the input that asked for it, for error messages


class Guide:
    """One sequence's grammar state (engine thread only)."""

    __slots__ = ("_matcher", "_label")

    def __init__(self, matcher: llguidance.LLMatcher, label: str):
        self._matcher = matcher
        self._label = label

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32, 32 tokens a word)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> None:
        """Advance past the sampled token (the mask allowed it, so this cannot fail)."""
        self._matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles constraints for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, constraint: Constraint) -> Guide:
        """A new guide; an invalid schema or grammar is the client's error, named by its input."""
        if constraint.kind == "json_schema":
            try:
                schema = json.loads(constraint.source)
            except ValueError as exc:
                raise InferError.invalid(f"{constraint.label}: not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InferError.invalid(f"{constraint.label}: a JSON schema must be a JSON object")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), overrides=_JSON_OPTIONS)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(constraint.source)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if is_error:
            raise InferError.invalid(f"{constraint.label}: {messages[0]}")
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InferError.invalid(f"{constraint.label}: {matcher.get_error()}")
        return Guide(matcher, constraint.label)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """One row of 32-token int32 words per guided sequence (contiguous, as llguidance writes it)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logit of every token the bitmask does not allow to -inf (in place).

    Unpacked with tensor ops (about 0.1 ms for 49k tokens); llguidance's own CPU kernel
    (``apply_token_bitmask_inplace``) takes over 0.5 s per call on this vocabulary.
    """
    vocab = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).reshape(bitmask.shape[0], -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))


def json_grammar(schema: dict[str, Any]) -> str:
    """The ``%json`` Lark term for ``schema`` (for grammars that embed JSON, as tool calls do)."""
    return "%json " + json.dumps({**closed_objects(schema), "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing about others (as OpenAI's strict mode requires): given
    room, a small model invents keys."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) if key not in ("const", "enum", "default", "examples") else value
              for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed
