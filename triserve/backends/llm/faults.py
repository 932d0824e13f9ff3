"""Fault injection for tests: explicit, documented, off by default.

Three config parameters of the ``llm`` backend (``fault_nan_seed``,
``fault_prefill_seed`` and ``fault_crash_seed``; docs/llm.md) let a test make one chosen request fail
inside the engine, through the engine's real code paths, so that isolation and
supervision are proven against a real server rather than a mock. Unset (the
default), nothing here runs. Never set them in production: any client that
sends the seed triggers the fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from triserve.backends.llm.sampling import SamplingParams


class InjectedFault(RuntimeError):
    """The engine fault a test asked for with ``fault_crash_seed``."""


@dataclass(frozen=True)
class FaultInjection:
    #: a request with this seed gets NaN logits in its decode steps (after its first token), so
    #: that its row fails inside a step it shares with every running sequence
    nan_seed: int | None = None
    #: admitting a request with this seed raises out of the engine's step loop (the thread's fault)
    crash_seed: int | None = None
    #: a prefill that includes a request with this seed raises (as a failing forward pass would)
    prefill_seed: int | None = None

    @property
    def enabled(self) -> bool:
        return any(seed is not None for seed in (self.nan_seed, self.crash_seed, self.prefill_seed))

    def poison_logits(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
        """Set the rows of a decode step's requests seeded ``nan_seed`` to NaN (in place)."""
        if self.nan_seed is None:
            return
        for row, sampling in enumerate(params):
            if sampling.seed == self.nan_seed:
                logits[row] = float("nan")

    def fail_prefill(self, params: Sequence[SamplingParams]) -> None:
        if self.prefill_seed is not None and any(p.seed == self.prefill_seed for p in params):
            raise InjectedFault(f"injected prefill fault (fault_prefill_seed {self.prefill_seed})")

    def crash_on_admission(self, params: Sequence[SamplingParams]) -> None:
        if self.crash_seed is not None and any(p.seed == self.crash_seed for p in params):
            raise InjectedFault(f"injected engine fault (fault_crash_seed {self.crash_seed})")
