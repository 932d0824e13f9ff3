"""The decode step on a GPU, captured once as CUDA graphs and replayed every step.

On a GPU a decode step of a small model is a few hundred small kernels, each launched from
Python: the launches, not the GPU, set the pace. A CUDA graph records the kernels of one step
once and replays them with one call. A graph replays fixed shapes at fixed addresses, so (as in
vLLM and gpt-fast) the step it records is the runner's *padded* step
(:meth:`ModelRunner.decode_padded`): a batch padded up to one of a few sizes (1, 2, 4, 8, ... up
to the KV cache's slots), every row attending the whole cache capacity under a mask built from
its position, its inputs read from static buffers that each step copies into. Padding rows
write their K/V into the cache's scratch slot (a spare slot no sequence holds) and their logits
are dropped. One graph per batch size, all in one memory pool (captured largest first, so the
smaller ones reuse its blocks).

The graphs are bound to one KV cache (the addresses they were captured with): a runner given
another cache decodes eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

from triserve.backends.llm.kv_cache import KVCache

#: the padded step: (keys, values, token_ids, positions, rows) -> float32 logits [rows, vocab] on the device
PaddedStep = Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor],
                      torch.Tensor]

WARMUP_RUNS = 2  # eager runs before capture (lazy initialisation, library handles, autotuning)


def batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes: powers of two below ``max_batch``, and ``max_batch`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


def padded_inputs(token_ids: list[int], positions: list[int], slots: list[int], size: int,
                  scratch_slot: int) -> torch.Tensor:
    """The step's inputs padded to ``size`` rows: [3, size] (token ids, positions, slots); a
    padding row is token 0 at position 0 of the scratch slot."""
    pad = size - len(token_ids)
    return torch.tensor([token_ids + [0] * pad, positions + [0] * pad, slots + [scratch_slot] * pad],
                        dtype=torch.long)


class DecodeGraphs:
    """The padded decode step captured for each batch size, over one KV cache."""

    def __init__(self, step: PaddedStep, cache: KVCache, max_batch: int, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not '{device}'")
        if cache.scratch_slot is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch slot for their padding rows")
        self.cache = cache
        self.device = device
        self.sizes = batch_sizes(max_batch)
        largest = self.sizes[-1]
        # the static inputs every graph reads (a graph of n rows reads the first n columns),
        # idle rows pointing at the scratch slot
        self._inputs = padded_inputs([], [], [], largest, cache.scratch_slot).to(device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

        def run(size: int) -> torch.Tensor:
            token_ids, positions, rows = self._inputs[:, :size]
            return step(cache.keys, cache.values, token_ids, positions, rows)

        with torch.cuda.device(device):
            # warm-up on a side stream (what capture requires); every row writes the scratch slot
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for size in reversed(self.sizes):
                    for _ in range(WARMUP_RUNS):
                        run(size)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            pool = None
            for size in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA work of other threads (another model loading) does not
                # invalidate this capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._outputs[size] = run(size)
                pool = graph.pool()
                self._graphs[size] = graph
            torch.cuda.synchronize()

    def serves(self, cache: KVCache, batch: int) -> bool:
        return cache is self.cache and batch <= self.sizes[-1]

    def replay(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """The logits of one decode step [batch, vocab] (float32, on the CPU)."""
        batch = len(token_ids)
        size = next(size for size in self.sizes if size >= batch)
        # the whole buffer in one contiguous copy; the graph of ``size`` rows reads its first columns
        inputs = padded_inputs(token_ids, positions, slots, self.sizes[-1], self.cache.scratch_slot)
        with torch.cuda.device(self.device):
            self._inputs.copy_(inputs)
            self._graphs[size].replay()
            return self._outputs[size][:batch].cpu()
