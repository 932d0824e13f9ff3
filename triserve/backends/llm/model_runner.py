"""Our own batched forward pass for decoder-only chat models (Llama, Mistral, Qwen2, Qwen3, Phi-3,
SmolLM3, Gemma, Gemma 2, Gemma 3, GLM, GLM-4; what differs between them is in :mod:`.architectures`).

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
import types
from dataclasses import dataclass
from collections.abc import MutableMapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from triserve.backends.llm.architectures import (ACTIVATIONS, SUPPORTED_ARCHITECTURES, activation_name,
                                                 apply_rope, architecture_of, check_supported, family_of,
                                                 language_model, layer_windows, qk_row_order, rope_tables)
from triserve.backends.llm.cuda_graphs import DecodeGraphs
from triserve.backends.llm.kv_cache import KVCache
from triserve.backends.llm.quantization import (DenseWeight, Embedding, Linear, RescoredHead, Weight,
                                                concatenate, embedding_weight, make_linear, quantize, take_rows)

__all__ = ["DTYPES", "SUPPORTED_ARCHITECTURES", "ModelRunner", "PrefillChunk", "check_supported"]
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
    post_attention_norm: torch.Tensor  # the norm before the MLP (Gemma: pre_feedforward_layernorm)
    gate_up_proj: Linear | tuple[Linear, Linear]
    down_proj: Linear
    # Gemma, GLM-4: norms of the attention's and the MLP's outputs, before the residual add
    attention_output_norm: torch.Tensor | None = None
    mlp_output_norm: torch.Tensor | None = None
    window: int | None = None  # sliding-window attention: the positions a query sees, its own included
    rope: int = 0  # which of the runner's rope tables (Gemma 3: local or global base)


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

    def first_key(self, window: int | None) -> int:
        """The first position any of the chunk's queries sees."""
        return 0 if window is None else max(0, self.start - window + 1)

    def causal_mask(self, group: int, window: int | None = None) -> torch.Tensor:
        """Query row (g, t) of a KV head may see keys up to its own position ``start + t`` (and,
        in a sliding window, no further back than ``window - 1`` positions); columns are keys
        ``first_key(window)..end``."""
        keys = torch.arange(self.first_key(window), self.end)[None, :]
        queries = torch.arange(self.start, self.end)[:, None]
        visible = keys <= queries
        if window is not None:
            visible &= keys > queries - window
        return visible.repeat(group, 1)


def _inputs_guards_only(entries: list) -> list[bool]:
    """torch.compile's guards to keep: those on a step's inputs, none on the runner itself (its
    weights, tables and sizes are fixed once loaded). Checking the runner's hundreds of tensors and
    sizes before every step cost ~0.3 ms of a 7-9 ms batch-1 step at one thread. Safe because each
    runner compiles a code object of its own (:func:`_own_code`): no other runner's step can match."""
    return [not entry.name.startswith("self.") for entry in entries]


_compiled_runners = itertools.count(1)


def _own_code(method: Callable) -> Callable:
    """``method`` bound to a copy of its function with a code object of its own, under a name of its
    own. torch.compile keeps compiled graphs and their guards per code object, and what it learns
    of dynamic sizes per code name and line: so this runner's graphs and sizes are its alone (two
    models in one process never share a graph, whatever guards are dropped, nor one's batch range
    constrain the other's)."""
    function = method.__func__
    name = f"{function.__name__}_runner{next(_compiled_runners)}"
    code = function.__code__.replace(co_name=name, co_qualname=f"{function.__qualname__}_{name}")
    copy = types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


