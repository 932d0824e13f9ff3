"""Quantized weights stay quantized, and compute what their dequantized weights compute.

Each kind is checked against its own reference: the same model with every
weight replaced by the dequantized form of what the engine holds, run by
transformers in float32. The weight-only kernels compute in bfloat16, so the
logits may differ by bfloat16's rounding of the activations: the tolerance is
``LOGIT_TOLERANCE`` of the logits' range (measured: under a third of it).
GGUF files are written here, in the layout llama.cpp's converter writes
(q/k rows permuted for its rope), with gguf's own quantizer.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from triserve.backends.llm import kernels
from triserve.backends.llm.engine import EngineConfig, LLMEngine
from triserve.backends.llm.gguf_weights import read_gguf_weights
from triserve.backends.llm.model_runner import PrefillChunk
from triserve.backends.llm.quantization import (DenseWeight, Int4Linear, Int4Weight, Int8Linear, Int8Weight,
                                                RescoredHead, quantize)
from triserve.backends.llm.weights import ModelSource

LOGIT_TOLERANCE = 0.02  # of max |logit|: bfloat16 (torch's kernels) or int8 (VNNI kernel) activations
# the quantized kernels, each tested where it runs (triserve's VNNI kernels need AVX-512 VNNI)
CPU_KERNELS = ["torch"] + (["vnni"] if kernels.load() is None else [])
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
PROMPT = list(range(3, 40))
Q = gguf.GGMLQuantizationType


def tiny(model_class=LlamaForCausalLM, config_class=LlamaConfig, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, **config)).eval()
    model.generation_config.eos_token_id = None
    return model


def test_int4_and_int8_linears_equal_their_dequantized_weights():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(5, 64)
    for kind, linear, loss in ((Int4Weight, Int4Linear, 0.15), (Int8Weight, Int8Linear, 0.02)):
        quantized = kind.quantize(weight)
        reference = F.linear(x, quantized.dequantize())
        out = linear(quantized, None, torch.float32)(x)
        assert (out - reference).norm() / reference.norm() < 0.01, kind  # bf16 compute only
        exact = F.linear(x, weight)
        assert (out - exact).norm() / exact.norm() < loss, kind  # the quantization's own loss


def test_int4_keeps_a_quarter_of_the_bytes_and_no_float_copy():
    weight = torch.randn(256, 128)
    linear = Int4Linear(Int4Weight.quantize(weight), None, torch.bfloat16)
    assert linear.weight.dtype == torch.uint8 and linear.weight.numel() == weight.numel() // 2
    assert linear.nbytes < weight.numel() * 2 // 3  # packed nibbles + scales/zeros, well under bf16's


def test_int4_head_ranks_in_int4_and_gives_its_candidates_the_exact_logits():
    torch.manual_seed(0)
    exact = Int8Linear(Int8Weight.quantize(torch.randn(512, 64) * 0.05), None, torch.float32)
    head = RescoredHead(exact, torch.float32, ranking="int4", candidates=16)
    x = torch.randn(3, 64)
    got, want = head(x), exact(x)
    top = got.topk(16).indices
    bound = 0.02 * want.abs().max()  # the exact kernel computes in bfloat16, the rescoring in float32
    assert (got.gather(-1, top) - want.gather(-1, top)).abs().max() <= bound
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() > bound  # the tail keeps the int4 pass's values
    assert head.fast.nbytes < 0.7 * exact.nbytes
    assert head.extra_nbytes == head.fast.nbytes


def test_int8_ranked_head_reads_the_int8_table_itself_and_gives_its_candidates_the_exact_logits():
    torch.manual_seed(0)
    exact = Int8Linear(Int8Weight.quantize(torch.randn(512, 64) * 0.05), None, torch.float32)
    head = RescoredHead(exact, torch.float32, candidates=16)  # ranking int8
    assert head.extra_nbytes == 0 and head.fast is None and head.table is exact.weight  # no copy
    x = torch.randn(3, 64)
    got, want = head(x), exact(x)
    top = got.topk(16).indices
    bound = 0.02 * want.abs().max()
    assert (got.gather(-1, top) - want.gather(-1, top)).abs().max() <= bound
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the tail: int8 rows times the int8 table, much closer to the exact head than int4's
    int4_tail = (RescoredHead(exact, torch.float32, ranking="int4", candidates=16)(x) - want).abs().mean()
    assert (got - want).abs().mean() < int4_tail / 2
    with pytest.raises(ValueError, match="unknown head ranking 'int2'"):
        RescoredHead(exact, torch.float32, ranking="int2")


def dequantized_reference(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """``model`` with every weight replaced by the dequantized form of ``weights`` (what the engine holds)."""
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    for name, weight in weights.items():
        if isinstance(weight, (Int4Weight, Int8Weight)):
            state[name] = weight.dequantize()
        elif isinstance(weight, DenseWeight):
            state[name] = weight.tensor
        else:
            state[name] = weight
    if reference.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict(state)
    return reference


def assert_logits_close(engine: LLMEngine, reference: torch.nn.Module, prompt: list[int], steps: int = 4) -> None:
    """Prefill, then decode ``steps`` tokens fed from the reference's greedy choices."""
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt + [0] * steps])).logits[0]
        tokens = expected[len(prompt) - 1 : len(prompt) - 1 + steps].argmax(-1).tolist()
        expected = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 :]
        got = [engine.runner.prefill(engine.kv_cache, [PrefillChunk(0, prompt, 0)])[0]]
        for step, token in enumerate(tokens[:-1]):
            got.append(engine.runner.decode(engine.kv_cache, [token], [len(prompt) + step])[0])
    got = torch.stack(got)
    bound = LOGIT_TOLERANCE * expected.abs().max()
    assert (got - expected[: len(got)]).abs().max() <= bound


