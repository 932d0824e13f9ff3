"""Choosing the next token of every running sequence from one batch of logits.

Penalties first (repetition; OpenAI's presence / frequency on the generated
tokens), then each guided row's grammar mask (triserve.backends.llm.guided), so
that batched sequences with and without grammars share one step. Greedy rows
take the argmax and never sort; sampling rows share one temperature / top-k /
top-p / min-p pass over their candidates (``topk``, not a sort of the whole
vocabulary, when every row has a top-k), and each draws with its own
``torch.Generator`` so that a request with a seed is reproducible whatever else
runs beside it. A row that asks for logprobs gets the chosen token's and the top
alternatives' (log-softmax of the penalised, masked logits) in
``SamplingRow.last_logprobs``.

One row never fails another: a row whose logits are NaN, or whose draw raises,
gets its exception in place of a token and the other rows are sampled as
usual. Values at the edge of their range are handled numerically: a
temperature below :data:`GREEDY_BELOW` is greedy, the likeliest token always
survives top-p, top-k and min-p, and logits pushed beyond the float range by a
repetition penalty or a tiny temperature are clamped to its ends (never inf).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from triserve.backends.llm.guided import allocate_bitmask, apply_bitmask

#: Temperatures below this sample greedily (the limit of temperature -> 0), as in vLLM:
#: dividing logits by 1e-40 would overflow float32 into inf and NaN probabilities.
GREEDY_BELOW = 1e-5


class NaNLogitsError(ArithmeticError):
    """The model produced NaN logits for a row (a numerical fault of the forward pass)."""


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    min_p: float = 0.0  # keep tokens with at least min_p times the top token's probability
    presence_penalty: float = 0.0  # OpenAI's: on tokens generated so far
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; N: the chosen token's and the top N alternatives'
    guide: Any = None  # a guided.Guide constraining the tokens (engine thread only)

    def __post_init__(self) -> None:
        self.stop_token_ids = frozenset(self.stop_token_ids)
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            problems.append(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 2**63:
            problems.append(f"top_k must be in [0, 2**63 - 1], got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            problems.append(f"seed must be a 64-bit integer, got {self.seed}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(slots=True)
class SamplingRow:
    """What sampling needs to know about one sequence of the batch."""

    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated so far (for the repetition penalty)
    prompt_len: int = -1  # where the generated tokens start (-1: all of token_ids is the prompt)
    # (token, logprob, [(token, logprob), ...]) of the last sampled token, when params.logprobs is set
    last_logprobs: tuple[int, float, list[tuple[int, float]]] | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 0:
            self.prompt_len = len(self.token_ids)


def make_generator(seed: int | None) -> torch.Generator:
    """A private random stream: seeded if asked, otherwise from fresh entropy."""
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int | Exception]:
    """One token per row of ``logits`` ([batch, vocab], float32; left unmodified).

    A row that cannot be sampled gets its exception instead of a token; the
    other rows are unaffected (if the batched pass itself fails, each row is
    sampled on its own, so the fault stays with the row that caused it).
    """
    try:
        return _sample(logits, rows)
    except Exception as exc:
        if len(rows) == 1:
            return [exc]
    results: list[int | Exception] = []
    for i, row in enumerate(rows):
        try:
            results.append(_sample(logits[i : i + 1], [row])[0])
        except Exception as exc:
            results.append(exc)
    return results


def _sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int | Exception]:
    results: list[int | Exception] = [0] * len(rows)
    nan_rows = set(torch.isnan(logits).any(dim=-1).nonzero().flatten().tolist())
    for i in nan_rows:
        results[i] = NaNLogitsError("the model produced NaN logits")
    live = [i for i in range(len(rows)) if i not in nan_rows]
    penalized = [i for i in live if rows[i].params.repetition_penalty != 1.0
                 or rows[i].params.presence_penalty or rows[i].params.frequency_penalty]
    guided = [i for i in live if rows[i].params.guide is not None]
    if penalized or guided:
        logits = logits.clone()
        for i in penalized:
            row = rows[i]
            if row.params.repetition_penalty != 1.0:
                _apply_repetition_penalty(logits[i], row.token_ids, row.params.repetition_penalty)
            if row.params.presence_penalty or row.params.frequency_penalty:
                _apply_openai_penalties(logits[i], row.token_ids[row.prompt_len:], row.params)
        if guided:
            bitmask = allocate_bitmask(len(guided), logits.shape[-1])
            for j, i in enumerate(guided):
                rows[i].params.guide.fill_mask(bitmask, j)
                apply_bitmask(logits[i:i + 1], bitmask[j:j + 1])
        logits = _finite(logits)
    logprobs = {i: torch.log_softmax(logits[i], dim=-1) for i in live
                if rows[i].params.logprobs is not None}
    chosen: list[int | Exception] = logits.argmax(dim=-1).tolist()
    sampled = [i for i in live if not rows[i].params.greedy]
    if sampled:
        for i, token in zip(sampled, _sample_rows(logits[sampled], [rows[i] for i in sampled])):
            chosen[i] = token
    for i in guided:
        if not isinstance(chosen[i], Exception):
            rows[i].params.guide.accept(chosen[i])
    for i, row_logprobs in logprobs.items():
        if isinstance(chosen[i], Exception):
            continue
        top = row_logprobs.topk(rows[i].params.logprobs) if rows[i].params.logprobs else None
        alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        rows[i].last_logprobs = (chosen[i], float(row_logprobs[chosen[i]]), alternatives)
    for i in live:
        results[i] = chosen[i]
    return results


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """inf pushed to the float range's ends, so that softmax stays a distribution."""
    info = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=info.min, posinf=info.max, neginf=info.min)


