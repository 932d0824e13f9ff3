"""The continuous-batching engine against transformers' own generate().

A tiny randomly initialised LlamaForCausalLM (fixed seed) stands in for the
real chat model: the engine must reproduce HF's greedy tokens exactly, whatever
runs beside a request, whether its prefix came from the cache, and whenever it
joined the batch. The other architectures are in test_llm_architectures.py.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from triserve.backends.llm.engine import EngineConfig, LLMEngine, SamplingParams, StepOutput
from triserve.backends.llm.model_runner import PrefillChunk
from triserve.backends.llm.prefix_cache import PrefixCache

TIMEOUT = 60
PROMPTS = [[1, 2, 3], list(range(5, 40)), [7] * 10, list(range(100, 180)), [9, 8, 7, 6, 5]]


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def tiny_model(model_class: type, config_class: type, **config) -> torch.nn.Module:
    """A randomly initialised model, the same on every run, that generates past any EOS."""
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, **config)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)


@pytest.fixture
def make_engine(model):
    engines: list[LLMEngine] = []

    def make(hf_model: torch.nn.Module = model, **settings) -> LLMEngine:
        engine = LLMEngine(hf_model, EngineConfig(**{"max_model_len": 256, **settings}))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


class Collector:
    """Gathers one request's StepOutputs (delivered on the engine thread)."""

    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []
        self.done = threading.Event()
        self.first_token = threading.Event()

    def __call__(self, output: StepOutput) -> None:
        self.outputs.append(output)
        self.first_token.set()
        if output.finished:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [token for output in self.outputs for token in output.new_token_ids]

    @property
    def final(self) -> StepOutput:
        assert self.done.wait(TIMEOUT), "request did not finish"
        return self.outputs[-1]


class Logged(Collector):
    """A Collector that also records, in one shared list, the order in which requests got outputs."""

    def __init__(self, name: str, events: list[str]) -> None:
        super().__init__()
        self.name = name
        self.events = events

    def __call__(self, output: StepOutput) -> None:
        self.events.append(self.name)
        super().__call__(output)


def submit(engine: LLMEngine, request_id: str, prompt: list[int], **params) -> Collector:
    collector = Collector()
    engine.add_request(request_id, prompt, SamplingParams(**{"max_new_tokens": 12, **params}), collector)
    return collector


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, len(prompt):].tolist()


