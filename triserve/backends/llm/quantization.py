"""The engine's weights and linear layers: dense, or weight-only int8 / int4 that stay quantized.

Decoding one token on a CPU reads every weight once, so the bytes stored per
weight set the speed. Quantized weights are kept as they are quantized and
multiplied by torch's weight-only kernels, never dequantized to a full-size copy:

- int4, groups of 32 along the input dimension with one scale and one zero per
  group (``value = (q - 8) * scale + zero``): ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  on the weight packed by ``_convert_weight_to_int4pack_for_cpu``. GGUF's Q4_0
  (``(q - 8) * d``: zero 0) and Q4_1 (``q * d + m``: zero ``m + 8 d``) blocks are
  exactly this layout, so they are repacked without any rounding;
- int8 with one scale per output channel: ``torch._weight_int8pack_mm``;
- or either of them, where the CPU has AVX-512 VNNI, on triserve's own kernels
  (``cpu_kernels``, :mod:`triserve.backends.llm.kernels`): activations quantized to
  int8 in blocks of 32 and multiplied by the weights as stored with integer dot
  products, as llama.cpp does.

torch's kernels compute in bfloat16 (their CPU kernels are fast only for it); every
kernel hands back the engine's dtype. Weights are first gathered in an unpacked form
(:class:`DenseWeight`, :class:`Int8Weight`, :class:`Int4Weight`) so that q/k/v
and gate/up can be concatenated into one matrix each before packing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4")
# what multiplies int4 and int8 weights: "vnni" (triserve's kernels: int8 activations, AVX-512
# VNNI) | "torch" (torch's weight-only kernels: the weight is widened to bfloat16) | "auto" (vnni
# where it runs, else torch)
CPU_KERNELS = ("auto", "vnni", "torch")
GROUP = 32  # int4 group size along the input dimension (GGUF's block size)
TILE = 16  # output rows per tile of the int4 kernels (torch's and triserve's) and triserve's int8 kernel
COMPUTE_DTYPE = torch.bfloat16  # what the weight-only kernels compute in


@dataclass
class DenseWeight:
    tensor: torch.Tensor  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tensor.shape)


@dataclass
class Int8Weight:
    q: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out]: value = q * scale

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        """Symmetric, one scale per output channel."""
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales[:, None]


@dataclass
class Int4Weight:
    q: torch.Tensor  # uint8 [out, in], values 0..15
    scales: torch.Tensor  # float32 [out, in / GROUP]
    zeros: torch.Tensor  # float32 [out, in / GROUP]: value = (q - 8) * scale + zero

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int4Weight":
        """Asymmetric (min/max) per group of 32 inputs, as GGUF's Q4_1."""
        out, inputs = weight.shape
        groups = weight.detach().float().reshape(out, inputs // GROUP, GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
        return cls(q.reshape(out, inputs), scales, low + 8 * scales)

    def dequantize(self) -> torch.Tensor:
        out, inputs = self.q.shape
        groups = (self.q.float().reshape(out, inputs // GROUP, GROUP) - 8) * self.scales[..., None]
        return (groups + self.zeros[..., None]).reshape(out, inputs)


Weight = DenseWeight | Int8Weight | Int4Weight


def int4_fits(shape: tuple[int, int]) -> bool:
    """The int4 kernels need whole groups along the input and 16-row tiles along the output."""
    out, inputs = shape
    return inputs % GROUP == 0 and out % TILE == 0


vnni_fits = int4_fits  # triserve's int8 kernel has the int4 kernels' tiles and groups


def quantize(weight: torch.Tensor, quantization: str) -> Weight:
    """A float checkpoint's projection weight, as ``quantization`` asks (int4 falls back to int8
    for a shape its kernel cannot take)."""
    if quantization == "none":
        return DenseWeight(weight)
    if quantization == "int4" and int4_fits(tuple(weight.shape)):
        return Int4Weight.quantize(weight)
    if quantization in ("int4", "int8"):
        return Int8Weight.quantize(weight)
    raise ValueError(f"unknown quantization '{quantization}'; expected one of {', '.join(QUANTIZATIONS)}")


def concatenate(weights: list[Weight]) -> Weight | None:
    """One weight whose outputs are those of ``weights`` in order (q/k/v, gate/up); None when
    they are not all stored the same way."""
    kinds = {type(weight) for weight in weights}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is DenseWeight:
        return DenseWeight(torch.cat([w.tensor for w in weights]))
    if kind is Int8Weight:
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scales for w in weights]))
    return Int4Weight(torch.cat([w.q for w in weights]), torch.cat([w.scales for w in weights]),
                      torch.cat([w.zeros for w in weights]))