def _apply_openai_penalties(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> None:
    """OpenAI's: ``logit -= presence * (count > 0) + frequency * count`` over the generated tokens."""
    if not generated:
        return
    tokens, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
    logits[tokens] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)


def _apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """CTRL's penalty as transformers applies it: seen tokens' logits move towards zero."""
    seen = torch.tensor(token_ids, dtype=torch.long)
    scores = logits[seen]
    logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)


def _sample_rows(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int | Exception]:
    """Temperature, then top-k and top-p, then one draw per row from its own generator.

    Only the candidates any row can keep are sorted: ``topk`` of the largest top-k in the
    batch, not a sort of the whole vocabulary (a row with top-p but no top-k needs the whole
    order, and gets it). Probabilities are normalised over the whole vocabulary either way,
    so top-p's mass is the same whatever else is in the batch."""
    vocab = logits.shape[-1]
    temperature = torch.tensor([row.params.temperature for row in rows], dtype=logits.dtype)
    # top_k beyond the vocabulary (up to 2**63 - 1) is no limit
    top_k = torch.tensor([min(row.params.top_k, vocab) or vocab for row in rows])
    top_p = torch.tensor([row.params.top_p for row in rows], dtype=logits.dtype)
    scaled = _finite(logits / temperature[:, None])
    probs = torch.softmax(scaled, dim=-1)  # over the whole vocabulary: no sort needed for this
    if all(row.params.top_k == 0 and row.params.top_p >= 1.0 and row.params.min_p == 0
           for row in rows):  # nothing to cut
        return [_guarded_draw(probs[i], row.generator) for i, row in enumerate(rows)]
    width = vocab if any(row.params.top_k == 0 and row.params.top_p < 1.0 for row in rows) else int(top_k.max())
    order = torch.topk(scaled, min(width, vocab), dim=-1).indices  # sorted, largest first
    probs = probs.gather(-1, order)
    ranks = torch.arange(order.shape[-1])
    # a token is kept if it is within top-k and the mass before it is below top-p; the most
    # likely token always survives (a top_p of 1e-300 is 0 in float32)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    min_p = torch.tensor([row.params.min_p for row in rows], dtype=logits.dtype)
    keep &= probs >= (min_p * probs[:, 0])[:, None]  # probs are sorted: column 0 is the top token
    keep |= ranks[None, :] == 0
    probs = torch.where(keep, probs, 0.0)
    tokens: list[int | Exception] = []
    for i, row in enumerate(rows):
        pick = _guarded_draw(probs[i], row.generator)
        tokens.append(pick if isinstance(pick, Exception) else int(order[i, pick]))
    return tokens


def _guarded_draw(probs: torch.Tensor, generator: torch.Generator) -> int | Exception:
    """A draw, or the exception that stopped it (it fails this row alone)."""
    try:
        return _draw(probs, generator)
    except Exception as exc:  # noqa: BLE001 - returned, to fail this row alone
        return exc


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn with probability proportional to ``probs``, from one uniform number (inverse
    CDF): unlike ``torch.multinomial``, the generator's use does not depend on how many candidates
    the batch made this row carry, so a seeded reply is the same alone or batched."""
    if not bool(torch.isfinite(probs).all()) or not bool((probs >= 0).all()) or float(probs.sum()) <= 0:
        raise ValueError("probability tensor contains inf, nan or element < 0, or sums to 0")
    cdf = probs.cumsum(dim=0)
    u = torch.rand(1, generator=generator, dtype=cdf.dtype) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[0] - 1))