@pytest.mark.parametrize("quantization,cpu_kernels", [(q, k) for q in ("int8", "int4") for k in CPU_KERNELS])
def test_checkpoint_quantization_computes_its_dequantized_model(quantization, cpu_kernels):
    model = tiny(tie_word_embeddings=True)
    engine = LLMEngine(model, EngineConfig(max_model_len=128, quantization=quantization, cpu_kernels=cpu_kernels))
    held = {name: quantize(tensor, quantization) if name.endswith("_proj.weight") else tensor
            for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    held["model.embed_tokens.weight"] = Int8Weight.quantize(held["model.embed_tokens.weight"])
    if quantization == "int4":
        assert all(isinstance(w, Int4Weight) for n, w in held.items() if n.endswith("_proj.weight"))
    assert_logits_close(engine, dequantized_reference(model, held), PROMPT)


def write_gguf(path, model: torch.nn.Module, projection_type: Q, architecture: str = "llama") -> None:
    """``model``'s weights as llama.cpp's converter writes them: projections in
    ``projection_type``, the embedding Q8_0, norms and biases F32, Llama's q/k rows permuted."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            index, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{index}.{names[module]}.{suffix}"
            if architecture == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_attention_heads if "q_proj" in module else config.num_key_value_heads
                data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        if data.ndim == 2:
            kind = Q.Q8_0 if gguf_name == "token_embd.weight" else projection_type
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(data), kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("projection_type", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_are_read_as_stored(tmp_path, projection_type):
    """Q4 blocks become int4 groups exactly; Q8_0 becomes int8 per channel within its rounding."""
    model = tiny(tie_word_embeddings=True)
    path = tmp_path / "model.gguf"
    write_gguf(path, model, projection_type)
    weights = read_gguf_weights(path, 4, 2, "none")
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    stored = reader["blk.0.ffn_up.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type))
    held = weights["model.layers.0.mlp.up_proj.weight"]
    if projection_type == Q.Q8_0:
        assert isinstance(held, Int8Weight)
        assert (held.dequantize() - expected).abs().max() <= held.scales.max() / 2 + 1e-6
    else:
        assert isinstance(held, Int4Weight)
        torch.testing.assert_close(held.dequantize(), expected, rtol=1e-6, atol=1e-6)
    # the q rows come back in HF's order: each differs from the float weight by block rounding only
    q_proj = weights["model.layers.0.self_attn.q_proj.weight"].dequantize()
    original = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert (q_proj - original).abs().max() < 0.25 * original.abs().max()


@pytest.mark.parametrize("projection_type,cpu_kernels", [
    (kind, kernel) for kind in (Q.Q4_0, Q.Q4_1, Q.Q8_0) for kernel in CPU_KERNELS])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_engine_on_a_gguf_computes_its_dequantized_model(tmp_path, projection_type, cpu_kernels, architecture):
    model = tiny(tie_word_embeddings=True) if architecture == "llama" else tiny(
        Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True)
    path = tmp_path / "model.gguf"
    write_gguf(path, model, projection_type, architecture)
    weights = read_gguf_weights(path, 4, 2, "none")
    reference = dequantized_reference(model, weights)
    engine = LLMEngine(ModelSource(model.config, weights, model.generation_config),
                       EngineConfig(max_model_len=128, cpu_kernels=cpu_kernels))
    assert engine.runner.layers[0].gate_up_proj.kernel == cpu_kernels
    assert_logits_close(engine, reference, PROMPT)


def test_gguf_of_an_unsupported_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'"):
        read_gguf_weights(path, 4, 2, "none")
