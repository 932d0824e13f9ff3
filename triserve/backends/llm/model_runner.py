"""Our own batched forward pass for the Llama family (Llama, Mistral, Qwen2).

transformers' ``generate`` decodes one request at a time with its own cache
objects; the engine instead needs one forward for many sequences, each at its
own length, over the slot-based :class:`KVCache`. The weights are taken from
the loaded HF model's modules (no copy when the dtype matches and nothing is
quantized), and only the last position of each sequence goes through the
LM head.

Prefill takes many sequences at once: their new tokens go through every
linear layer as one matrix (one pass over the weights for all of them), and
only attention runs per sequence.

Grouped-query attention runs without repeating K/V: the query heads that
share a KV head are laid out as extra query rows of that head, and
``scaled_dot_product_attention`` does the rest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from triserve.backends.llm.kv_cache import KVCache
from triserve.backends.llm.quantization import Linear, make_linear

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: rope types whose frequencies are fixed at load (HF computes them; we read them)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: attends the new tokens' queries for one layer and returns [tokens, q_heads * head_dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    post_attention_norm: torch.Tensor
    gate_proj: Linear
    up_proj: Linear
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
    def __init__(self, hf_model: torch.nn.Module, max_model_len: int, dtype: str = "float32",
                 quantization: str = "none"):
        config = hf_model.config
        _check_supported(hf_model, max_model_len)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        self.max_model_len = max_model_len
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size

        def linear(module: torch.nn.Linear) -> Linear:
            return make_linear(module.weight, module.bias, self.dtype, quantization)

        def weight(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to(self.dtype)

        body = hf_model.model
        self.embed_tokens = weight(body.embed_tokens.weight)
        self.layers = [
            DecoderLayer(
                input_norm=weight(layer.input_layernorm.weight),
                q_proj=linear(layer.self_attn.q_proj),
                k_proj=linear(layer.self_attn.k_proj),
                v_proj=linear(layer.self_attn.v_proj),
                o_proj=linear(layer.self_attn.o_proj),
                post_attention_norm=weight(layer.post_attention_layernorm.weight),
                gate_proj=linear(layer.mlp.gate_proj),
                up_proj=linear(layer.mlp.up_proj),
                down_proj=linear(layer.mlp.down_proj),
            )
            for layer in body.layers
        ]
        self.final_norm = weight(body.norm.weight)
        self.lm_head = linear(hf_model.get_output_embeddings())
        self.cos, self.sin = self._rope_tables(body.rotary_emb, max_model_len)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_kv_cache(self, max_slots: int) -> KVCache:
        return KVCache(self.num_layers, max_slots, self.num_kv_heads, self.head_dim,
                       self.max_model_len, self.dtype)

    def _rope_tables(self, rotary_emb: torch.nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, from the frequencies HF derived from the config."""
        inv_freq = rotary_emb.inv_freq.detach().float()
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
        return (angles.cos() * scaling).to(self.dtype), (angles.sin() * scaling).to(self.dtype)

    def prefill(self, cache: KVCache, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Run every chunk's tokens in one forward pass. Returns the logits of each chunk's last
        position [len(chunks), vocab]."""
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
        hidden = self._forward(token_ids, positions, attend)
        return self._logits(hidden[torch.tensor(rows[1:]) - 1])

    def decode(self, cache: KVCache, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One new token for each of the sequences in slots ``0..len(token_ids)-1``, each at its
        own position. Returns logits [batch, vocab]."""
        batch = len(token_ids)
        position = torch.tensor(positions)
        length = max(positions) + 1
        rows = torch.arange(batch)
        mask = (torch.arange(length)[None, :] <= position[:, None])[:, None, None, :]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]
            keys[rows, :, position] = k
            values[rows, :, position] = v
            grouped = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped, keys[:batch, :, :length], values[:batch, :, :length], attn_mask=mask)
            return out.reshape(batch, -1)

        return self._logits(self._forward(torch.tensor(token_ids), position, attend))

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The decoder stack over ``tokens`` rows (one per new token); returns hidden states."""
        count = token_ids.shape[0]
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        hidden = self.embed_tokens[token_ids]
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.input_norm, self.eps)
            q = layer.q_proj(x).view(count, self.num_heads, self.head_dim)
            k = layer.k_proj(x).view(count, self.num_kv_heads, self.head_dim)
            v = layer.v_proj(x).view(count, self.num_kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            hidden = hidden + layer.o_proj(attend(index, q, k, v))
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.post_attention_norm, self.eps)
            hidden = hidden + layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x))
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.rms_norm(hidden, hidden.shape[-1:], self.final_norm, self.eps)
        return self.lm_head(hidden).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_supported(hf_model: torch.nn.Module, max_model_len: int) -> None:
    """Refuse, by name, what this forward pass would compute wrongly."""
    config = hf_model.config
    architecture = type(hf_model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"the LLM engine does not support the architecture '{architecture}'; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if config.hidden_act != "silu":
        raise ValueError(f"the LLM engine supports only the 'silu' activation, not '{config.hidden_act}'")
    rope_type = getattr(hf_model.model.rotary_emb, "rope_type", "default")
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