class ModelRunner:
    def __init__(self, config: Any, weights: MutableMapping[str, Weight | torch.Tensor], max_model_len: int,
                 dtype: str = "float32", quantization: str = "none", device: str = "cpu",
                 head_quantization: str = "none", cpu_kernels: str = "torch"):
        """Takes (pops) each weight out of ``weights`` as it builds its own form of it."""
        check_supported(config, max_model_len)
        self.architecture = architecture_of(config)
        config, weights = language_model(config, weights)  # a vision-language model's text decoder
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
        family = family_of(config)
        self.activation = ACTIVATIONS[activation_name(config)]
        scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma: not head_dim
        self.attention_scale = None if scalar is None else scalar ** -0.5
        self.attention_softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.embed_scale = (torch.tensor(config.hidden_size ** 0.5, dtype=self.dtype, device=self.device)
                            if family.scaled_embedding else None)
        windows = layer_windows(config, max_model_len)
        tables, layer_tables, head_order = rope_tables(config, self.head_dim, max_model_len,
                                                       family.interleaved_rope)
        # the checkpoint's q/k rows (and q/k norm weights) in the tables' rotary layout
        q_order = None if head_order is None else qk_row_order(head_order, self.num_heads, self.head_dim)
        k_order = None if head_order is None else qk_row_order(head_order, self.num_kv_heads, self.head_dim)

        def take(name: str) -> Weight | torch.Tensor | None:
            return weights.pop(name, None)

        def vector(name: str | None, order: torch.Tensor | None = None) -> torch.Tensor | None:
            tensor = None if name is None else take(name)
            if tensor is None:
                return None
            tensor = tensor.detach().float()
            if order is not None:
                tensor = tensor[order]
            return (tensor + family.norm_offset).to(self.device, self.dtype)

        def projection(name: str) -> Weight:
            weight = take(name)
            if weight is None:
                raise ValueError(f"the checkpoint has no weight '{name}'")
            return quantize(weight, quantization) if isinstance(weight, torch.Tensor) else weight

        def fused(prefix: str, names: tuple[str, ...],
                  orders: tuple[torch.Tensor | None, ...] = ()) -> Linear | tuple[Linear, ...]:
            parts = [projection(f"{prefix}.{name}.weight") for name in names]
            biases = [take(f"{prefix}.{name}.bias") for name in names]
            for index, order in enumerate(orders):
                if order is not None:
                    parts[index] = take_rows(parts[index], order)
                    biases[index] = None if biases[index] is None else biases[index][order]
            bias = None if all(b is None for b in biases) else torch.cat([
                b if b is not None else torch.zeros(p.shape[0]) for b, p in zip(biases, parts)])
            whole = concatenate(parts)
            if whole is not None:
                return make_linear(whole, bias, self.dtype, self.device, cpu_kernels)
            return tuple(make_linear(p, b, self.dtype, self.device, cpu_kernels) for p, b in zip(parts, biases))

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
            if f"{attention}.qkv_proj.weight" in weights:  # Phi-3 stores them fused
                qkv_names: tuple[str, ...] = ("qkv_proj",)
                qkv_orders: tuple[torch.Tensor | None, ...] = () if q_order is None else (torch.cat((
                    q_order, self.q_size + k_order, torch.arange(self.q_size + self.kv_size,
                                                                 self.q_size + 2 * self.kv_size))),)
            else:
                qkv_names, qkv_orders = ("q_proj", "k_proj", "v_proj"), (q_order, k_order)
            self.layers.append(DecoderLayer(
                input_norm=vector(f"{prefix}.input_layernorm.weight"),
                qkv_proj=fused(attention, qkv_names, qkv_orders),
                q_norm=vector(f"{attention}.q_norm.weight", head_order),
                k_norm=vector(f"{attention}.k_norm.weight", head_order),
                o_proj=fused(attention, ("o_proj",)),
                post_attention_norm=vector(f"{prefix}.{family.pre_mlp_norm}.weight"),
                gate_up_proj=fused(mlp, ("gate_up_proj",) if f"{mlp}.gate_up_proj.weight" in weights
                                   else ("gate_proj", "up_proj")),
                down_proj=fused(mlp, ("down_proj",)),
                attention_output_norm=vector(family.attention_output_norm
                                             and f"{prefix}.{family.attention_output_norm}.weight"),
                mlp_output_norm=vector(family.mlp_output_norm and f"{prefix}.{family.mlp_output_norm}.weight"),
                window=windows[index],
                rope=layer_tables[index],
            ))
        self.final_norm = vector("model.norm.weight")
        self.windows = {layer.window for layer in self.layers}  # None: full attention
        if tied:
            self.lm_head = self.embed_tokens.head
        else:
            if isinstance(head, torch.Tensor):
                head = DenseWeight(head) if quantization == "none" else quantize(head, "int8")
            # a rescored head reads its exact rows: torch's layout
            self.lm_head = make_linear(head, None, self.dtype, self.device,
                                       cpu_kernels if head_quantization == "none" else "torch")
        self.rope_tables = [(cos.to(self.device, self.dtype), sin.to(self.device, self.dtype))
                            for cos, sin in tables]
        if head_quantization != "none":
            if self.device.type != "cpu":
                raise ValueError(f"head_quantization {head_quantization} runs on torch's CPU kernels only, "
                                 f"not on device '{self.device}'")
            self.lm_head = RescoredHead(self.lm_head, self.dtype, ranking=head_quantization,
                                        cpu_kernels=cpu_kernels)
        self._key_positions = torch.arange(max_model_len, device=self.device)
        # or their compiled forms (compile_decode)
        self._decode_one, self._decode_many = self._decode_single, self._decode_batch
        self.compiled, self._compiled_threads = False, 0
        self.compiled_steps = 0  # batch-1 steps that ran compiled
        self.compiled_batch_steps = 0  # steps of several sequences that ran compiled
        self._batch_ranges: list[tuple[int, int]] = []  # (smallest, largest) batch of each batch graph
        self._stance = "eager_on_recompile"  # once compiled: never compile again while serving
        self.graphs: DecodeGraphs | None = None  # on a GPU: the padded step as CUDA graphs (capture_decode_graphs)
        self.graph_steps = 0  # decode steps that replayed a CUDA graph
        self.weight_bytes = self._count_bytes(tied)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return KVCache.bytes_per_token_of(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def new_kv_cache(self, max_slots: int, spare_slots: int = 0) -> KVCache:
        return KVCache(self.num_layers, max_slots, self.num_kv_heads, self.head_dim,
                       self.max_model_len, self.dtype, self.device, spare_slots)

    def _count_bytes(self, tied: bool) -> int:
        """Bytes of every weight the runner holds (what a decode step reads, plus the embedding)."""
        total = self.embed_tokens.nbytes + (0 if tied else self.lm_head.nbytes)
        if tied and isinstance(self.lm_head, RescoredHead):  # a ranking copy beside the table
            total += self.lm_head.extra_nbytes
        total += self.final_norm.numel() * self.final_norm.element_size()
        total += sum(t.numel() * t.element_size() for table in self.rope_tables for t in table)
        for layer in self.layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                total += sum(part.nbytes for part in (linear if isinstance(linear, tuple) else (linear,)))
            for vector in (layer.input_norm, layer.post_attention_norm, layer.q_norm, layer.k_norm,
                           layer.attention_output_norm, layer.mlp_output_norm):
                total += 0 if vector is None else vector.numel() * vector.element_size()
        return total

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
        # per window (None: full attention), each chunk's mask over the keys it sees
        masks = {window: [chunk.causal_mask(self.group, window) for chunk in chunks] for window in self.windows}

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]
            window = self.layers[index].window
            out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
            for chunk, first, last, mask in zip(chunks, rows, rows[1:], masks[window]):
                slot, count = chunk.slot, last - first
                keys[slot, :, chunk.start : chunk.end] = k[first:last].transpose(0, 1)
                values[slot, :, chunk.start : chunk.end] = v[first:last].transpose(0, 1)
                grouped = q[first:last].transpose(0, 1).reshape(
                    1, self.num_kv_heads, self.group * count, self.head_dim)
                seen = slice(chunk.first_key(window), chunk.end)
                attended = self._attention(grouped, keys[slot : slot + 1, :, seen], values[slot : slot + 1, :, seen],
                                           mask)
                out[first:last] = attended.reshape(self.num_heads, count, self.head_dim).transpose(0, 1).reshape(
                    count, -1)
            return out

        token_ids = torch.tensor([token for chunk in chunks for token in chunk.token_ids])
        return self._forward(token_ids, positions, attend), rows

    def decode(self, cache: KVCache, token_ids: list[int], positions: list[int],
               slots: list[int] | None = None, compiled: bool = True) -> torch.Tensor:
        """One new token for each sequence, each at its own position, in ``slots`` (default
        ``0..len(token_ids)-1``). Returns logits [batch, vocab]. ``compiled=False`` keeps the
        step off the compiled graphs (their sums differ from the eager step's in the last bits) and
        off the head's int8 ranking of several rows: what a seeded sequence needs to be
        reproducible whatever its neighbours.

        The usual batch is every running sequence, slots ``0..n-1``: attention reads a view of
        the cache. While a long prompt is prefilled in chunks its slot sits out, and the others'
        K/V are gathered (a copy) for that step."""
        graphs = self.graphs
        if compiled and graphs is not None and graphs.serves(cache, len(token_ids)):
            self.graph_steps += 1
            return graphs.replay(token_ids, positions, list(range(len(token_ids))) if slots is None else slots)
        with self._on_device:  # the index tensors made below live where the model does
            return self._decode(cache, token_ids, positions, slots, compiled)

    def _decode(self, cache: KVCache, token_ids: list[int], positions: list[int],
                slots: list[int] | None, compiled: bool) -> torch.Tensor:
        batch = len(token_ids)
        length = max(positions) + 1
        slots = list(range(batch)) if slots is None else slots
        # the compiled steps are traced once with the attended length symbolic (>= 2: a decoded
        # token always follows at least one prompt token), never per length; the context's very
        # last position (the whole cache) is a shape of their own, and their kernels are made for
        # the thread count they were compiled with: otherwise eager
        run_compiled = compiled and self.compiled and length < self.max_model_len and (
            torch.get_num_threads() == self._compiled_threads)
        if batch == 1:  # one sequence sees all its keys: its slot's views, no mask
            keys, values = cache.slot_views(slots[0])
            key_positions = self._key_positions[:length]
            if run_compiled:
                torch._dynamo.mark_dynamic(key_positions, 0, min=2, max=self.max_model_len - 1)
                # a recompilation, should anything ever call for one, runs eager instead (never
                # minutes of compiling in the middle of serving)
                self.compiled_steps += 1
                with torch.compiler.set_stance(self._stance):
                    return self._decode_one(keys, values, torch.tensor(token_ids), torch.tensor(positions),
                                            key_positions)
            return self._decode_single(keys, values, torch.tensor(token_ids), torch.tensor(positions),
                                       key_positions)

        position = torch.tensor(positions)
        rows = torch.tensor(slots)
        if run_compiled:
            # one graph for every batch size and length (both symbolic), any slots
            key_positions = self._key_positions[:length]
            torch._dynamo.mark_dynamic(key_positions, 0, min=2, max=self.max_model_len - 1)
            token_tensor = torch.tensor(token_ids)
            low, high = next(r for r in self._batch_ranges if r[0] <= batch <= r[1])
            if low < high:
                for tensor in (token_tensor, position, rows):
                    torch._dynamo.mark_dynamic(tensor, 0, min=low, max=high)
            self.compiled_batch_steps += 1
            with torch.compiler.set_stance(self._stance):
                return self._decode_many(cache.keys, cache.values, token_tensor, position, rows, key_positions)
        contiguous = slots == list(range(batch))
        # per window: the first key any row sees, and each row's mask over the keys from there
        masks = {}
        for window, visible in self._visible_keys(torch.arange(length), position).items():
            first = 0 if window is None else max(0, min(positions) - window + 1)
            masks[window] = (first, visible[:, None, None, first:])

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.keys[index], cache.values[index]
            keys[rows, :, position] = k
            values[rows, :, position] = v
            first, mask = masks[self.layers[index].window]
            if contiguous:
                keys, values = keys[:batch, :, first:length], values[:batch, :, first:length]
            else:
                keys, values = keys[rows, :, first:length], values[rows, :, first:length]
            grouped = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = self._attention(grouped, keys, values, mask)
            return out.reshape(batch, -1)

        return self._logits(self._forward(torch.tensor(token_ids), position, attend), rank_int8=compiled)

    def _visible_keys(self, key_positions: torch.Tensor, positions: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """Per window of the model's layers (None: full attention), which of ``key_positions``
        each decoded row (at ``positions``) sees: [rows, keys] booleans."""
        causal = key_positions[None, :] <= positions[:, None]
        return {window: causal if window is None else causal & (key_positions[None, :] > positions[:, None] - window)
                for window in self.windows}

    def compile_decode(self, cache: KVCache) -> None:
        """Compile the decode step with ``torch.compile`` (inductor: the ~40 small operations
        around each layer's matmuls fused into a few kernels) and run it once, so that the
        compilation happens now, not in the first request: two graphs, one for a sequence alone
        and one for batches (their size symbolic), each serving every length and any slots.
        Prefill stays eager. On failure (e.g. no C++ compiler) the eager step stays and the
        exception propagates."""
        if self.windows != {None} or self.attention_softcap is not None:
            raise ValueError(f"the {self.architecture} decode step (sliding-window or soft-capped attention) "
                             f"is not compiled")
        options = {"guard_filter_fn": _inputs_guards_only}
        self._decode_one = torch.compile(_own_code(self._decode_single), fullgraph=True, options=options)
        self._decode_many = torch.compile(_own_code(self._decode_batch), fullgraph=True, options=options)
        # batch sizes each batch graph serves: a head that ranks rows in int8 from some number of
        # rows on (RescoredHead) makes a graph below that number and one from it
        bounds = [2, cache.slots + 1]
        if isinstance(self.lm_head, RescoredHead) and (self.lm_head.int8_from_rows or 0) > 2:
            bounds.insert(1, self.lm_head.int8_from_rows)
        self._batch_ranges = [(low, high - 1) for low, high in zip(bounds, bounds[1:]) if low < high]
        self.compiled, self._stance, self._compiled_threads = True, "default", torch.get_num_threads()
        try:
            # position 1 of the first slots: no sequence holds it yet
            self.decode(cache, [0], [1], [0])
            for low, _ in self._batch_ranges:
                self.decode(cache, [0] * low, [1] * low, list(range(low)))
        except BaseException:
            self._decode_one, self._decode_many, self.compiled = self._decode_single, self._decode_batch, False
            raise
        finally:
            self._stance, self.compiled_steps, self.compiled_batch_steps = "eager_on_recompile", 0, 0

    def capture_decode_graphs(self, cache: KVCache) -> None:
        """On a GPU: capture the padded decode step (:meth:`decode_padded`) over ``cache`` as CUDA
        graphs, one per padded batch size up to the cache's slots (see :mod:`.cuda_graphs`); the
        steps :meth:`decode` may run on graphs replay them from then on. ``cache`` needs a scratch
        slot (``spare_slots=1``). On failure the eager step stays and the exception propagates."""
        self.graphs = None
        with self._on_device:
            self.graphs = DecodeGraphs(self.decode_padded, cache, cache.slots, self.device)

    def decode_padded(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_ids: torch.Tensor,
                      positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The decode step with static shapes, a pure function of tensors (what a CUDA graph
        records; it runs on any device): one token for each row, ``token_ids[i]`` at
        ``positions[i]`` of cache slot ``rows[i]`` of every layer's ``keys``/``values`` ([slots,
        kv_heads, capacity, head_dim] each). Every row attends the whole capacity under a mask
        from its position (and its layer's window), so no shape depends on the lengths. A
        padding row (token 0, position 0, the cache's scratch slot) writes only that slot.
        Returns float32 logits [rows, vocab] on the model's device."""
        batch = token_ids.shape[0]
        masks = {window: visible[:, None, None, :]
                 for window, visible in self._visible_keys(self._key_positions, positions).items()}

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer_keys, layer_values = keys[index], values[index]
            layer_keys[rows, :, positions] = k
            layer_values[rows, :, positions] = v
            grouped = q.reshape(batch, self.num_kv_heads, self.group, self.head_dim)
            out = self._attention(grouped, layer_keys[rows], layer_values[rows], masks[self.layers[index].window])
            return out.reshape(batch, -1)

        return self._device_logits(self._forward(token_ids, positions, attend))

    def _decode_single(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_ids: torch.Tensor,
                       position: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """One token of one sequence whose layers' K/V are ``keys``/``values`` ([kv_heads, capacity,
        head_dim] each); it attends positions ``0..len(key_positions)-1``. What
        ``torch.compile`` compiles: tensors and sizes only, no Python value that changes per step."""
        length = key_positions.shape[0]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer_keys, layer_values = keys[index], values[index]
            layer_keys[:, position] = k.transpose(0, 1)
            layer_values[:, position] = v.transpose(0, 1)
            grouped = q.view(self.num_kv_heads, self.group, self.head_dim)
            if not torch.compiler.is_compiling():
                window = self.layers[index].window
                first = 0 if window is None else max(0, length - window)
                out = self._attention(grouped[None], layer_keys[None, :, first:length],
                                      layer_values[None, :, first:length], None)
                return out.reshape(1, -1)
            # compiled (full attention, no soft-capping: compile_decode checks): one query row per
            # head, so dot products, softmax and the weighted sum as plain reductions in float32,
            # which the compiler fuses into a few loops (SDPA's CPU kernel costs ~50 us a call at
            # this size, 30 calls a step)
            scores = (grouped.float()[:, :, None, :] * layer_keys[:, None, :length].float()).sum(-1)
            weights = torch.softmax(scores * (self.attention_scale or self.head_dim ** -0.5), dim=-1)
            out = (weights[..., None] * layer_values[:, None, :length].float()).sum(-2)
            return out.to(q.dtype).reshape(1, -1)

        return self._logits(self._forward(token_ids, position, attend))

    def _decode_batch(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_ids: torch.Tensor,
                      position: torch.Tensor, rows: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """One token for each of several sequences (full attention only): the sequences' cache
        rows are ``rows`` of every layer's ``keys``/``values`` ([slots, kv_heads, capacity,
        head_dim] each), their new tokens at ``position``, and they attend positions
        ``0..len(key_positions)-1``, each up to its own position. What ``torch.compile``
        compiles for batches: the attention is written as float32 reductions over the rows'
        keys, which the compiler fuses with the gather of those rows (no copy of their K/V, and
        none of SDPA's per-call cost)."""
        batch, length = token_ids.shape[0], key_positions.shape[0]
        hidden = (key_positions[None, :] > position[:, None])[:, None, None, :]  # [batch, 1, 1, keys]
        scale = self.attention_scale or self.head_dim ** -0.5

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer_keys, layer_values = keys[index], values[index]
            layer_keys[rows, :, position] = k
            layer_values[rows, :, position] = v
            grouped = q.reshape(batch, self.num_kv_heads, self.group, 1, self.head_dim).float()
            seen_keys = layer_keys[rows, :, :length].float()[:, :, None]  # [batch, kv_heads, 1, keys, head_dim]
            scores = ((grouped * seen_keys).sum(-1) * scale).masked_fill(hidden, float("-inf"))
            weights = torch.softmax(scores, dim=-1)  # [batch, kv_heads, group, keys]
            out = (weights[..., None] * layer_values[rows, :, :length].float()[:, :, None]).sum(-2)
            return out.to(q.dtype).reshape(batch, -1)

        return self._logits(self._forward(token_ids, position, attend), rank_int8=True)

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The decoder stack over ``tokens`` rows (one per new token); returns hidden states."""
        count = token_ids.shape[0]
        ropes = [(cos[positions][:, None, :], sin[positions][:, None, :]) for cos, sin in self.rope_tables]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        hidden = self.embed_tokens(token_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
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
            qk = apply_rope(qk, *ropes[layer.rope])
            attended = layer.o_proj(attend(index, qk[:, :heads], qk[:, heads:], v))
            if layer.attention_output_norm is not None:
                attended = F.rms_norm(attended, attended.shape[-1:], layer.attention_output_norm, self.eps)
            hidden = hidden + attended
            x = F.rms_norm(hidden, hidden.shape[-1:], layer.post_attention_norm, self.eps)
            if isinstance(layer.gate_up_proj, tuple):
                gate, up = (proj(x) for proj in layer.gate_up_proj)
            else:
                gate_up = layer.gate_up_proj(x)
                gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            out = layer.down_proj(self.activation(gate) * up)
            if layer.mlp_output_norm is not None:
                out = F.rms_norm(out, out.shape[-1:], layer.mlp_output_norm, self.eps)
            hidden = hidden + out
        return hidden

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention of grouped queries over keys; with Gemma 2's soft-capping of the
        scores (``cap * tanh(score / cap)``), which SDPA cannot do, written out."""
        if self.attention_softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.attention_scale)
        cap = self.attention_softcap
        scale = self.attention_scale or self.head_dim ** -0.5
        scores = torch.tanh(torch.matmul(q, keys.transpose(-1, -2)) * scale / cap) * cap  # HF's order
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), values)

    def _logits(self, hidden: torch.Tensor, rank_int8: bool = False) -> torch.Tensor:
        """float32 logits on the CPU, where sampling runs (its generators are CPU ones).
        ``rank_int8``: a :class:`RescoredHead` may rank several rows in int8 (see there)."""
        return self._device_logits(hidden, rank_int8).cpu()

    def _device_logits(self, hidden: torch.Tensor, rank_int8: bool = False) -> torch.Tensor:
        """float32 logits where the model is."""
        hidden = F.rms_norm(hidden, hidden.shape[-1:], self.final_norm, self.eps)
        if isinstance(self.lm_head, RescoredHead):
            logits = self.lm_head(hidden, rank_int8).float()
        else:
            logits = self.lm_head(hidden).float()
        if self.final_softcap is not None:  # Gemma 2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
