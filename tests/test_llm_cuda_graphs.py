"""The decode step as CUDA graphs: the padded, static-shape step they record, and the engine
replaying them on a GPU.

The padded step is a pure function of tensors that runs on any device, so the CPU proves it
computes what the eager decode computes (a batch in arbitrary slots at different lengths,
padded with rows that write only the scratch slot). Capture and replay need a GPU: those tests
run where torch sees one.
"""

from __future__ import annotations

import time

import pytest
import torch

from test_llm_architectures import random_model
from test_llm_engine import PROMPTS, hf_greedy, make_engine, model, submit  # noqa: F401 (fixtures)
from triserve.backends.llm.cuda_graphs import batch_sizes, padded_inputs
from triserve.backends.llm.engine import EngineConfig, _kv_slots
from triserve.backends.llm.model_runner import ModelRunner, PrefillChunk
from triserve.backends.llm.weights import ModelSource

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA device: CUDA graphs are captured where torch sees one")


def test_padded_batch_sizes_cover_every_batch_up_to_the_slots():
    assert batch_sizes(1) == [1]
    assert batch_sizes(4) == [1, 2, 4]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("name", ["llama", "gemma2"])  # gemma2: sliding windows and soft-capped attention
def test_padded_step_equals_the_eager_decode_and_padding_writes_only_the_scratch_slot(model, name):
    hf_model = model if name == "llama" else random_model(name)
    source = ModelSource.from_hf_model(hf_model)
    with torch.inference_mode():
        runner = ModelRunner(source.config, source.weights, max_model_len=64)
        eager_cache = runner.new_kv_cache(4, spare_slots=1)
        assert eager_cache.scratch_slot == 4 and eager_cache.keys[0].shape[0] == 5
        # three sequences in slots 3, 0, 2 (slot 1 empty), of 3, 35 and 20 tokens (beyond the window of 10)
        slots, prompts = [3, 0, 2], [PROMPTS[0], PROMPTS[1], [(7 * i) % 256 for i in range(20)]]
        runner.prefill(eager_cache, [PrefillChunk(slot, prompt, 0) for slot, prompt in zip(slots, prompts)])
        padded_cache = runner.new_kv_cache(4, spare_slots=1)
        for source_tensor, target in zip(eager_cache.keys + eager_cache.values,
                                         padded_cache.keys + padded_cache.values):
            target.copy_(source_tensor)
        before = [tensor.clone() for tensor in padded_cache.keys + padded_cache.values]
        tokens, positions = [11, 12, 13], [len(prompt) for prompt in prompts]

        eager = runner.decode(eager_cache, tokens, positions, slots, compiled=False)
        # padded to 8 rows: five padding rows at position 0 of the scratch slot
        token_ids, position_ids, rows = padded_inputs(tokens, positions, slots, 8, padded_cache.scratch_slot)
        token_ids[3:] = 5  # a token whose K/V are not zero (a pad token's embedding may be), to see them land
        padded = runner.decode_padded(padded_cache.keys, padded_cache.values, token_ids, position_ids, rows)

    assert padded.shape == (8, runner.vocab_size) and padded.dtype == torch.float32
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    assert padded[:3].argmax(-1).tolist() == eager.argmax(-1).tolist()
    for old, new, reference in zip(before, padded_cache.keys + padded_cache.values,
                                   eager_cache.keys + eager_cache.values):
        written = torch.zeros(new.shape[0], new.shape[2], dtype=torch.bool)  # [slot, position]
        for slot, position in zip(slots, positions):
            written[slot, position] = True
            torch.testing.assert_close(new[slot, :, position], reference[slot, :, position], rtol=1e-5, atol=1e-5)
        written[padded_cache.scratch_slot] = True
        # every real slot's other positions, and the empty slot 1, are exactly as they were
        unchanged = ~written[:, None, :, None].expand_as(new)
        assert torch.equal(new[unchanged], old[unchanged])
    assert not padded_cache.keys[0][1].any()  # the empty slot stayed empty
    assert padded_cache.keys[0][padded_cache.scratch_slot, :, 0].any()  # the padding rows wrote here


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_padded_step_is_one_graph_of_tensor_operations(model, name):
    """What capture needs, checked on the CPU: torch.compile traces the padded step whole
    (fullgraph: no break for a host read such as ``.item()``, no data-dependent shape such as a
    boolean-mask index) with every shape static, and the traced step computes the same logits."""
    source = ModelSource.from_hf_model(model if name == "llama" else random_model(name))
    with torch.inference_mode():
        runner = ModelRunner(source.config, source.weights, max_model_len=32)
        caches = [runner.new_kv_cache(2, spare_slots=1) for _ in range(2)]
        for cache in caches:
            runner.prefill(cache, [PrefillChunk(1, list(range(1, 14)), 0)])
        token_ids, positions, rows = padded_inputs([5], [13], [1], 2, caches[0].scratch_slot)
        traced = torch.compile(runner.decode_padded, backend="eager", fullgraph=True, dynamic=False)
        logits = traced(caches[0].keys, caches[0].values, token_ids, positions, rows)
        eager = runner.decode_padded(caches[1].keys, caches[1].values, token_ids, positions, rows)
    torch.testing.assert_close(logits, eager)


