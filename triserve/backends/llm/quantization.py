"""The engine's linear layers: dense, or weight-only int8 on CPU.

Small-batch decoding on CPU is bound by reading the weights from memory, so
storing them as int8 (with one scale per output channel) reads a quarter of the
bytes of float32. ``torch._weight_int8pack_mm`` multiplies float activations by
such weights directly, without materialising a dequantized copy. Its CPU
kernel is fast only for bfloat16 activations (with float32 activations it was
4-13x slower than plain float32 weights on SmolLM2-135M), so int8 layers always
compute in bfloat16 and hand back the engine's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8")


class DenseLinear:
    """``x @ weight.T + bias`` with the weight kept as given (a view of the HF model's when the dtype matches)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """Weight-only int8 with symmetric per-output-channel scales, computed in bfloat16."""

    compute_dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.weight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(self.compute_dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight, self.scales).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


Linear = DenseLinear | Int8Linear


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                quantization: str) -> Linear:
    if quantization == "int8":
        return Int8Linear(weight, bias, dtype)
    if quantization == "none":
        return DenseLinear(weight, bias, dtype)
    raise ValueError(f"unknown quantization '{quantization}'; expected one of {', '.join(QUANTIZATIONS)}")
