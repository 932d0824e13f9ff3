"""The LLM backend under faults, overload and values at the edge of their range.

The first half drives the engine directly with a tiny random Llama (exact
comparisons with transformers' greedy tokens); the second half a real server
with the real default model (SmolLM2), the official clients, and the engine's
documented, off-by-default fault-injection parameters (``fault_nan_seed``,
``fault_crash_seed``; docs/llm.md) set in a test repository.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from conftest import DEFAULT_REPOSITORY
from serverproc import ServerProcess
from test_llm_engine import PROMPTS, hf_greedy, make_engine, model, submit  # noqa: F401 (fixtures)
from test_llm_server import MODEL, chat_inputs, llm_metrics, parameters, texts

from triserve.backends.llm.engine import (EngineConfig, EngineOverloaded, EngineUnavailable, LLMEngine,
                                          SamplingParams)
from triserve.backends.llm.sampling import SamplingRow, make_generator, sample
from triserve.backends.llm.supervision import RestartPolicy

NAN_SEED, CRASH_SEED, PREFILL_SEED = 4242, 4343, 4444


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
    assert not bad.final.engine_fault and len(bad.tokens) == 1  # failed in a shared decode step
    for prompt, collector in zip(PROMPTS, good):
        assert collector.final.finish_reason == "length" and collector.final.error is None
        assert collector.tokens == hf_greedy(model, prompt, 20)
    assert idle(engine) and engine.stats()["engine_restarts_total"] == 0


def test_a_prefill_that_fails_for_a_batch_is_retried_one_prompt_at_a_time(model, make_engine, caplog):
    """Three prompts admitted in one step, prefilled together; the prefill raises because of one
    of them (the fault-injection parameter): each is retried alone, only that one fails."""
    engine = make_engine(max_num_seqs=4, fault_prefill_seed=PREFILL_SEED)
    with engine._lock:  # (reentrant) the engine thread sees all three at once: one admission, one prefill
        batch = [submit(engine, "a", PROMPTS[0]), submit(engine, "bad", PROMPTS[1], seed=PREFILL_SEED),
                 submit(engine, "c", PROMPTS[2])]
    assert batch[1].final.finish_reason == "abort" and "InjectedFault" in batch[1].final.error
    assert batch[1].tokens == []
    for index in (0, 2):
        assert batch[index].final.finish_reason == "length"
        assert batch[index].tokens == hf_greedy(model, PROMPTS[index], 12)
    assert idle(engine) and engine.stats()["engine_restarts_total"] == 0
    assert "a prefill of 3 sequences failed; retrying one by one" in caplog.text


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


# --- the real default model through a real server ---------------------------------------------

INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def grpc_client(chat_server):
    with grpcclient.InferenceServerClient(chat_server.grpc_url) as client:
        yield client


def infer_error(client, **values) -> tuple[str, str]:
    prompt = values.pop("prompt", "hi")
    with pytest.raises(grpcclient.InferenceServerException) as caught:
        client.infer(MODEL, chat_inputs(prompt, **values))
    return caught.value.status(), caught.value.message()


@pytest.mark.slow
@pytest.mark.parametrize("values, message", [
    ({"temperature": "-0.5"}, "temperature must be in [0, 100] (0 = greedy), got -0.5"),
    ({"temperature": "101"}, "temperature must be in [0, 100]"),
    ({"temperature": "inf"}, "temperature: 'inf' is not a finite number"),
    ({"temperature": "nan"}, "temperature: 'nan' is not a finite number"),
    ({"top_p": "0"}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": "1.0000001"}, "top_p must be in (0, 1]"),
    ({"top_k": "-1"}, f"top_k must be in [0, {INT64_MAX}] (0 = no limit), got -1"),
    ({"top_k": str(2**63)}, f"top_k must be in [0, {INT64_MAX}] (0 = no limit), got {2**63}"),
    ({"repetition_penalty": "0"}, "repetition_penalty must be in (0, 100] (1 = none), got 0.0"),
    ({"repetition_penalty": "-1"}, "repetition_penalty must be in (0, 100]"),
    ({"repetition_penalty": "1e9"}, "repetition_penalty must be in (0, 100]"),
    ({"seed": "-1"}, f"seed must be in [0, {INT64_MAX}], got -1"),
    ({"seed": str(2**64)}, f"seed must be in [0, {INT64_MAX}], got {2**64}"),
    ({"max_new_tokens": "0"}, "max_new_tokens must be in [1, 2147483647], got 0"),
    ({"max_new_tokens": str(2**40)}, "max_new_tokens must be in [1, 2147483647]"),
    ({"max_token": "-3"}, "max_token must be in [1, 2147483647], got -3"),
    ({"history_len": "-1"}, "history_len must be in [0, 2147483647], got -1"),
    ({"top_k": np.array([2**63], dtype=np.uint64)}, f"top_k must be in [0, {INT64_MAX}]"),
    ({"seed": np.array([1e300], dtype=np.float64)}, f"seed must be in [0, {INT64_MAX}]"),
])
def test_sampling_values_out_of_range_are_invalid_argument_naming_the_range(grpc_client, values, message):
    status, text = infer_error(grpc_client, max_new_tokens=values.pop("max_new_tokens", "2"), **values)
    assert status == "StatusCode.INVALID_ARGUMENT" and message in text, text


#: the issue's report: each made the engine step raise, failing every request batched with it
EDGE_VALUES = [{"temperature": "1e-40"}, {"temperature": "0.8", "top_p": "1e-300"},
               {"temperature": "0.8", "repetition_penalty": "1e-300"}, {"temperature": "0.8", "top_k": str(INT64_MAX)},
               {"temperature": "1e-40", "top_p": "1e-300", "repetition_penalty": "1e-300", "top_k": str(INT64_MAX)}]


@pytest.mark.slow
def test_legal_values_at_the_edge_are_served_and_never_hurt_their_batch(chat_server, grpc_client):
    """The issue's edge values, sent together with ordinary requests: every one is answered."""
    def ask(values: dict) -> grpcclient.InferResult:
        with grpcclient.InferenceServerClient(chat_server.grpc_url) as client:
            return client.infer(MODEL, chat_inputs("Name a fruit.", max_new_tokens="3", **values))

    requests = EDGE_VALUES + [{"temperature": "0"}, {"temperature": "0.7", "seed": "3"}]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(ask, requests))
    for values, result in zip(requests, results):
        assert parameters(result)["finish_reason"] in ("stop", "length"), values
        if "repetition_penalty" not in values:
            # (a penalty of 1e-300 lifts every token already seen to the top, the prompt's
            # end-of-turn token among them, so such a reply may rightly stop at once)
            assert parameters(result)["completion_tokens"] >= 1, values
    greedy = texts(results[-2], "response")[0]
    assert texts(results[0], "response")[0] == greedy  # temperature 1e-40 is greedy
    # the same values through /generate (HTTP) and OpenAI's route: the same chat contract
    for values in EDGE_VALUES[-1:]:
        document = {"prompt": "Name a fruit.", "max_new_tokens": 2, **{k: int(v) if k == "top_k" else float(v) for k, v in values.items()}}
        response = httpx.post(f"{chat_server.base_url}/v2/models/{MODEL}/generate", json=document, timeout=60)
        assert response.status_code == 200, response.text
    response = httpx.post(f"{chat_server.base_url}/v2/models/{MODEL}/generate", timeout=60,
                          json={"prompt": "hi", "max_new_tokens": 4, "top_k": 2**63})
    assert response.status_code == 400 and f"top_k must be in [0, {INT64_MAX}]" in response.json()["error"]
    response = httpx.post(f"{chat_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 1e-40, "top_p": 1e-300, "repetition_penalty": 1e-300})
    assert response.status_code == 200, response.text
    response = httpx.post(f"{chat_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "top_k": 2**63})
    assert response.status_code == 400 and "top_k must be in" in response.json()["error"]["message"]


# --- faults and overload: a server whose repository turns on the fault-injection parameters ----

MAX_NUM_SEQS, MAX_QUEUE_SIZE = 4, 4


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """SmolLM2 with a small engine (4 running + 4 waiting) and both fault parameters set."""
    repository = tmp_path_factory.mktemp("fault_repository")
    (repository / MODEL / "1").mkdir(parents=True)
    config = (DEFAULT_REPOSITORY / MODEL / "config.pbtxt").read_text()
    for key, value in (("max_num_seqs", MAX_NUM_SEQS), ("max_queue_size", MAX_QUEUE_SIZE),
                       ("fault_nan_seed", NAN_SEED), ("fault_crash_seed", CRASH_SEED)):
        config = "\n".join(line for line in config.splitlines() if f'key: "{key}"' not in line)
        config += f'\nparameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}'
    (repository / MODEL / "config.pbtxt").write_text(config + "\n")
    with ServerProcess(repository, ready_timeout=600) as server:
        yield server


class Stream:
    """One gRPC ModelStreamInfer request on its own client: responses and the error, if any."""

    def __init__(self, server, inputs) -> None:
        self.responses: list = []
        self.error: Exception | None = None
        self.first = threading.Event()
        self.done = threading.Event()
        self._client = grpcclient.InferenceServerClient(server.grpc_url)
        self._client.start_stream(callback=self._on_response)
        self._client.async_stream_infer(MODEL, inputs)

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.error = error
            self.done.set()
            return
        self.responses.append(result)
        self.first.set()
        if parameters(result).get("triton_final_response"):
            self.done.set()

    def wait(self, timeout: float = 120) -> "Stream":
        assert self.done.wait(timeout), "the stream got no final response: the request hangs"
        self._client.stop_stream()
        self._client.close()
        return self

    @property
    def text(self) -> str:
        return "".join(texts(r, "response")[0] for r in self.responses if r.as_numpy("response") is not None)


def http_status(url: str) -> int:
    return httpx.get(url, timeout=30).status_code


def wait_model_ready(server, timeout: float = 30) -> None:
    """The model's readiness follows the engine: false while it restarts after a fault."""
    deadline = time.monotonic() + timeout
    while http_status(f"{server.base_url}/v2/models/{MODEL}/ready") != 200:
        assert time.monotonic() < deadline, f"the model is not ready again after {timeout} s"
        time.sleep(0.02)


def running_sequences(server) -> float:
    return llm_metrics(server)["triserve_llm_running_sequences"]


def wait_until_idle(server, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = llm_metrics(server)
        if metrics["triserve_llm_running_sequences"] == metrics["triserve_llm_waiting_sequences"] == 0:
            return metrics
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy after {timeout} s: {llm_metrics(server)}")


@pytest.mark.slow
def test_a_request_failing_inside_a_shared_step_fails_alone(fault_server):
    """Three streams decode; a fourth request joins them and its row turns NaN in the decode
    step they share: it alone gets the error, the three finish their replies."""
    good = [Stream(fault_server, chat_inputs(f"Count from {i} to {i + 30}.", max_new_tokens="24",
                                             stream="true")) for i in range(3)]
    for stream in good:
        assert stream.first.wait(120)
    assert running_sequences(fault_server) == 3
    bad = Stream(fault_server, chat_inputs("Count from 1 to 30.", max_new_tokens="40", stream="true",
                                           seed=str(NAN_SEED))).wait()
    assert bad.error is not None and "NaN logits" in str(bad.error), bad.error
    assert running_sequences(fault_server) >= 1, "the good streams ended before the bad one joined them"
    for stream in good:
        stream.wait()
        assert stream.error is None
        final = parameters(stream.responses[-1])
        assert final["finish_reason"] in ("stop", "length") and final["completion_tokens"] >= 10
        assert stream.text.strip()
    metrics = wait_until_idle(fault_server)
    assert metrics["triserve_llm_kv_cache_bytes_in_use"] == 0
    assert metrics["triserve_llm_engine_restarts_total"] == 0


@pytest.mark.slow
def test_an_engine_fault_fails_every_request_in_flight_at_once_and_the_engine_restarts(fault_server):
    restarts = llm_metrics(fault_server)["triserve_llm_engine_restarts_total"]
    running = [Stream(fault_server, chat_inputs("Write a long story about a dragon.", max_new_tokens="1000",
                                                stream="true")) for _ in range(2)]
    for stream in running:
        assert stream.first.wait(120)
    started = time.monotonic()
    crash = Stream(fault_server, chat_inputs("hi", seed=str(CRASH_SEED), stream="true"))
    for stream in running + [crash]:
        stream.wait()
        assert stream.error is not None, "a request in flight was not ended by the engine fault"
        assert f"model '{MODEL}': the LLM engine failed (InjectedFault" in str(stream.error)
    print(f"in-flight requests failed {time.monotonic() - started:.2f} s after the fault request")
    assert all(len(stream.responses) < 1000 for stream in running)
    # the engine restarted: the model is ready again and the next request is served
    wait_model_ready(fault_server)
    with grpcclient.InferenceServerClient(fault_server.grpc_url) as client:
        result = client.infer(MODEL, chat_inputs("Name a color.", max_new_tokens="4"))
    assert texts(result, "response")[0].strip()
    metrics = wait_until_idle(fault_server)
    assert metrics["triserve_llm_engine_restarts_total"] == restarts + 1
    assert metrics["triserve_llm_kv_cache_bytes_in_use"] == 0
    assert "LLM engine restarts in" in fault_server.log()


def server_rss_mb(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_overload_every_request_is_answered_served_or_refused_at_once(fault_server):
    """400 concurrent requests (HTTP /generate and gRPC) against 4 slots + 4 waiting: each is
    served or refused at once with 503 / UNAVAILABLE naming the queue; health keeps answering."""
    rss_before = server_rss_mb(fault_server)

    health: list[float] = []
    stop = threading.Event()

    def poll_health() -> None:  # its own thread and connection, as a load balancer's probe
        with httpx.Client(base_url=fault_server.base_url, timeout=30) as probe:
            while not stop.is_set():
                started = time.monotonic()
                assert probe.get("/v2/health/ready").status_code == 200
                health.append(time.monotonic() - started)
                time.sleep(0.05)

    async def overload() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=fault_server.base_url, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(
                http.post(f"/v2/models/{MODEL}/generate",
                          json={"prompt": f"Say {i}.", "max_new_tokens": 3}) for i in range(300)))

    poller = threading.Thread(target=poll_health)
    poller.start()
    grpc_results: "queue.Queue" = queue.Queue()
    with grpcclient.InferenceServerClient(fault_server.grpc_url) as client:
        def grpc_burst() -> None:
            for i in range(100):
                client.async_infer(MODEL, chat_inputs(f"Say {i}.", max_new_tokens="3"),
                                   callback=lambda result, error: grpc_results.put(error or result))

        burst = threading.Thread(target=grpc_burst)
        burst.start()
        responses = asyncio.run(overload())
        burst.join()
        grpc_answers = [grpc_results.get(timeout=300) for _ in range(100)]
    stop.set()
    poller.join()

    statuses = [r.status_code for r in responses]
    served, refused = statuses.count(200), statuses.count(503)
    assert served + refused == len(responses), sorted(set(statuses))
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"].startswith(f"Exceeds maximum queue size: model '{MODEL}' is overloaded")
            assert f"max_queue_size {MAX_QUEUE_SIZE}" in response.json()["error"]
    grpc_errors = [a for a in grpc_answers if isinstance(a, Exception)]
    assert all(e.status() == "StatusCode.UNAVAILABLE" and "Exceeds maximum queue size" in e.message()
               for e in grpc_errors), {e.status() for e in grpc_errors}
    assert served + 100 - len(grpc_errors) >= MAX_NUM_SEQS and refused > 0
    rss_after = server_rss_mb(fault_server)
    health.sort()
    print(f"HTTP: {served} served, {refused} refused; gRPC: {100 - len(grpc_errors)} served, "
          f"{len(grpc_errors)} refused; RSS {rss_before:.0f} -> {rss_after:.0f} MB; health checks: "
          f"{len(health)}, p50 {1000 * health[len(health) // 2]:.1f} ms, max {1000 * health[-1]:.1f} ms")
    assert rss_after < rss_before + 400, "server memory grew with the refused requests"
    metrics = wait_until_idle(fault_server)
    assert metrics["triserve_llm_kv_cache_bytes_in_use"] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{fault_server.metrics_port}/metrics", timeout=5) as r:
        rejected = [line for line in r.read().decode().splitlines()
                    if line.startswith("nv_inference_request_failure") and 'reason="REJECTED"' in line
                    and f'model="{MODEL}"' in line]
    assert rejected and float(rejected[0].split()[-1]) >= refused


@pytest.mark.slow
def test_an_engine_that_keeps_failing_stops_taking_requests_with_the_reason(fault_server):
    """Runs last on this server: it leaves the engine given up."""
    with grpcclient.InferenceServerClient(fault_server.grpc_url) as client:
        for _ in range(5):
            wait_model_ready(fault_server)
            status, message = infer_error(client, seed=str(CRASH_SEED))
            assert status == "StatusCode.UNAVAILABLE" and "InjectedFault" in message
            if "it stopped" in message:
                break
        assert "it stopped" in message, message
        status, message = infer_error(client, max_new_tokens="2")
    assert status == "StatusCode.UNAVAILABLE"
    assert f"model '{MODEL}' version 1 is not ready: the LLM engine failed 4 times within 60 s and stopped" \
        in message
    assert "last error: InjectedFault" in message
    # the model is not ready, with the reason, and strict readiness takes the server with it
    assert http_status(f"{fault_server.base_url}/v2/models/{MODEL}/ready") != 200
    assert http_status(f"{fault_server.base_url}/v2/health/ready") != 200
    index = httpx.post(f"{fault_server.base_url}/v2/repository/index", json={}, timeout=30).json()
    [row] = [row for row in index if row["name"] == MODEL]
    assert "the LLM engine failed 4 times within 60 s and stopped" in row.get("reason", ""), row
    assert fault_server.proc.poll() is None and "and stopped; last error" in fault_server.log()
