"""What differs between the decoder-only architectures the model runner runs, read from a config.

The runner has one forward pass (see :mod:`.model_runner`); an architecture is
that pass plus a few hooks, all fixed at load:

- a :class:`Family` (by the config's ``architectures`` name): which norms wrap
  the attention and the MLP, whether RMSNorm weights are stored as ``w`` for
  ``1 + w`` (Gemma), whether embeddings are scaled by ``sqrt(hidden)`` (Gemma),
  and the rotary layout (GLM rotates interleaved pairs of the first part of
  each head);
- from the config itself: the MLP's activation, the attention scale
  (``query_pre_attn_scalar``), attention and final logit soft-capping, the
  sliding window of each layer (``layer_types``, or every layer for Mistral),
  and the rope frequencies of each layer (Gemma 3: local and global bases;
  SmolLM3: none on some layers, an identity table);
- a vision-language checkpoint whose text decoder is one of these (Gemma 3 4B+)
  runs as that decoder (:func:`language_model`): text in, text out.

Rope is applied one way only, HF's ``rotate_half`` over the two halves of a
head, on tables as wide as a head. Any other layout (partial rotary, GLM's
interleaved pairs) is brought to it at load: the q/k rows of each head are
reordered so that the rotated pairs sit at ``i`` and ``head_dim/2 + i``, and the
dimensions rope leaves alone get ``cos = 1, sin = 0``. The same order applied to
q and k leaves every ``q . k`` unchanged, so attention and the KV cache need
nothing else, and the decode step does no extra work.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from triserve.backends.llm.weights import RenamedWeights


@dataclass(frozen=True)
class Family:
    #: HF name of the norm before the MLP
    pre_mlp_norm: str = "post_attention_layernorm"
    #: HF names of the norms applied to the attention's and the MLP's output before the residual add
    attention_output_norm: str | None = None
    mlp_output_norm: str | None = None
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    scaled_embedding: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size)
    interleaved_rope: bool = False  # GLM rotates pairs (2i, 2i + 1), not (i, i + rotary_dim / 2)


LLAMA = Family()
GEMMA1 = Family(norm_offset=1.0, scaled_embedding=True)
GEMMA = Family(pre_mlp_norm="pre_feedforward_layernorm", attention_output_norm="post_attention_layernorm",
               mlp_output_norm="post_feedforward_layernorm", norm_offset=1.0, scaled_embedding=True)
GLM = Family(interleaved_rope=True)
GLM4 = Family(interleaved_rope=True, attention_output_norm="post_self_attn_layernorm",
              mlp_output_norm="post_mlp_layernorm")

FAMILIES = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "Phi3ForCausalLM": LLAMA,
    "SmolLM3ForCausalLM": LLAMA,  # every 4th layer without rope (no_rope_layers)
    "GemmaForCausalLM": GEMMA1,
    "Gemma2ForCausalLM": GEMMA,
    "Gemma3ForCausalLM": GEMMA,
    "GlmForCausalLM": GLM,
    "Glm4ForCausalLM": GLM4,
}
#: vision-language models whose text decoder runs alone (text in, text out): the decoder's
#: architecture, and where its weights sit in a checkpoint (transformers 5's names, then the
#: Hub's older ones) for the runner's names ``model.*`` and ``lm_head.*``
LANGUAGE_MODELS = {
    "Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", {
        "model.": ("model.language_model.", "language_model.model."),
        "lm_head.": ("lm_head.", "language_model.lm_head."),
    }),
}
SUPPORTED_ARCHITECTURES = (*FAMILIES, *LANGUAGE_MODELS)
#: rope types whose frequencies are fixed at load (HF computes them; we read them)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def architecture_of(config: Any) -> str:
    """The config's ``architectures`` entry, or (a config made in code) transformers' causal-LM
    class for its type."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return architectures[0]
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return model_class.__name__ if model_class is not None else type(config).__name__.removesuffix("Config")


def family_of(config: Any) -> Family:
    return FAMILIES[architecture_of(config)]


def activation_name(config: Any) -> str:
    return getattr(config, "hidden_activation", None) or config.hidden_act


