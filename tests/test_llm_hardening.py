"""The LLM backend under faults, overload and values at the edge of their range.

The first half drives the engine directly with a tiny random Llama (exact
comparisons with transformers' greedy tokens); the second half a real server
with the real default model (SmolLM2), the official clients, and the engine's
documented, off-by-default fault-injection parameters (``fault_nan_seed``,
``fault_crash_seed``; docs/llm.md) set in a test repository.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import threading
import time
import urllib.request

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEFAULT_REPOSITORY
from serverproc import ServerProcess
from test_llm_engine import PROMPTS, Collector, hf_greedy, submit, tiny_model
from test_llm_server import MODEL, chat_inputs, llm_metrics, parameters, texts

from triserve.backends.llm.engine import (EngineConfig, EngineOverloaded, EngineUnavailable, LLMEngine,
                                          SamplingParams)
from triserve.backends.llm.sampling import SamplingRow, make_generator, sample
from triserve.backends.llm.supervision import RestartPolicy

NAN_SEED, CRASH_SEED = 4242, 4343


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)


@pytest.fixture
def make_engine(model):
    engines: list[LLMEngine] = []

    def make(**settings) -> LLMEngine:
        engine = LLMEngine(model, EngineConfig(**{"max_model_len": 256, **settings}))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def idle(engine: LLMEngine) -> bool:
    stats = engine.stats()
    return stats["running"] == stats["waiting"] == stats["kv_cache_bytes_in_use"] == 0


# --- sampling values at the edge: handled numerically, never an exception --------------------

@pytest.mark.parametrize("values", [
    dict(temperature=1e-40),  # below GREEDY_BELOW: greedy
    dict(temperature=1e-5, top_p=1e-300),  # top_p is 0 in float32: the likeliest token survives
    dict(temperature=0.7, top_k=2**63 - 1),  # beyond the vocabulary: no limit
    dict(temperature=0.7, repetition_penalty=1e-300),  # seen tokens' logits pushed to +-max, not inf
    dict(temperature=1e-30, repetition_penalty=100.0, top_p=1e-300, top_k=1),
], ids=["tiny-temperature", "tiny-top-p", "huge-top-k", "tiny-penalty", "all-at-once"])
def test_edge_values_sample_a_token_in_the_vocabulary(values):
    torch.manual_seed(0)
    logits = torch.randn(3, 64) * 30
    rows = [SamplingRow(SamplingParams(max_new_tokens=1, seed=i, **values), make_generator(i), [1, 2, 3, 7])
            for i in range(3)]
    tokens = sample(logits.clone(), rows)
    assert all(isinstance(t, int) and 0 <= t < 64 for t in tokens), tokens
    if values.get("repetition_penalty", 1.0) == 1.0 and (values.get("top_p") or values["temperature"] < 1e-5):
        assert tokens == logits.argmax(dim=-1).tolist()  # the limit of those values is greedy


def test_a_nan_row_fails_alone():
    logits = torch.randn(3, 64)
    logits[1] = float("nan")
    rows = [SamplingRow(SamplingParams(max_new_tokens=1, temperature=t), make_generator(0), [1])
            for t in (0.0, 0.9, 0.9)]
    first, broken, third = sample(logits, rows)
    assert isinstance(broken, ArithmeticError) and "NaN" in str(broken)
    assert first == int(logits[0].argmax()) and isinstance(third, int)


def test_edge_values_through_the_engine_equal_greedy(model, make_engine):
    engine = make_engine(max_num_seqs=4)
    edge = [submit(engine, "t", PROMPTS[0], temperature=1e-40),
            submit(engine, "p", PROMPTS[1], temperature=1e-6, top_p=1e-300),
            submit(engine, "k", PROMPTS[2], top_k=2**63 - 1)]
    penalty = submit(engine, "r", PROMPTS[3], temperature=0.5, repetition_penalty=1e-300)
    for prompt, collector in zip(PROMPTS, edge):
        assert collector.final.finish_reason == "length" and collector.tokens == hf_greedy(model, prompt, 12)
    assert penalty.final.finish_reason == "length" and len(penalty.tokens) == 12


# --- one bad request never hurts another --------------------------------------------------------

def test_a_failing_row_fails_only_its_request(model, make_engine):
    """Four requests prefilled and decoded together; one gets NaN logits (the fault-injection
    parameter): it alone fails, naming the fault, the others equal transformers' greedy reply."""
    engine = make_engine(max_num_seqs=4, fault_nan_seed=NAN_SEED)
    good = [submit(engine, f"good{i}", PROMPTS[i], max_new_tokens=20, seed=i) for i in range(3)]
    bad = submit(engine, "bad", PROMPTS[3], max_new_tokens=20, seed=NAN_SEED)
    assert bad.final.finish_reason == "abort" and "NaN logits" in bad.final.error
    assert not bad.final.engine_fault
    for prompt, collector in zip(PROMPTS, good):
        assert collector.final.finish_reason == "length" and collector.final.error is None
        assert collector.tokens == hf_greedy(model, prompt, 20)
    # and a bad request joining running ones mid-generation
    running = submit(engine, "running", PROMPTS[4], max_new_tokens=60)
    assert running.first_token.wait(60)
    late = submit(engine, "late", PROMPTS[0], seed=NAN_SEED)
    assert late.final.error and running.final.finish_reason == "length"
    assert running.tokens == hf_greedy(model, PROMPTS[4], 60)
    assert idle(engine) and engine.stats()["engine_restarts_total"] == 0