def test_batched_and_staggered_greedy_equals_hf_generate(model, make_engine):
    engine = make_engine(max_num_seqs=4)
    first = [submit(engine, f"a{i}", prompt, max_new_tokens=20) for i, prompt in enumerate(PROMPTS[:3])]
    assert first[0].first_token.wait(TIMEOUT)
    later = [submit(engine, f"b{i}", prompt, max_new_tokens=20) for i, prompt in enumerate(PROMPTS[3:])]
    for prompt, collector in zip(PROMPTS, first + later):
        assert collector.final.finish_reason == "length"
        assert collector.final.prompt_tokens == len(prompt)
        assert all(len(output.new_token_ids) == 1 for output in collector.outputs)
        assert collector.tokens == hf_greedy(model, prompt, 20)
    stats = engine.stats()
    assert stats["generated_tokens_total"] == 20 * len(PROMPTS)
    assert stats["prompt_tokens_total"] == sum(map(len, PROMPTS))
    assert stats["running"] == stats["waiting"] == stats["kv_cache_bytes_in_use"] == 0


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_decode_step_equals_hf_generate_in_any_slot(model, make_engine):
    """compile: the decode steps run compiled (one graph for a sequence alone, one for batches,
    each serving every length and slot), and every token is still HF's."""
    engine = make_engine(max_num_seqs=4, compile=True)
    assert engine.runner.compiled
    alone = submit(engine, "alone", PROMPTS[1], max_new_tokens=20)
    assert alone.final and alone.tokens == hf_greedy(model, PROMPTS[1], 20)
    assert engine.runner.compiled_steps == 19  # every decode step of a sequence alone
    assert engine.runner.compiled_batch_steps == 0
    together = [submit(engine, f"t{i}", prompt, max_new_tokens=12) for i, prompt in enumerate(PROMPTS[:3])]
    for prompt, collector in zip(PROMPTS, together):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 12)
    assert engine.runner.compiled_batch_steps >= 10  # the three decoded together, compiled

    # slots other than 0 (a sequence decoding alone beside one being prefilled), on a runner
    # of its own: the compiled step's logits are the eager step's
    other = LLMEngine(model, EngineConfig(max_model_len=256, compile=True))
    runner, cache = other.runner, other.kv_cache
    threads = torch.get_num_threads()
    torch.set_num_threads(other.config.threads)  # the compiled kernels' thread count
    try:
        with torch.inference_mode():
            for slot in (2, 3):
                runner.prefill(cache, [PrefillChunk(slot, PROMPTS[1], 0)])
                compiled = runner.decode(cache, [5], [len(PROMPTS[1])], [slot])
                runner.compiled = False
                eager = runner.decode(cache, [5], [len(PROMPTS[1])], [slot])
                runner.compiled = True
                assert torch.allclose(compiled, eager, atol=1e-4)
            # a batch in slots 3 and 2 (out of order, not from 0: the rows gathered), each at its own length
            slots, positions = [3, 2], [len(PROMPTS[1]) + 1, len(PROMPTS[1]) + 2]
            compiled = runner.decode(cache, [7, 9], positions, slots)
            runner.compiled = False
            eager = runner.decode(cache, [7, 9], positions, slots)
            runner.compiled = True
            assert torch.allclose(compiled, eager, atol=1e-4)
        assert runner.compiled_steps == 2 and runner.compiled_batch_steps == 1
        # nothing written outside the slots used, but for position 1 of the compilation's run
        assert not cache.keys[0][1][:, 2:].any() and not cache.keys[0][1][:, 0].any()
    finally:
        torch.set_num_threads(threads)


