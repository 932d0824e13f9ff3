"""Choosing the next token of every running sequence from one batch of logits.

Greedy rows take the argmax; sampling rows share one temperature / top-k /
top-p pass over the sorted batch, and each draws with its own
``torch.Generator`` so that a request with a seed is reproducible whatever else
runs beside it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.stop_token_ids = frozenset(self.stop_token_ids)
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            problems.append(f"seed must be a 64-bit integer, got {self.seed}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class SamplingRow:
    """What sampling needs to know about one sequence of the batch."""

    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated so far (for the repetition penalty)


def make_generator(seed: int | None) -> torch.Generator:
    """A private random stream: seeded if asked, otherwise from fresh entropy."""
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """One token per row of ``logits`` ([batch, vocab], float32; modified in place)."""
    for i, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0:
            _apply_repetition_penalty(logits[i], row.token_ids, row.params.repetition_penalty)
    chosen = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        for i, token in zip(sampled, _sample_rows(logits[sampled], [rows[i] for i in sampled])):
            chosen[i] = token
    return chosen


def _apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """CTRL's penalty as transformers applies it: seen tokens' logits move towards zero."""
    seen = torch.tensor(token_ids, dtype=torch.long)
    scores = logits[seen]
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)


def _sample_rows(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    vocab = logits.shape[-1]
    temperature = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype)
    top_k = torch.tensor([row.params.top_k or vocab for row in rows])
    top_p = torch.tensor([row.params.top_p for row in rows], dtype=logits.dtype)
    sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    ranks = torch.arange(vocab)
    probs = torch.softmax(sorted_logits, dim=-1)
    # a token is kept if it is within top-k and the mass before it is below top-p
    # (so the most likely token always survives)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    probs = torch.where(keep, probs, 0.0)
    tokens = []
    for i, row in enumerate(rows):
        pick = torch.multinomial(probs[i], 1, generator=row.generator)
        tokens.append(int(order[i, pick]))
    return tokens
