"""triserve's int4 x int8 and int8 x int8 kernels (triserve/backends/llm/kernels, AVX-512 VNNI):
what they compute, exactly, and the engine on them.

The kernels quantize each row of activations to int8 in blocks of 32 (one scale per block, as
llama.cpp does) and multiply the weights as stored by them in integer dot products. So they are
checked against that definition computed here in float64 (to float32 rounding), against the
unquantized product (the cost of the int8 activations), and in the engine: compiled, eager,
batched. The end-to-end engine tests of test_llm_quantization (checkpoints quantized to int8 and
int4, GGUF Q4_0 / Q4_1 / Q8_0 files) run on both torch's kernels and these.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from triserve.backends.llm import kernels
from triserve.backends.llm.engine import EngineConfig, LLMEngine
from triserve.backends.llm.loader import LLMSettings
from triserve.backends.llm.model_runner import PrefillChunk
from triserve.backends.llm.quantization import Int4Linear, Int4Weight, Int8Linear, Int8Weight, resolve_cpu_kernels
from triserve.core.config import parse_config

WHY_NOT = kernels.load()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"the VNNI kernel cannot run here: {WHY_NOT}")


def weight(out: int = 96, inputs: int = 128, seed: int = 0, kind: type = Int4Weight) -> Int4Weight | Int8Weight:
    torch.manual_seed(seed)
    return kind.quantize(torch.randn(out, inputs))


def linear(kind: str, out: int = 96, inputs: int = 128) -> tuple[Int4Linear | Int8Linear, Int4Weight | Int8Weight]:
    """The VNNI kernel's linear of a random weight: ``kind`` int4 or int8."""
    held = weight(out, inputs, kind=Int4Weight if kind == "int4" else Int8Weight)
    return (Int4Linear if kind == "int4" else Int8Linear)(held, None, torch.float32, kernel="vnni"), held


def defined_product(x: torch.Tensor, w: Int4Weight | Int8Weight) -> torch.Tensor:
    """What the kernels are defined to compute, in float64: x's blocks of 32 rounded to int8 (scale
    max|x| / 127, ties to even), times the weights as held: int4 q * scale + min with scale and min
    as float16, int8 q * the row's scale."""
    rows, inputs = x.shape
    blocks = x.float().reshape(rows, inputs // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    quantized = torch.round(blocks * inverse)  # float32 product, as the kernel's
    activations = (quantized.double() * (amax.double() / 127)).reshape(rows, inputs)
    if isinstance(w, Int8Weight):
        return activations @ (w.q.double() * w.scales.double()[:, None]).T
    scales = w.scales.half().double().repeat_interleave(32, dim=1)
    mins = (w.zeros - 8 * w.scales).half().double().repeat_interleave(32, dim=1)
    return activations @ (w.q.double() * scales + mins).T


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_the_kernel_computes_its_definition_for_any_number_of_rows(kind):
    layer, w = linear(kind)
    assert layer.kernel == "vnni"
    for rows in (1, 2, 3, 4, 5, 8, 9, 17, 33):
        x = torch.randn(rows, 128)
        got = layer(x).double()
        want = defined_product(x, w)
        assert got.shape == (rows, 96)
        assert ((got - want).norm() / want.norm()).item() < 1e-5, rows
        halves = x.bfloat16()  # the engine's activations: read as they are, no float32 copy
        got, want = layer(halves).double(), defined_product(halves.float(), w)
        assert ((got - want).norm() / want.norm()).item() < 1e-5, rows
    assert layer(torch.randn(0, 128)).shape == (0, 96)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_int8_activations_cost_under_one_percent_of_the_product(kind):
    """Against the dequantized weight times the activations as they are (measured: 0.5%)."""
    layer, w = linear(kind, out=256, inputs=576)
    x = torch.randn(7, 576)
    exact = F.linear(x, w.dequantize())
    assert ((layer(x) - exact).norm() / exact.norm()).item() < 0.01
    torch_kind = (Int4Linear if kind == "int4" else Int8Linear)(w, None, torch.float32, kernel="torch")
    assert ((torch_kind(x) - exact).norm() / exact.norm()).item() < 0.01  # bfloat16 activations


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_row_does_not_depend_on_its_neighbours(kind):
    """Each row is quantized and summed on its own: a sequence's logits are the same alone or in any
    batch (what lets a seeded sequence share a step), bit for bit."""
    layer, _ = linear(kind)
    batch = torch.randn(11, 128)
    together = layer(batch)
    for index in range(11):
        assert torch.equal(layer(batch[index:index + 1])[0], together[index])
    assert torch.equal(layer(batch[2:6]), together[2:6])


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_nan_or_inf_in_a_row_reaches_that_rows_output_only(kind):
    """The engine reports a sequence whose logits are not finite: the kernel must not turn a NaN in
    the activations into a finite number (int8 cannot hold it), nor spread it to other rows."""
    layer, _ = linear(kind)
    x = torch.randn(3, 128)
    x[1, 77] = float("nan")
    x[2, 5] = float("inf")
    out = layer(x)
    assert out[0].isfinite().all() and out[1].isnan().all() and not out[2].isfinite().any()


def test_inputs_of_any_layout_and_dtype_and_the_bias():
    w = weight()
    bias = torch.randn(96)
    linear = Int4Linear(w, bias, torch.bfloat16, kernel="vnni")
    x = torch.randn(128, 5).t()  # not contiguous
    got = linear(x)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 96)
    want = (defined_product(x.contiguous(), w) + bias.double()).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    three_d = linear(x.contiguous().reshape(5, 1, 128))  # [batch, tokens, hidden]
    assert three_d.shape == (5, 1, 96) and torch.equal(three_d[:, 0], got)


