"""Our own batched forward pass for the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3).

transformers' ``generate`` decodes one request at a time with its own cache
objects; the engine instead needs one forward for many sequences, each at its
own length, over the slot-based :class:`KVCache`. The runner is built from a
config and a mapping of HF weight names to weights (a HF model's state dict, a
safetensors checkpoint, or a GGUF file's tensors, see :mod:`.weights`), so
quantized weights arrive quantized and are never expanded.

Decoding one token reads every weight once; what is not weight reading is kept
small: q/k/v and gate/up are one matrix each (two kernel calls fewer per layer
and one read of the activations), rope runs once over q and k together, and
only the last position of each sequence goes through the LM head.

Prefill takes many sequences at once: their new tokens go through every
linear layer as one matrix (one pass over the weights for all of them), and
only attention runs per sequence. Grouped-query attention runs without
repeating K/V: the query heads that share a KV head are laid out as extra
query rows of that head, and ``scaled_dot_product_attention`` does the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from dataclasses import dataclass
from collections.abc import MutableMapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from triserve.backends.llm.kv_cache import KVCache
from triserve.backends.llm.quantization import (DenseWeight, Embedding, Linear, Weight, concatenate,
                                                embedding_weight, make_linear, quantize)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM")
#: rope types whose frequencies are fixed at load (HF computes them; we read them)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: attends the new tokens' queries for one layer and returns [tokens, q_heads * head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor
    qkv_proj: Linear | tuple[Linear, Linear, Linear]  # one matrix, or three when stored differently
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm of each head's q and k before rope
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_attention_norm: torch.Tensor
    gate_up_proj: Linear | tuple[Linear, Linear]
    down_proj: Linear


@dataclass(slots=True)
class PrefillChunk:
    """New tokens of one sequence: positions ``start..`` of ``slot``, whose first ``start``
    positions are already in the KV cache."""

    slot: int
    token_ids: list[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def causal_mask(self, group: int) -> torch.Tensor:
        """Query row (g, t) of a KV head may see keys up to its own position ``start + t``."""
        visible = torch.arange(self.end)[None, :] <= torch.arange(self.start, self.end)[:, None]
        return visible.repeat(group, 1)


class ModelRunner:
    def __init__(self, config: Any, weights: MutableMapping[str, Weight | torch.Tensor], max_model_len: int,
                 dtype: str = "float32", quantization: str = "none", device: str = "cpu"):
        """Takes (pops) each weight out of ``weights`` as it builds its own form of it."""
        check_supported(config, max_model_len)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        # factory calls (index tensors, masks) made on the model's device; on the CPU no context at
        # all (torch's device context intercepts every call, a cost per operation)
        self._on_device = contextlib.nullcontext() if self.device.type == "cpu" else self.device
        self.max_model_len = max_model_len
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        self.architecture = _architecture(config)

        def take(name: str) -> Weight | torch.Tensor | None:
            return weights.pop(name, None)

        def vector(name: str) -> torch.Tensor | None:
            tensor = take(name)
            return None if tensor is None else tensor.detach().to(self.device, self.dtype)

        def projection(name: str) -> Weight:
            weight = take(name)
            if weight is None:
                raise ValueError(f"the checkpoint has no weight '{name}'")
            return quantize(weight, quantization) if isinstance(weight, torch.Tensor) else weight

        def fused(prefix: str, names: tuple[str, ...]) -> Linear | tuple[Linear, ...]:
            parts = [projection(f"{prefix}.{name}.weight") for name in names]
            biases = [take(f"{prefix}.{name}.bias") for name in names]
            bias = None if all(b is None for b in biases) else torch.cat([
                b if b is not None else torch.zeros(p.shape[0]) for b, p in zip(biases, parts)])
            whole = concatenate(parts)
            if whole is not None:
                return make_linear(whole, bias, self.dtype, self.device)
            return tuple(make_linear(p, b, self.dtype, self.device) for p, b in zip(parts, biases))

        embed = take("model.embed_tokens.weight")
        head = take("lm_head.weight")
        tied = head is None or getattr(config, "tie_word_embeddings", False)
        if isinstance(embed, torch.Tensor):
            embed = DenseWeight(embed) if quantization == "none" else quantize(embed, "int8")
        self.embed_tokens = Embedding(embedding_weight(embed), self.dtype, self.device)
        self.layers = []
        for index in range(config.num_hidden_layers):
            prefix = f"model.layers.{index}"
            attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
            self.layers.append(DecoderLayer(
                input_norm=vector(f"{prefix}.input_layernorm.weight"),
                qkv_proj=fused(attention, ("qkv_proj",) if f"{attention}.qkv_proj.weight" in weights
                               else ("q_proj", "k_proj", "v_proj")),  # Phi-3 stores them fused
                q_norm=vector(f"{attention}.q_norm.weight"),
                k_norm=vector(f"{attention}.k_norm.weight"),
                o_proj=fused(attention, ("o_proj",)),
                post_attention_norm=vector(f"{prefix}.post_attention_layernorm.weight"),
                gate_up_proj=fused(mlp, ("gate_up_proj",) if f"{mlp}.gate_up_proj.weight" in weights
                                   else ("gate_proj", "up_proj")),
                down_proj=fused(mlp, ("down_proj",)),
            ))
        self.final_norm = vector("model.norm.weight")
        if tied:
            self.lm_head = self.embed_tokens.head
        else:
            if isinstance(head, torch.Tensor):
                head = DenseWeight(head) if quantization == "none" else quantize(head, "int8")
            self.lm_head = make_linear(head, None, self.dtype, self.device)
        self.cos, self.sin = self._rope_tables(config, max_model_len)
        self.weight_bytes = self._count_bytes(tied)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return KVCache.bytes_per_token_of(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def new_kv_cache(self, max_slots: int) -> KVCache:
        return KVCache(self.num_layers, max_slots, self.num_kv_heads, self.head_dim,
                       self.max_model_len, self.dtype, self.device)

    def _count_bytes(self, tied: bool) -> int:
        """Bytes of every weight the runner holds (what a decode step reads, plus the embedding)."""
        total = self.embed_tokens.nbytes + (0 if tied else self.lm_head.nbytes)
        total += sum(t.numel() * t.element_size() for t in (self.final_norm, self.cos, self.sin))
        for layer in self.layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                total += sum(part.nbytes for part in (linear if isinstance(linear, tuple) else (linear,)))
            for vector in (layer.input_norm, layer.post_attention_norm, layer.q_norm, layer.k_norm):
                total += 0 if vector is None else vector.numel() * vector.element_size()
        return total

    def _rope_tables(self, config: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the frequencies HF's rotary embedding derives from the
        config, laid out for :func:`_rope` (sin's first half negated)."""
        rotary_emb = _rotary_embedding_class(config)(config=config)
        inv_freq = rotary_emb.inv_freq.detach().float()
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1) * scaling
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1) * scaling
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def prefill(self, cache: KVCache, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Run every chunk's tokens in one forward pass. Returns the logits of each chunk's last
        position [len(chunks), vocab]."""
        with self._on_device:
            hidden, rows = self._prefill_hidden(cache, chunks)
            return self._logits(hidden[torch.tensor(rows[1:]) - 1])

    def prompt_logits(self, cache: KVCache, token_ids: list[int]) -> torch.Tensor:
        """The logits after every position of ``token_ids`` (in slot 0): [len, vocab]. For
        measuring quality (perplexity, agreement between weight formats), not for serving."""
        with self._on_device:
            hidden, _ = self._prefill_hidden(cache, [PrefillChunk(0, token_ids, 0)])
            return self._logits(hidden)

    def _prefill_hidden(self, cache: KVCache, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[int]]:
        rows = [0, *itertools.accumulate(len(chunk.token_ids) for chunk in chunks)]  # chunk i: rows[i]..
        positions = torch.cat([torch.arange(chunk.start, chunk.end) for chunk in chunks])
        masks = [chunk.causal_mask(self.group) for chunk in chunks]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]
            out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
            for chunk, first, last, mask in zip(chunks, rows, rows[1:], masks):
                slot, count = chunk.slot, last - first
                keys[slot, :, chunk.start : chunk.end] = k[first:last].transpose(0, 1)
                values[slot, :, chunk.start : chunk.end] = v[first:last].transpose(0, 1)
                grouped = q[first:last].transpose(0, 1).reshape(
                    1, self.num_kv_heads, self.group * count, self.head_dim)
                attended = F.scaled_dot_product_attention(
                    grouped, keys[slot : slot + 1, :, : chunk.end], values[slot : slot + 1, :, : chunk.end],
                    attn_mask=mask)
                out[first:last] = attended.reshape(self.num_heads, count, self.head_dim).transpose(0, 1).reshape(
                    count, -1)
            return out

        token_ids = torch.tensor([token for chunk in chunks for token in chunk.token_ids])
        return self._forward(token_ids, positions, attend), rows

    def decode(self, cache: KVCache, token_ids: list[int], positions: list[int],
               slots: list[int] | None = None) -> torch.Tensor:
        """One new token for each sequence, each at its own position, in ``slots`` (default
        ``0..len(token_ids)-1``). Returns logits [batch, vocab].

        The usual batch is every running sequence, slots ``0..n-1``: attention reads a view of
        the cache. While a long prompt is prefilled in chunks its slot sits out, and the others'
        K/V are gathered (a copy) for that step."""
        with self._on_device:  # the index tensors made below live where the model does
            return self._decode(cache, token_ids, positions, slots)

    def _decode(self, cache: KVCache, token_ids: list[int], positions: list[int],
                slots: list[int] | None) -> torch.Tensor:
        batch = len(token_ids)
        length = max(positions) + 1
        slots = list(range(batch)) if slots is None else slots
        if batch == 1:  # one sequence sees all its keys: plain slices, no mask
            start, slot = positions[0], slots[0]

            def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                keys, values = cache.keys[index], cache.values[index]
                keys[slot, :, start] = k[0]
                values[slot, :, start] = v[0]
                grouped = q.view(1, self.num_kv_heads, self.group, self.head_dim)
                out = F.scaled_dot_product_attention(grouped, keys[slot : slot + 1, :, :length],
                                                     values[slot : slot + 1, :, :length])
                return out.reshape(1, -1)

            return self._logits(self._forward(torch.tensor(token_ids), torch.tensor(positions), attend))

        position = torch.tensor(positions)
        rows = torch.tensor(slots)
        contiguous = slots == list(range(batch))
        mask = (torch.arange(length)[None, :] <= position[:, None])[:, None, None, :]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]
            keys[rows, :, position] = k
            values[rows, :, position] = v
            if contiguous:
                keys, values = keys[:batch, :, :length], values[:batch, :, :length]
            else:
                keys, values = keys[rows, :, :length], values[rows, :, :length]
            grouped = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)
            return out.reshape(batch, -1)

        return self._logits(self._forward(torch.tensor(token_ids), position, attend))

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The decoder stack over ``tokens`` rows (one per new token); returns hidden states."""
        count = token_ids.shape[0]
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        hidden = self.embed_tokens(token_ids)
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.input_norm, self.eps)
            if isinstance(layer.qkv_proj, tuple):
                qkv = torch.cat([proj(x) for proj in layer.qkv_proj], dim=-1)
            else:
                qkv = layer.qkv_proj(x)
            v = qkv[:, k_end:].view(count, kv_heads, head_dim)
            qk = qkv[:, :k_end].view(count, heads + kv_heads, head_dim)
            if layer.q_norm is not None:
                qk = torch.cat((F.rms_norm(qk[:, :heads], (head_dim,), layer.q_norm, self.eps),
                                F.rms_norm(qk[:, heads:], (head_dim,), layer.k_norm, self.eps)), dim=1)
            qk = _rope(qk, cos, sin)
            attended = attend(index, qk[:, :heads], qk[:, heads:], v)
            hidden = hidden + layer.o_proj(attended)
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.post_attention_norm, self.eps)
            if isinstance(layer.gate_up_proj, tuple):
                gate, up = (proj(x) for proj in layer.gate_up_proj)
            else:
                gate_up = layer.gate_up_proj(x)
                gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            hidden = hidden + layer.down_proj(F.silu(gate) * up)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits on the CPU, where sampling runs (its generators are CPU ones)."""
        hidden = F.rms_norm(hidden, hidden.shape[-1:], self.final_norm, self.eps)
        return self.lm_head(hidden).float().cpu()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, with rotate_half's sign folded into ``sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def _architecture(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return architectures[0]
    return f"{type(config).__name__.removesuffix('Config')}ForCausalLM"


def _rotary_embedding_class(config: Any) -> type:
    """The architecture's own rotary embedding module (it derives the frequencies from the config)."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    module = sys.modules[model_class.__module__]
    return next(value for name, value in vars(module).items() if name.endswith("RotaryEmbedding"))


def check_supported(config: Any, max_model_len: int) -> None:
    """Refuse, by name, what this forward pass would compute wrongly."""
    architecture = _architecture(config)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"the LLM engine does not support the architecture '{architecture}'; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if config.hidden_act != "silu":
        raise ValueError(f"the LLM engine supports only the 'silu' activation, not '{config.hidden_act}'")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"the LLM engine does not support rope type '{rope_type}'; "
                         f"supported: {', '.join(STATIC_ROPE_TYPES)}")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_model_len:
        raise ValueError(f"the model uses sliding-window attention ({window} tokens), which the LLM "
                         f"engine does not implement; set max_model_len <= {window}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                         f"max_position_embeddings {limit}")