def take_rows(weight: Weight, order: torch.Tensor) -> Weight:
    """The weight's output rows in ``order`` (whole rows: quantized groups move unchanged)."""
    if isinstance(weight, Int4Weight):
        return Int4Weight(weight.q[order], weight.scales[order], weight.zeros[order])
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.q[order], weight.scales[order])
    return DenseWeight(weight.tensor[order])


class DenseLinear:
    """``x @ weight.T + bias`` in the engine's dtype, on the engine's device."""

    def __init__(self, weight: DenseWeight, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        self.weight = weight.tensor.detach().to(device, dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(device, dtype)
        self.nbytes = _nbytes(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """Int8 with one scale per output channel. ``kernel`` "torch": weight-only, computed in
    bfloat16 (``weight`` is then the plain [out, in] table: an embedding or a rescored head reads
    its rows); "vnni": the activations are quantized to int8 per block of 32 and multiplied by the
    weights in integer dot products (1.7-1.8x torch's kernel at one row, 3x at 16 rows;
    bench/llm/NOTES.md, "Fourth pass"), the weight repacked for it."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str = "torch"):
        self.kernel = _checked_kernel(kernel) if vnni_fits(weight.shape) else "torch"
        self.out_features = weight.shape[0]
        if self.kernel == "vnni":
            from triserve.backends.llm import kernels

            self.weight = kernels.pack_int8(weight.q)
            self.scales = weight.scales.float().contiguous()
        else:
            self.weight = weight.q
            self.scales = weight.scales.to(COMPUTE_DTYPE)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype
        self.nbytes = _nbytes(self.weight, self.scales, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel == "vnni":
            y = torch.ops.triserve.int8_vnni_linear(flat, self.weight, self.scales, self.out_features)
        else:
            y = torch._weight_int8pack_mm(flat.to(COMPUTE_DTYPE), self.weight, self.scales)
        return _output(y, x, self.dtype, self.bias)


class Int4Linear:
    """Int4 in groups of 32 inputs (scale and zero per group). ``kernel`` "torch": weight-only,
    computed in bfloat16; "vnni" (a resolved :data:`CPU_KERNELS` choice): the activations are
    quantized to int8 per block of 32 and meet the nibbles in integer dot products (1.4-1.5x torch's
    kernel at one row, 3x at 16 rows, 3.6x in prefill; bench/llm/NOTES.md, "Fourth pass")."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str = "torch"):
        self.kernel = _checked_kernel(kernel)
        self.out_features = weight.shape[0]
        if kernel == "vnni":
            from triserve.backends.llm import kernels

            # value = q * scale + (zero - 8 scale); one buffer of nibbles, float16 scales and mins
            self.weight = kernels.pack_int4(weight.q, weight.scales, weight.zeros - 8 * weight.scales)
            self.scales_and_zeros = None
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
            # [in / GROUP, out, 2]: the kernel's scales_and_zeros
            self.scales_and_zeros = torch.stack((weight.scales.t(), weight.zeros.t()), dim=-1).to(
                COMPUTE_DTYPE).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype
        self.nbytes = _nbytes(self.weight, self.scales_and_zeros, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel == "vnni":
            y = torch.ops.triserve.int4_vnni_linear(flat, self.weight, self.out_features)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(COMPUTE_DTYPE), self.weight, GROUP,
                                                           self.scales_and_zeros)
        return _output(y, x, self.dtype, self.bias)


def _checked_kernel(kernel: str) -> str:
    """A quantized linear's kernel, as :func:`resolve_cpu_kernels` resolves it."""
    if kernel not in ("vnni", "torch"):
        raise ValueError(f"unknown kernel '{kernel}' for a quantized linear; expected vnni or torch")
    return kernel


def _output(y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """A quantized kernel's [rows, out] result as the engine's dtype, biased, in ``x``'s leading shape."""
    y = y.to(dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


Linear = DenseLinear | Int8Linear | Int4Linear


@functools.cache
def resolve_cpu_kernels(requested: str) -> str:
    """An :data:`CPU_KERNELS` choice as the kernel that will run (the VNNI kernel is built on the
    first call that needs it; a fallback is logged once); ``ValueError`` when "vnni" is asked for
    and cannot run."""
    if requested not in CPU_KERNELS:
        raise ValueError(f"unknown cpu_kernels '{requested}'; expected one of {', '.join(CPU_KERNELS)}")
    if requested == "torch":
        return "torch"
    from triserve.backends.llm import kernels

    why = kernels.load()
    if why is None:
        return "vnni"
    if requested == "vnni":
        raise ValueError(f"cpu_kernels vnni cannot run here: {why}; use cpu_kernels auto or torch")
    kernels.log.info("quantized weights use torch's kernels: the VNNI kernels cannot run here (%s)", why)
    return "torch"


def make_linear(weight: Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                device: torch.device = torch.device("cpu"), cpu_kernels: str = "torch") -> Linear:
    """``cpu_kernels``: one of :data:`CPU_KERNELS`, for an int4 or int8 weight."""
    if device.type != "cpu" and not isinstance(weight, DenseWeight):
        raise ValueError(f"quantized weights run on torch's CPU kernels only, not on device '{device}': "
                         f"on a GPU serve a float checkpoint (safetensors) with quantization none")
    if isinstance(weight, Int4Weight):
        return Int4Linear(weight, bias, dtype, resolve_cpu_kernels(cpu_kernels))
    if isinstance(weight, Int8Weight):
        return Int8Linear(weight, bias, dtype, resolve_cpu_kernels(cpu_kernels))
    return DenseLinear(weight, bias, dtype, device)


class Embedding:
    """Token embeddings, dense or int8 rows (one scale per token); when the output head is tied,
    the head multiplies by this same table (no second copy)."""

    def __init__(self, weight: DenseWeight | Int8Weight, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        self.dtype = dtype
        if isinstance(weight, Int8Weight):
            self.head: Linear = make_linear(weight, None, dtype, device)
            self.scales = weight.scales.to(dtype)
        else:
            self.head = DenseLinear(weight, None, dtype, device)
            self.scales = None
        self.nbytes = self.head.nbytes

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.weight[token_ids]
        if self.scales is None:
            return rows
        return rows.to(self.dtype) * self.scales[token_ids, None]


# From this many rows the int8 ranking of a RescoredHead that ranks one row in int4 pays (2
# threads, SmolLM2's head, in a decode step: 2 rows are slower in int8, the whole int8 table
# being read; 4 rows 1.5x faster)
INT8_RANK_MIN_ROWS = 4


class RescoredHead:
    """An output head whose vocabulary is ranked by a cheap pass, its likeliest logits then
    recomputed from the exact head.

    The head is the largest matrix a decode step reads (SmolLM2: 49152 x 576, 28 MB as int8,
    30% of the bytes per token), and the weight-only kernels are slow on it: the int8 one reads
    it at a fraction of the memory bandwidth, and at several rows both it and the int4 one are
    bound by arithmetic (16 rows take 7x one row's time). So a cheap pass only ranks the
    vocabulary; the top ``candidates`` logits of each row are then recomputed from the exact
    (int8 or dense) rows in float32 and replace the cheap ones. A greedy token is the exact
    head's argmax unless that token is not among the cheap pass's top candidates (SmolLM2 on
    bench/llm/quality_text.txt: never); the tail of the distribution keeps the cheap values.

    ``ranking``:

    - ``int8``: the rows are quantized to int8 (one scale each) and multiplied by an int8 table
      with ``torch._int_mm``, whose integer dot products (AVX-512 VNNI) take a quarter of the
      int4 kernel's time at 16 rows and as long as it at one row (two threads). The table is the
      exact head itself when that is int8 (a GGUF's Q8_0 table, ``quantization: int8``): no
      copy; a dense head is quantized to an int8 copy.
    - ``int4``: an int4 copy of the head (SmolLM2: +18 MB) ranks a single row with the int4
      kernel (5-10% faster than int8 at one thread); from :data:`INT8_RANK_MIN_ROWS` rows on,
      when the exact head is int8, the rows rank in int8 as above (``rank_int8``)."""

    def __init__(self, exact: "DenseLinear | Int8Linear", dtype: torch.dtype, ranking: str = "int8",
                 candidates: int = 64, cpu_kernels: str = "torch"):
        if ranking not in ("int8", "int4"):
            raise ValueError(f"unknown head ranking '{ranking}'; expected int8 or int4")
        self.exact = exact
        self.candidates = min(candidates, exact.weight.shape[0])
        self.extra_nbytes = 0  # held beside the exact head
        self.fast: Int4Linear | None = None
        self.exact_scales = exact.scales.float() if isinstance(exact, Int8Linear) else None
        if isinstance(exact, Int8Linear):
            self.table, self.table_scales = exact.weight, self.exact_scales
        elif ranking == "int8":
            copy = Int8Weight.quantize(exact.weight)
            self.table, self.table_scales = copy.q, copy.scales
            self.extra_nbytes += _nbytes(copy.q, copy.scales)
        else:
            self.table = self.table_scales = None
        if ranking == "int4":
            weight = exact.weight.float()
            if isinstance(exact, Int8Linear):
                weight = weight * exact.scales.float()[:, None]
            self.fast = Int4Linear(Int4Weight.quantize(weight), None, dtype, resolve_cpu_kernels(cpu_kernels))
            self.extra_nbytes += self.fast.nbytes
        # rows from which ranking is int8 (None: never); where it changes, a seeded sequence
        # keeps the one-row ranking whatever its batch
        self.int8_from_rows = 1 if ranking == "int8" else (None if self.table is None else INT8_RANK_MIN_ROWS)
        self.nbytes = exact.nbytes + self.extra_nbytes

    def _rank_int8(self, x: torch.Tensor) -> torch.Tensor:
        """Approximate logits: the rows quantized to int8, times the int8 table."""
        x = x.float()
        row_scales = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        quantized = torch.round(x / row_scales).to(torch.int8)
        return torch._int_mm(quantized, self.table.t()).float() * self.table_scales * row_scales

    def __call__(self, x: torch.Tensor, rank_int8: bool = False) -> torch.Tensor:
        """``rank_int8``: several rows may rank in int8 where one row ranks in int4 (not for a
        step holding a seeded sequence: its tail would depend on its neighbours)."""
        start = self.int8_from_rows
        if start is not None and x.shape[0] >= start and (start == 1 or rank_int8):
            logits = self._rank_int8(x)
        else:
            logits = self.fast(x)
        top = logits.topk(self.candidates, dim=-1).indices  # [rows, candidates]
        rows = self.exact.weight[top].float()  # [rows, candidates, hidden]
        exact = (rows @ x.float()[:, :, None])[..., 0]
        if self.exact_scales is not None:
            exact = exact * self.exact_scales[top]
        if self.exact.bias is not None:
            exact = exact + self.exact.bias.float()[top]
        # float32 logits: the exact candidates rounded back to bfloat16 would tie, and a tie lets
        # the argmax and a top-k of the same row name different tokens
        return logits.float().scatter(-1, top, exact)


def embedding_weight(weight: Weight) -> DenseWeight | Int8Weight:
    """Embeddings are looked up by row: int4 (grouped) rows are re-quantized to int8 rows."""
    if isinstance(weight, Int4Weight):
        return Int8Weight.quantize(weight.dequantize())
    return weight


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