def test_padded_step_of_one_sequence_at_the_last_position_equals_the_eager_step(model):
    """A sequence alone (the eager step: its slot's views, no mask) at the context's very last
    position, padded to two rows, in slot 1 of 2."""
    source = ModelSource.from_hf_model(model)
    with torch.inference_mode():
        runner = ModelRunner(source.config, source.weights, max_model_len=32)
        caches = [runner.new_kv_cache(2, spare_slots=1) for _ in range(2)]
        prompt = [(5 * i) % 256 for i in range(31)]
        for cache in caches:
            runner.prefill(cache, [PrefillChunk(1, prompt, 0)])
        eager = runner.decode(caches[0], [17], [31], [1], compiled=False)
        token_ids, positions, rows = padded_inputs([17], [31], [1], 2, caches[1].scratch_slot)
        padded = runner.decode_padded(caches[1].keys, caches[1].values, token_ids, positions, rows)
    torch.testing.assert_close(padded[:1], eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].keys[1][1], caches[0].keys[1][1], rtol=1e-5, atol=1e-5)
    assert not caches[1].keys[0][0].any()  # slot 0 held nothing and still holds nothing


def test_the_scratch_slot_comes_out_of_the_kv_budget():
    """With CUDA graphs on a GPU one slot of kv_cache_bytes is the padding rows' scratch slot; the
    budget's error says so. On the CPU no slot is spared."""
    config = EngineConfig(max_model_len=64, kv_cache_bytes=1 << 20, device="cuda:0")
    per_token = (1 << 20) // (64 * 3)  # three sequences fit the budget
    assert _kv_slots(config, per_token, spare_slots=1) == 2
    assert _kv_slots(config, per_token, spare_slots=0) == 3
    with pytest.raises(ValueError, match="beside the CUDA graphs' scratch slot"):
        _kv_slots(config, (1 << 20) // 64, spare_slots=1)
    assert not EngineConfig(device="cpu").uses_cuda_graphs
    assert EngineConfig(device="cuda:0").uses_cuda_graphs
    assert not EngineConfig(device="cuda:0", cuda_graphs=False).uses_cuda_graphs


@needs_gpu
def test_engine_on_a_gpu_replays_graphs_and_equals_hf_generate(model, make_engine):
    engine = make_engine(device="cuda:0", max_num_seqs=6)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 6]
    assert engine.kv_cache.scratch_slot == engine.max_slots
    # five sequences batched (padded to 6), then one alone
    collectors = [submit(engine, f"g{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS)]
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.final.finish_reason == "length"
        assert collector.tokens == hf_greedy(model, prompt, 16)
    replays = engine.stats()["decode_graph_steps_total"]
    assert replays >= 15
    alone = submit(engine, "alone", PROMPTS[1], max_new_tokens=16)
    assert alone.final.finish_reason == "length"
    assert alone.tokens == hf_greedy(model, PROMPTS[1], 16)
    # the first token comes from the prefill, the other 15 are replays
    assert engine.stats()["decode_graph_steps_total"] == replays + 15


@needs_gpu
def test_a_seeded_sequence_on_a_gpu_runs_eager_and_stays_reproducible(make_engine):
    engine = make_engine(device="cuda:0", max_num_seqs=4)
    params = dict(max_new_tokens=12, temperature=1.0, seed=7)
    first = submit(engine, "first", PROMPTS[2], **params)
    assert first.final.finish_reason == "length"
    second = submit(engine, "second", PROMPTS[2], **params)
    assert second.final.finish_reason == "length"
    assert second.tokens == first.tokens
    assert engine.stats()["decode_graph_steps_total"] == 0  # a step holding a seeded sequence never replays a graph
    unseeded = submit(engine, "unseeded", PROMPTS[2], max_new_tokens=12)
    assert unseeded.final.finish_reason == "length"
    assert engine.stats()["decode_graph_steps_total"] == 11


@needs_gpu
def test_cuda_graphs_false_decodes_eagerly_on_a_gpu(model, make_engine):
    engine = make_engine(device="cuda:0", max_num_seqs=4, cuda_graphs=False)
    assert engine.runner.graphs is None and engine.kv_cache.scratch_slot is None
    collector = submit(engine, "eager", PROMPTS[3], max_new_tokens=12)
    assert collector.final.finish_reason == "length"
    assert collector.tokens == hf_greedy(model, PROMPTS[3], 12)
    assert engine.stats()["decode_graph_steps_total"] == 0


@needs_gpu
def test_a_capture_that_fails_on_a_gpu_is_logged_and_the_engine_decodes_eagerly(model, make_engine, monkeypatch,
                                                                                caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused by the test")

    monkeypatch.setattr(torch.cuda, "graph", refuse)  # torch's capture, not ours
    with caplog.at_level("WARNING", logger="triserve.llm.engine"):
        engine = make_engine(device="cuda:0", max_num_seqs=4)
    assert "capturing the decode step as CUDA graphs failed (RuntimeError: capture refused by the test)" in caplog.text
    assert engine.runner.graphs is None
    collectors = [submit(engine, f"e{i}", prompt) for i, prompt in enumerate(PROMPTS[:3])]
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.final.finish_reason == "length"
        assert collector.tokens == hf_greedy(model, prompt, 12)
    assert engine.stats()["decode_graph_steps_total"] == 0


@needs_gpu
def test_after_an_engine_restart_the_graphs_are_captured_again_over_the_new_cache(model, make_engine):
    engine = make_engine(device="cuda:0", max_num_seqs=4, fault_crash_seed=99)
    first_cache = engine.kv_cache
    crash = submit(engine, "crash", PROMPTS[0], seed=99)
    assert crash.final.finish_reason == "abort" and crash.final.engine_fault
    deadline = time.monotonic() + 30
    while not engine.healthy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.healthy and engine.kv_cache is not first_cache
    assert engine.runner.graphs is not None and engine.runner.graphs.cache is engine.kv_cache
    steps = engine.stats()["decode_graph_steps_total"]
    after = submit(engine, "after", PROMPTS[1])
    assert after.final.finish_reason == "length" and after.tokens == hf_greedy(model, PROMPTS[1], 12)
    assert engine.stats()["decode_graph_steps_total"] == steps + 11


def test_engine_on_the_cpu_captures_nothing(make_engine):
    engine = make_engine(max_num_seqs=2)
    assert engine.runner.graphs is None and engine.kv_cache.scratch_slot is None
    assert engine.kv_cache.bytes_reserved == 2 * 256 * engine.kv_cache.bytes_per_token
    assert submit(engine, "cpu", PROMPTS[0]).final.finish_reason == "length"
    assert engine.stats()["decode_graph_steps_total"] == 0


def test_a_failed_capture_leaves_the_eager_step(model):
    """Where capture cannot run (here: a CPU cache handed to the GPU capture), the runner keeps its
    eager step and says why."""
    source = ModelSource.from_hf_model(model)
    with torch.inference_mode():
        runner = ModelRunner(source.config, source.weights, max_model_len=32)
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            runner.capture_decode_graphs(runner.new_kv_cache(2, spare_slots=1))
    assert runner.graphs is None


def test_the_cuda_graphs_parameter_is_read_and_checked(tmp_path):
    from tritonclient.grpc import model_config_pb2

    from triserve.backends.llm.loader import LLMSettings

    def settings(**parameters: str) -> LLMSettings:
        config = model_config_pb2.ModelConfig(name="m")
        for key, value in {"model": str(tmp_path), **parameters}.items():
            config.parameters[key].string_value = value
        return LLMSettings.from_config(config, tmp_path)

    assert settings().engine.cuda_graphs is True
    assert settings(cuda_graphs="False").engine.cuda_graphs is False
    with pytest.raises(ValueError, match="parameter 'cuda_graphs': 'sometimes' is not true or false"):
        settings(cuda_graphs="sometimes")