def test_the_packed_weight_is_as_small_as_torchs_and_bad_shapes_are_refused():
    w = weight(out=256, inputs=128)
    vnni = Int4Linear(w, None, torch.bfloat16, kernel="vnni")
    assert vnni.weight.dtype == torch.uint8
    assert vnni.nbytes == Int4Linear(w, None, torch.bfloat16, kernel="torch").nbytes  # 5 bits a weight
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.triserve.int4_vnni_linear(torch.randn(1, 100), vnni.weight, 256)
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.triserve.int4_vnni_linear(torch.randn(1, 128), vnni.weight[:-1].contiguous(), 256)


def test_cpu_kernels_choice(tmp_path):
    assert resolve_cpu_kernels("auto") == "vnni"  # this machine has AVX-512 VNNI
    assert resolve_cpu_kernels("vnni") == "vnni"
    assert resolve_cpu_kernels("torch") == "torch"
    with pytest.raises(ValueError, match="unknown cpu_kernels 'fast'; expected one of auto, vnni, torch"):
        resolve_cpu_kernels("fast")
    with pytest.raises(ValueError, match="unknown cpu_kernels 'avx'"):
        EngineConfig(cpu_kernels="avx")
    config = parse_config('name: "m"\nbackend: "llm"\nparameters: { key: "model", value: { string_value: "m.gguf" } }\n'
                          'parameters: { key: "cpu_kernels", value: { string_value: "torch" } }\n', "config.pbtxt")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert LLMSettings.from_config(config, tmp_path).engine.cpu_kernels == "torch"


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_the_compiled_step_calls_the_kernel_and_equals_the_eager_step(model):
    """torch.compile traces the kernel as an operator of its own (no graph break): the compiled batch-1
    and batch steps give the eager steps' logits, and every projection runs on the kernel."""
    engine = LLMEngine(model, EngineConfig(max_model_len=128, quantization="int4", compile=True))
    runner, cache = engine.runner, engine.kv_cache
    assert runner.compiled
    linears = [layer.qkv_proj for layer in runner.layers] + [layer.down_proj for layer in runner.layers]
    assert all(isinstance(linear, Int4Linear) and linear.kernel == "vnni" for linear in linears)
    prompt = list(range(3, 30))
    threads = torch.get_num_threads()
    torch.set_num_threads(engine.config.threads)
    try:
        with torch.inference_mode():
            runner.prefill(cache, [PrefillChunk(0, prompt, 0), PrefillChunk(1, prompt[:20], 0)])
            for slots, tokens, positions in (([0], [5], [len(prompt)]), ([0, 1], [6, 7], [len(prompt) + 1, 20])):
                compiled = runner.decode(cache, tokens, positions, slots)
                runner.compiled = False
                eager = runner.decode(cache, tokens, positions, slots)
                runner.compiled = True
                torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
        assert runner.compiled_steps == 1 and runner.compiled_batch_steps == 1
    finally:
        torch.set_num_threads(threads)


def test_without_a_compiler_auto_keeps_torchs_kernel_and_vnni_is_refused(tmp_path):
    """A machine that cannot build the kernel (here: no C++ compiler) serves int4 on torch's kernel
    with ``auto``, and refuses ``vnni`` with the reason; in a fresh process with an empty build cache."""
    script = (
        "from triserve.backends.llm.quantization import resolve_cpu_kernels\n"
        "print(resolve_cpu_kernels('auto'))\n"
        "try:\n    resolve_cpu_kernels('vnni')\nexcept ValueError as error:\n    print(error)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TRISERVE_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "torch", "cpu_kernels vnni cannot run here: it could not be built (the server log says why); "
                 "use cpu_kernels auto or torch"]
    assert "could not be built" in result.stderr  # the log names the failure


def test_two_compiled_models_in_one_process_keep_their_own_graphs():
    """The compiled steps skip torch.compile's guards on the runner's own weights and sizes (a cost
    per step); each runner compiles a code object of its own, so a second model whose step inputs
    look the same (same KV heads and head size: same cache shapes), but whose sizes and weights
    differ, never runs the first model's graph; nor does the first's batch range (2-4 sequences)
    constrain the second's (2-16)."""
    engines = []
    for seed, intermediate, slots in ((1, 256, 4), (2, 512, 16)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True)
        engines.append(LLMEngine(LlamaForCausalLM(config).eval(),
                                 EngineConfig(max_model_len=128, quantization="int4", compile=True,
                                              max_num_seqs=slots)))
    threads = torch.get_num_threads()
    torch.set_num_threads(engines[0].config.threads)
    try:
        with torch.inference_mode():
            logits = []
            for engine in engines:
                runner, cache = engine.runner, engine.kv_cache
                batch = cache.slots  # 4, then 16: each runner's whole batch range
                runner.prefill(cache, [PrefillChunk(slot, list(range(3, 30)), 0) for slot in range(batch)])
                for tokens in ([5], [5] * batch):
                    compiled = runner.decode(cache, tokens, [27] * len(tokens), list(range(len(tokens))))
                    runner.compiled = False
                    eager = runner.decode(cache, tokens, [27] * len(tokens), list(range(len(tokens))))
                    runner.compiled = True
                    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
                assert runner.compiled_steps == 1 and runner.compiled_batch_steps == 1
                logits.append(compiled[0])
            assert not torch.allclose(logits[0], logits[1])  # two models, two answers
    finally:
        torch.set_num_threads(threads)