# --- supervision --------------------------------------------------------------------------------

def test_a_fault_escaping_the_loop_fails_everything_in_flight_and_the_engine_restarts(model, make_engine):
    engine = make_engine(max_num_seqs=2, fault_crash_seed=CRASH_SEED)
    running = submit(engine, "running", PROMPTS[0], max_new_tokens=200)
    other = submit(engine, "other", PROMPTS[1], max_new_tokens=200)
    assert running.first_token.wait(60) and other.first_token.wait(60)
    crash = submit(engine, "crash", PROMPTS[3], seed=CRASH_SEED)  # both wait: no free slot
    waiting = submit(engine, "waiting", PROMPTS[2], max_new_tokens=5)
    engine.abort("other")  # frees one slot: the crash request is admitted, "waiting" still waits
    assert other.final.finish_reason == "abort" and not other.final.engine_fault
    for collector in (running, crash, waiting):
        final = collector.final
        assert final.finish_reason == "abort" and final.engine_fault
        assert "InjectedFault" in final.error and "it restarts" in final.error
    assert len(running.tokens) < 200
    deadline = time.monotonic() + 10
    while not engine.healthy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.healthy and engine.failure is None
    assert engine.stats()["engine_restarts_total"] == 1 and idle(engine)
    after = submit(engine, "after", PROMPTS[4])
    assert after.final.finish_reason == "length" and after.tokens == hf_greedy(model, PROMPTS[4], 12)


def test_an_engine_that_keeps_failing_gives_up_with_the_reason(make_engine):
    engine = make_engine(max_num_seqs=1, fault_crash_seed=CRASH_SEED)
    policy = RestartPolicy()
    for i in range(policy.max_restarts + 1):
        final = submit(engine, f"crash{i}", PROMPTS[0], seed=CRASH_SEED).final
        assert final.engine_fault
    assert "it stopped" in final.error
    assert not engine.healthy
    assert engine.failure.startswith(f"the LLM engine failed {policy.max_restarts + 1} times within 60 s")
    with pytest.raises(EngineUnavailable, match="failed 4 times"):
        submit(engine, "after", PROMPTS[0])


def test_restart_policy_backs_off_and_forgets_old_faults():
    policy = RestartPolicy(max_restarts=2, window_s=10, first_backoff_s=1, max_backoff_s=1.5)
    assert policy.next_backoff(0) == 1 and policy.next_backoff(1) == 1.5
    assert policy.next_backoff(2) is None  # a third fault within 10 s
    assert RestartPolicy(max_restarts=1, window_s=10).next_backoff(0) is not None
    spaced = RestartPolicy(max_restarts=1, window_s=10)
    assert spaced.next_backoff(0) is not None and spaced.next_backoff(20) is not None


# --- bounded queue, memory given back -------------------------------------------------------------

def test_waiting_queue_is_bounded_and_memory_is_given_back(make_engine):
    engine = make_engine(max_num_seqs=1, max_queue_size=2)
    accepted = [submit(engine, f"r{i}", PROMPTS[i], max_new_tokens=40) for i in range(3)]
    with pytest.raises(EngineOverloaded, match="max_queue_size 2"):
        submit(engine, "refused", PROMPTS[3])
    assert engine.stats()["refused_total"] == 1
    engine.abort("r2")  # cancelled while waiting
    assert accepted[2].final.finish_reason == "abort"
    assert accepted[0].first_token.wait(60)
    engine.abort("r0")  # cancelled while running
    assert accepted[0].final.finish_reason == "abort"
    assert accepted[1].final.finish_reason == "length"
    assert idle(engine)
    # every id was released: the same ids are accepted again
    again = [submit(engine, f"r{i}", PROMPTS[i], max_new_tokens=2) for i in range(3)]
    assert all(c.final.finish_reason == "length" for c in again) and idle(engine)


def test_engine_config_bounds():
    assert EngineConfig(max_num_seqs=8).max_queue_size == 32
    with pytest.raises(ValueError, match="max_queue_size must be at least 1"):
        EngineConfig(max_queue_size=0)
