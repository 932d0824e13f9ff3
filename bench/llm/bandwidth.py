"""The memory-bandwidth floor of batch-1 decoding on this machine.

Decoding one token for one sequence reads every weight once, so on CPU it
cannot be faster than ``weight bytes / memory bandwidth``. The bandwidth is
measured here (a read-only pass over a buffer past the cache, threads as the
engine uses them) and the
weight bytes come from the GGUF's tensor sizes at the dtype the engine runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from gguf import GGUFReader

from triserve.backends.llm.loader import LLMSettings

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


#: a buffer well past this machine's last-level cache (260 MB here): what memory itself delivers
MEMORY_MB = 1024


def read_bandwidth_gb_s(threads: int, megabytes: int = MEMORY_MB, rounds: int = 7) -> float:
    """Best-of-``rounds`` bytes read per second by one vectorized pass over a float32 buffer of
    ``megabytes`` (``amax``: loads and a max per element, nothing written), in GB/s.

    Over :data:`MEMORY_MB` it is the memory-bandwidth ceiling; over the size of a model's weights,
    read again and again as a decode step reads them, it is that working set's ceiling, which is
    higher where the weights fit in the last-level cache."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.ones(megabytes << 18)  # float32: megabytes MB
        source.amax()  # fault the pages in
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            source.amax()
            best = min(best, time.perf_counter() - started)
        return source.numel() * source.element_size() / best / 1e9
    finally:
        torch.set_num_threads(previous)


@dataclass
class WeightBytes:
    parameters: int
    bytes_per_token: int
    dtype: str
    quantization: str


def weight_bytes(settings: LLMSettings) -> WeightBytes:
    """Weights read per decoded token, at the model's configured ``dtype`` / ``quantization``.

    The engine keeps a GGUF's quantized blocks quantized, so they count at their
    stored size; float tensors count at ``dtype`` (one byte for 2-D ones under
    int8/int4 quantization, an upper bound for int4).
    """
    engine = settings.engine
    dense = DTYPE_BYTES[engine.dtype]
    total_parameters = total_bytes = 0
    for tensor in GGUFReader(settings.model).tensors:
        count = int(tensor.n_elements)
        total_parameters += count
        if tensor.tensor_type.name not in ("F32", "F16", "BF16"):
            total_bytes += int(tensor.n_bytes)  # quantized blocks are read as stored (or as int8 rows)
        else:
            quantized = engine.quantization in ("int8", "int4") and len(tensor.shape) == 2
            total_bytes += count * (1 if quantized else dense)
    return WeightBytes(total_parameters, total_bytes, engine.dtype, engine.quantization)
