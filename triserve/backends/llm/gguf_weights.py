"""A GGUF file's tensors as the engine's weights, quantized blocks kept quantized.

Q4_0 and Q4_1 blocks become :class:`Int4Weight` exactly (same groups of 32, same
scales, no rounding); Q8_0 and every other block type (K-quants, Q5_*) have no
torch kernel for their layout, so they are dequantized one tensor at a time and
re-quantized to int8 with one scale per output channel (a small, measured loss:
see docs/llm.md). F32/F16/BF16 tensors are float and follow the ``quantization``
parameter like a checkpoint's. The file is read through ``gguf`` (memory-mapped),
one tensor at a time, so loading never holds a full-size float copy.

Names follow transformers' HF names so that the model runner reads a GGUF and a
safetensors checkpoint the same way; llama.cpp stores the rows of Llama's q/k
projections permuted for its rope layout, which is undone here (a row order, so
quantized blocks move whole).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from triserve.backends.llm.quantization import Int4Weight, Int8Weight, Weight, quantize, take_rows

#: GGUF architectures whose tensors map onto the runner's Llama-family layout
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
_FLOAT_TYPES = ("F32", "F16", "BF16")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def read_gguf_weights(path: Path, num_heads: int, num_kv_heads: int,
                      quantization: str) -> dict[str, Weight | torch.Tensor]:
    """HF name -> weight (2-D projections) or tensor (norms, biases)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = gguf_architecture(path)
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"the LLM engine does not support the GGUF architecture '{architecture}'; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    weights: dict[str, Weight | torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        kind = tensor.tensor_type.name
        data = np.asarray(tensor.data)
        if kind in _FLOAT_TYPES:
            value = torch.from_numpy(np.array(data, dtype=np.float32))
            weights[name] = quantize(value, quantization) if value.ndim == 2 and _projection(name) else value
            continue
        rows = data.shape[0]
        if kind == "Q4_0":
            weight: Weight = _q4(data.reshape(rows, -1, 18), with_min=False)
        elif kind == "Q4_1":
            weight = _q4(data.reshape(rows, -1, 20), with_min=True)
        else:  # Q8_0, K-quants, Q5_*: no kernel for the block layout; int8 per channel
            from gguf.quants import dequantize

            weight = Int8Weight.quantize(torch.from_numpy(dequantize(data, tensor.tensor_type)))
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = num_heads if name.endswith("q_proj.weight") else num_kv_heads
            weight = take_rows(weight, _unpermute_rows(rows, heads))
        weights[name] = weight
    return weights


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match:
        mapped = _LAYER_NAMES.get(match.group(2))
        return None if mapped is None else f"model.layers.{match.group(1)}.{mapped}.{suffix}"
    mapped = _GLOBAL_NAMES.get(base)
    return None if mapped is None else f"{mapped}.{suffix}"


def _projection(name: str) -> bool:
    return name.endswith("_proj.weight")


def _q4(blocks: np.ndarray, with_min: bool) -> Int4Weight:
    """Q4_0 ``[d: f16][16 bytes]`` or Q4_1 ``[d: f16][m: f16][16 bytes]`` blocks of 32 weights; byte j
    holds weight j (low nibble) and weight j + 16 (high nibble)."""
    rows, groups, _ = blocks.shape
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    offset = 4 if with_min else 2
    packed = blocks[..., offset:offset + 16]
    q = np.concatenate((packed & 0x0F, packed >> 4), axis=-1).reshape(rows, groups * 32)
    scales = torch.from_numpy(d)
    if with_min:  # q * d + m == (q - 8) * d + (m + 8 d)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = torch.from_numpy(m) + 8 * scales
    else:  # (q - 8) * d
        zeros = torch.zeros_like(scales)
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(q)), scales, zeros)


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order transformers' ``_reverse_permute_weights`` gives a GGUF q/k projection."""
    index = np.arange(rows)
    half = rows // heads // 2
    return torch.from_numpy(index.reshape(heads, half, 2).swapaxes(2, 1).reshape(rows).copy())