def test_int4_head_keeps_hf_greedy_tokens(model, make_engine):
    """head_quantization int4: the int4 pass ranks the vocabulary, the likeliest are rescored
    exactly, so greedy tokens stay HF's; the int4 copy of the head is counted in the weights."""
    plain = make_engine(max_num_seqs=2)
    engine = make_engine(max_num_seqs=2, head_quantization="int4")
    collectors = [submit(engine, f"r{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS[:2])]
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 16)
    assert engine.runner.weight_bytes > plain.runner.weight_bytes


def test_int8_ranked_head_keeps_the_greedy_tokens_without_a_copy(make_engine):
    """head_quantization int8 over an int8 head: every row is ranked by torch._int_mm over the
    int8 table itself (no copy), the likeliest tokens rescored exactly: greedy tokens stay the
    int8 head's, alone and batched."""
    plain = make_engine(max_num_seqs=len(PROMPTS), quantization="int8")
    engine = make_engine(max_num_seqs=len(PROMPTS), quantization="int8", head_quantization="int8")
    assert engine.runner.weight_bytes == plain.runner.weight_bytes
    alone, reference = (submit(e, "alone", PROMPTS[3], max_new_tokens=16) for e in (engine, plain))
    assert alone.final and reference.final and alone.tokens == reference.tokens
    expected = [submit(plain, f"p{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS)]
    got = [submit(engine, f"q{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS)]
    for want, have in zip(expected, got):
        assert want.final and have.final and have.tokens == want.tokens
    head = engine.runner.lm_head
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    exact, ranked = head.exact(hidden).float(), head(hidden[:1])
    top = exact[:1].topk(8, dim=-1).indices
    assert torch.allclose(ranked.gather(-1, top), exact[:1].gather(-1, top), atol=0.02)
    # a row's logits, tail included, do not depend on its batch (but for float32 rounding)
    assert torch.allclose(head(hidden)[:1], ranked, rtol=0, atol=1e-5)


def test_int4_head_ranks_a_batch_in_int8_and_keeps_the_greedy_tokens(make_engine):
    """An int8 head with head_quantization int4: a batch of 4+ sequences is ranked in int8 (its
    rows quantized, times the int8 table itself: torch._int_mm), the likeliest tokens rescored
    exactly; greedy tokens stay the int8 head's, and the tail is closer to it than int4's."""
    plain = make_engine(max_num_seqs=len(PROMPTS), quantization="int8")
    engine = make_engine(max_num_seqs=len(PROMPTS), quantization="int8", head_quantization="int4")
    expected = [submit(plain, f"p{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS)]
    got = [submit(engine, f"q{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS)]
    for want, have in zip(expected, got):
        assert want.final and have.final and have.tokens == want.tokens
    head = engine.runner.lm_head
    hidden = torch.randn(len(PROMPTS), 64, generator=torch.Generator().manual_seed(0))
    exact = head.exact(hidden).float()
    in_int8, in_int4 = head(hidden, rank_int8=True), head(hidden, rank_int8=False)
    top = exact.topk(8, dim=-1).indices
    assert torch.allclose(in_int8.gather(-1, top), exact.gather(-1, top), atol=0.02)
    assert (in_int8 - exact).abs().mean() < (in_int4 - exact).abs().mean() / 2


def test_kv_cache_is_reserved_once_from_its_byte_budget(model, make_engine):
    per_sequence = 512 * 2 * 2 * 2 * 16 * 4  # tokens * layers * K/V * kv_heads * head_dim * float32
    engine = make_engine(max_model_len=512, max_num_seqs=8, kv_cache_bytes=3 * per_sequence + 1)
    assert engine.max_slots == 3  # what the budget holds, not max_num_seqs
    reserved = engine.stats()["kv_cache_bytes_reserved"]
    assert reserved == 3 * per_sequence
    short = [submit(engine, f"short{i}", prompt, max_new_tokens=30) for i, prompt in enumerate(PROMPTS)]
    assert short[0].first_token.wait(TIMEOUT)
    long_prompt = [i % 256 for i in range(400)]  # joins the running sequences when a slot frees
    long = submit(engine, "long", long_prompt, max_new_tokens=12)
    assert long.final and long.tokens == hf_greedy(model, long_prompt, 12)
    for prompt, collector in zip(PROMPTS, short):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 30)
    assert engine.stats()["kv_cache_bytes_reserved"] == reserved  # never reallocated
    with pytest.raises(ValueError, match="does not hold one sequence of max_model_len 512"):
        LLMEngine(model, EngineConfig(max_model_len=512, kv_cache_bytes=per_sequence - 1))


def test_request_joins_running_batch_before_it_finishes(make_engine):
    engine = make_engine(max_num_seqs=4)
    long = submit(engine, "long", PROMPTS[1], max_new_tokens=150)
    assert long.first_token.wait(TIMEOUT)
    short = submit(engine, "short", PROMPTS[0], max_new_tokens=3)
    assert short.final.finish_reason == "length"
    assert not long.done.is_set(), "the new request waited for the running one to finish"
    assert long.final.finish_reason == "length" and len(long.tokens) == 150


def test_burst_of_requests_is_prefilled_between_decode_steps(model, make_engine):
    """With a prefill budget of one token a step, each newcomer is prefilled in its own step and
    the running sequence gets a token between any two of them; every reply still equals HF's."""
    engine = make_engine(max_num_seqs=4, max_prefill_tokens=1)
    events: list[str] = []
    running = Logged("running", events)
    engine.add_request("running", PROMPTS[0], SamplingParams(max_new_tokens=150), running)
    assert running.first_token.wait(TIMEOUT)
    burst = {f"new{i}": Logged(f"new{i}", events) for i in range(3)}
    for (name, collector), prompt in zip(burst.items(), PROMPTS[1:4]):
        engine.add_request(name, prompt, SamplingParams(max_new_tokens=12), collector)
    for prompt, collector in zip(PROMPTS[1:4], burst.values()):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 12)
    firsts = sorted(events.index(name) for name in burst)
    for earlier, later in zip(firsts, firsts[1:]):
        assert "running" in events[earlier + 1 : later]
    assert running.final and running.tokens == hf_greedy(model, PROMPTS[0], 150)


def test_long_prompt_is_prefilled_in_chunks_while_the_others_decode(model, make_engine):
    """A 200-token prompt with a 32-token budget per step takes 7 steps, and the running
    sequences get a token at each; one of them finishes meanwhile, so the long prompt's slot
    moves under the others (their decode then gathers their slots). Every reply equals HF's."""
    engine = make_engine(max_num_seqs=4, max_prefill_tokens=32)
    events: list[str] = []
    running = {"a": (PROMPTS[0], 3), "b": (PROMPTS[2], 60), "d": (PROMPTS[4], 60)}
    collectors = {name: Logged(name, events) for name in [*running, "long"]}
    for name, (prompt, count) in running.items():
        engine.add_request(name, prompt, SamplingParams(max_new_tokens=count), collectors[name])
    for name in running:
        assert collectors[name].first_token.wait(TIMEOUT)
    long_prompt = [(7 * i) % 256 for i in range(200)]
    submitted = len(events)
    engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=12), collectors["long"])
    assert collectors["long"].final and collectors["long"].tokens == hf_greedy(model, long_prompt, 12)
    for name, (prompt, count) in running.items():
        assert collectors[name].final and collectors[name].tokens == hf_greedy(model, prompt, count)
    before_first = events[submitted : events.index("long")]
    assert before_first.count("b") >= 6 and before_first.count("d") >= 6  # a token per chunk step


def test_next_turn_reuses_cached_prefix_and_matches_uncached_run(model, make_engine):
    engine = make_engine(max_num_seqs=2)
    turn1 = submit(engine, "turn1", PROMPTS[1], max_new_tokens=10)
    assert turn1.final.cached_tokens == 0
    conversation = PROMPTS[1] + turn1.tokens + [11, 12, 13]
    turn2 = submit(engine, "turn2", conversation, max_new_tokens=10)
    # the first turn's prompt and all its reply but the last token (never fed back) have KV
    assert turn2.final.cached_tokens == len(PROMPTS[1]) + 10 - 1
    assert turn2.tokens == hf_greedy(model, conversation, 10)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_queries"] == 2

    uncached = make_engine(max_num_seqs=2, prefix_cache_bytes=0)
    again = submit(uncached, "turn2", conversation, max_new_tokens=10)
    assert again.final.cached_tokens == 0 and again.tokens == turn2.tokens


def test_identical_prompt_still_computes_its_last_token(model, make_engine):
    engine = make_engine()
    submit(engine, "first", PROMPTS[3]).final
    repeat = submit(engine, "repeat", PROMPTS[3])
    assert repeat.final.cached_tokens == len(PROMPTS[3]) - 1
    assert repeat.tokens == hf_greedy(model, PROMPTS[3], 12)


def test_abort_frees_the_slot_for_a_queued_request(make_engine):
    engine = make_engine(max_num_seqs=1)
    running = submit(engine, "running", PROMPTS[0], max_new_tokens=200)
    assert running.first_token.wait(TIMEOUT)
    queued = submit(engine, "queued", PROMPTS[2], max_new_tokens=5)
    assert engine.stats()["waiting"] == 1
    engine.abort("running")
    assert running.final.finish_reason == "abort" and running.final.new_token_ids == []
    assert len(running.tokens) < 200
    assert queued.final.finish_reason == "length" and len(queued.tokens) == 5


def test_abort_of_a_waiting_request(make_engine):
    engine = make_engine(max_num_seqs=1)
    running = submit(engine, "running", PROMPTS[0], max_new_tokens=200)
    queued = submit(engine, "queued", PROMPTS[2])
    engine.abort("queued")
    assert queued.final.finish_reason == "abort" and queued.tokens == []
    assert running.final.finish_reason == "length"


def test_stop_aborts_running_requests_without_caching_their_kv(make_engine):
    engine = make_engine(max_num_seqs=1)
    running = submit(engine, "running", PROMPTS[1], max_new_tokens=200)
    assert running.first_token.wait(TIMEOUT)
    engine.stop()
    assert running.final.finish_reason == "abort"
    assert engine.stats()["prefix_cache_entries"] == 0


def test_stop_token_ends_the_sequence_and_is_not_returned(model, make_engine):
    expected = hf_greedy(model, PROMPTS[4], 12)
    stop = expected[5]
    engine = make_engine()
    collector = submit(engine, "stop", PROMPTS[4], stop_token_ids=frozenset({stop}))
    assert collector.final.finish_reason == "stop"
    assert collector.tokens == expected[: expected.index(stop)]


def test_context_full_finishes_with_length(make_engine):
    engine = make_engine(max_model_len=40)
    collector = submit(engine, "full", PROMPTS[1], max_new_tokens=100)
    assert collector.final.finish_reason == "length"
    assert len(PROMPTS[1]) + len(collector.tokens) == 40


def test_bad_requests_raise_with_the_reason(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match="prompt has 64 tokens.*context length is 64"):
        submit(engine, "long", list(range(64)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        submit(engine, "vocab", [1, 999])
    with pytest.raises(ValueError, match="no tokens"):
        submit(engine, "empty", [])
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(max_new_tokens=5, top_p=0.0)
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        SamplingParams(max_new_tokens=5, seed=2**64)
    running = submit(engine, "same-id", PROMPTS[0], max_new_tokens=100)
    with pytest.raises(ValueError, match="already in the engine"):
        submit(engine, "same-id", PROMPTS[0])
    assert running.final.finish_reason == "length"  # the engine kept serving


def test_unsupported_models_are_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel'"):
        LLMEngine(gpt2, EngineConfig(max_model_len=64))
    dynamic = tiny_model(LlamaForCausalLM, LlamaConfig,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        LLMEngine(dynamic, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="exceeds the model.s max_position_embeddings 512"):
        LLMEngine(tiny_model(LlamaForCausalLM, LlamaConfig), EngineConfig(max_model_len=1024))


def test_seeded_sampling_is_reproducible_alone_or_batched(make_engine):
    engine = make_engine()
    params = dict(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, max_new_tokens=16)
    alone = submit(engine, "alone", PROMPTS[1], seed=7, **params)
    alone.final
    batch = [submit(engine, f"batch{i}", PROMPTS[1], seed=7 + i, **params) for i in range(3)]
    assert batch[0].final and batch[0].tokens == alone.tokens
    assert any(c.final and c.tokens != alone.tokens for c in batch[1:])


def test_prefix_cache_eviction_keeps_its_byte_bound(make_engine):
    per_entry = 2 * 2 * 2 * 16 * 4 * 30  # layers * K/V * kv_heads * head_dim * float32 * ~30 tokens
    bound = 2 * per_entry
    engine = make_engine(prefix_cache_bytes=bound)
    for i in range(6):
        submit(engine, f"r{i}", [i + 1] * 20, max_new_tokens=10).final
        assert engine.stats()["prefix_cache_bytes"] <= bound
    stats = engine.stats()
    assert 0 < stats["prefix_cache_entries"] < 6


def test_prefix_cache_prefers_longest_match_and_recency():
    kv = lambda length: torch.zeros(1, 2, 1, length, 1)  # noqa: E731
    cache = PrefixCache(max_bytes=(10 + 5) * 2 * 4)  # room for the 10- and 5-token entries
    cache.insert([1, 2, 3], kv(3))
    cache.insert([1, 2, 3, 4, 5], kv(5))  # extends the first: replaces it
    assert len(cache) == 1
    cache.insert([7, 8], kv(2))
    assert cache.lookup([1, 2, 3, 4, 9], max_length=4).length == 4
    cache.insert([5] * 10, kv(10))  # over the bound: the least recently used ([7, 8]) goes first
    assert cache.lookup([7, 8, 1], max_length=2) is None
    assert cache.bytes <= cache.max_bytes


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "int4")])
def test_reduced_precision_engines_generate(make_engine, dtype, quantization):
    engine = make_engine(dtype=dtype, quantization=quantization)
    collector = submit(engine, "r", PROMPTS[1])
    assert collector.final.finish_reason == "length" and len(collector.tokens) == 12


def test_device_parameter_is_checked_at_load():
    from triserve.backends.llm.loader import resolve_device

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_device("auto") == ("cuda:0" if gpus else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=f"'cuda:{gpus}' is not available"):
        resolve_device(f"cuda:{gpus}")
    with pytest.raises(ValueError, match="'gpu' is not one of cpu, cuda, cuda:N, auto"):
        resolve_device("gpu")


def test_quantized_weights_are_refused_on_a_gpu_by_reason(model):
    """The int4/int8 kernels are CPU ones: asking for them on a GPU fails at load, before any GPU work."""
    with pytest.raises(ValueError, match="quantized weights run on torch's CPU kernels only"):
        LLMEngine(model, EngineConfig(max_model_len=64, quantization="int8", device="cuda:0"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path runs where torch sees one")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_a_gpu_equals_hf_generate(model, make_engine, dtype):
    engine = make_engine(device="cuda:0", dtype=dtype, max_num_seqs=4)
    collectors = [submit(engine, f"g{i}", prompt, max_new_tokens=16) for i, prompt in enumerate(PROMPTS[:3])]
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.final.finish_reason == "length"
        if dtype == "float32":
            assert collector.tokens == hf_greedy(model, prompt, 16)


def test_sampling_draws_the_same_token_whatever_else_is_in_the_batch():
    """Top-k rows use topk over the batch's largest k, or a full sort when another row needs one;
    probabilities are normalised over the whole vocabulary either way, so a seeded row's draws do
    not depend on its neighbours."""
    from triserve.backends.llm.sampling import SamplingRow, make_generator, sample

    torch.manual_seed(0)
    logits = torch.randn(40, 1000) * 3
    mine = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=50, top_p=0.95, seed=1)
    neighbours = [SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.5, seed=2),  # full sort
                  SamplingParams(max_new_tokens=1, temperature=1.0, top_k=5, seed=3)]  # topk(50)
    alone, beside = [], {i: [] for i in range(len(neighbours))}
    row = SamplingRow(mine, make_generator(1), [])
    rows_beside = {i: (SamplingRow(mine, make_generator(1), []), SamplingRow(p, make_generator(9), []))
                   for i, p in enumerate(neighbours)}
    for step in range(40):
        alone.append(sample(logits[step : step + 1].clone(), [row])[0])
        for i, pair in rows_beside.items():
            beside[i].append(sample(logits[step : step + 1].repeat(2, 1), list(pair))[0])
    assert all(tokens == alone for tokens in beside.values())
    assert len(set(alone)) > 5  # it does sample
    top50 = set(torch.topk(logits, 50, dim=-1).indices.flatten().tolist())
    assert set(alone) <= top50
    greedy_like = SamplingRow(SamplingParams(max_new_tokens=1, temperature=1.0, top_k=1), make_generator(0), [])
    assert sample(logits[:5].clone(), [greedy_like] * 5) == logits[:5].argmax(-1).tolist()