def language_model(config: Any, weights: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
    """The text decoder of a vision-language model in :data:`LANGUAGE_MODELS` (its config, and its
    weights under the runner's names; the vision tower's are never read); any other model as it is."""
    entry = LANGUAGE_MODELS.get(architecture_of(config))
    if entry is None:
        return config, weights
    decoder, prefixes = entry
    text_config = copy.deepcopy(config.get_text_config())
    text_config.architectures = [decoder]
    text_config.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
    return text_config, RenamedWeights(weights, prefixes)


def check_supported(config: Any, max_model_len: int) -> None:
    """Refuse, by name, what the forward pass would compute wrongly."""
    architecture = architecture_of(config)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"the LLM engine does not support the architecture '{architecture}'; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    config, _ = language_model(config, {})
    activation = activation_name(config)
    if activation not in ACTIVATIONS:
        raise ValueError(f"the LLM engine does not support the activation '{activation}'; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    for rope_type in _rope_types(config):
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"the LLM engine does not support rope type '{rope_type}'; "
                             f"supported: {', '.join(STATIC_ROPE_TYPES)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"the model ({architecture}) uses bidirectional attention (an embedding model); "
                         f"the LLM engine runs causal decoders")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                         f"max_position_embeddings {limit}")


def _rope_types(config: Any) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return ["default"]
    # Gemma 3: one set of parameters per layer type
    sets = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    return [params.get("rope_type", params.get("type", "default")) for params in sets]


def layer_windows(config: Any, max_model_len: int) -> list[int | None]:
    """Each layer's sliding window (a query sees the ``window`` positions up to its own), or None
    for full attention; a window as long as the context changes nothing and is dropped."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3, SmolLM3: the switch
        window = None
    layer_types = getattr(config, "layer_types", None)
    windows = []
    for index in range(config.num_hidden_layers):
        sliding = layer_types is None or layer_types[index] == "sliding_attention"
        windows.append(window if sliding and window is not None and window < max_model_len else None)
    return windows


def rope_tables(config: Any, head_dim: int, length: int,
                interleaved: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], torch.Tensor | None]:
    """The cos/sin tables (float32, ``[length, head_dim]``, sin's first half negated for
    :func:`apply_rope`), which table each layer uses, and the order of a head's q/k dimensions
    that brings the checkpoint's rotary layout to the tables' (None: already the same). A layer
    without rope (SmolLM3's ``no_rope_layers`` 0) gets the identity table (cos 1, sin 0)."""
    rotary_emb = _rotary_embedding_class(config)(config=config)
    layer_types = getattr(rotary_emb, "layer_types", None)
    if isinstance(layer_types, list) and hasattr(rotary_emb, f"{layer_types[0]}_inv_freq"):  # Gemma 3
        kinds = [(getattr(rotary_emb, f"{kind}_inv_freq"), getattr(rotary_emb, f"{kind}_attention_scaling"))
                 for kind in layer_types]
        layer_table = [layer_types.index(kind) for kind in config.layer_types]
    else:
        kinds = [(rotary_emb.inv_freq, getattr(rotary_emb, "attention_scaling", 1.0))]
        layer_table = [0] * config.num_hidden_layers
    tables = []
    for inv_freq, scaling in kinds:
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.detach().float())
        pairs, half = freqs.shape[1], head_dim // 2
        cos, sin = torch.ones(length, head_dim), torch.zeros(length, head_dim)
        cos[:, :pairs] = cos[:, half : half + pairs] = freqs.cos() * float(scaling)
        sin[:, :pairs], sin[:, half : half + pairs] = -freqs.sin() * float(scaling), freqs.sin() * float(scaling)
        tables.append((cos, sin))
    uses_rope = getattr(config, "no_rope_layers", None)
    if uses_rope is not None and not all(uses_rope):
        tables.append((torch.ones(length, head_dim), torch.zeros(length, head_dim)))
        layer_table = [table if rope else len(tables) - 1 for table, rope in zip(layer_table, uses_rope)]
    return tables, layer_table, _head_order(head_dim, 2 * len(kinds[0][0]), interleaved)


def _head_order(head_dim: int, rotary_dim: int, interleaved: bool) -> torch.Tensor | None:
    """Position p of our head layout holds the checkpoint's dimension ``order[p]``: the rotated
    pairs at (i, head_dim/2 + i), the dimensions rope leaves alone in the remaining places."""
    pairs, half = rotary_dim // 2, head_dim // 2
    if rotary_dim == head_dim and not interleaved:
        return None
    if interleaved:
        first, second = torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)
    else:
        first, second = torch.arange(pairs), torch.arange(pairs, rotary_dim)
    passed = torch.arange(rotary_dim, head_dim)
    rest = half - pairs
    return torch.cat((first, passed[:rest], second, passed[rest:]))


def qk_row_order(head_order: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The rows of a q (or k) projection of ``heads`` heads in our head layout."""
    return (torch.arange(heads)[:, None] * head_dim + head_order[None, :]).reshape(-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, with rotate_half's sign folded into ``sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def _rotary_embedding_class(config: Any) -> type:
    """The architecture's own rotary embedding module (it derives the frequencies from the config)."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    module = sys.modules[model_class.__module__]
    return next(value for name, value in vars(module).items() if name.endswith("RotaryEmbedding"))
