"""The default chat model (SmolLM2 on the llm backend) through a real server, as clients see it.

Requests use the seed's shape: every input a BYTES tensor, numbers as strings,
the history flattened into [q1, a1, ...], sent with the official tritonclient.
Generation is kept short (max_new_tokens) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import queue
from pathlib import Path
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import DEFAULT_CHAT_MODEL as MODEL

pytestmark = pytest.mark.slow

FINAL = "triton_final_response"


@pytest.fixture(scope="module")
def client(chat_server):
    with grpcclient.InferenceServerClient(chat_server.grpc_url) as client:
        yield client


def chat_inputs(prompt: str | bytes, **values: Any) -> list[grpcclient.InferInput]:
    """BYTES inputs like the seed's client sends; a numpy array value keeps its own datatype.

    Like the seed's client, it always sends a temperature: 0 (greedy, repeatable) unless given.
    """
    inputs = []
    for name, value in {"prompt": prompt, "temperature": "0", **values}.items():
        if isinstance(value, np.ndarray):
            array = value
        else:
            items = value if isinstance(value, list) else [value]
            array = np.array([v if isinstance(v, bytes) else str(v).encode() for v in items], dtype=np.object_)
        tensor = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def texts(result: grpcclient.InferResult, name: str) -> list[str]:
    return [item.decode("utf-8") for item in result.as_numpy(name).reshape(-1)]


def parameters(result: grpcclient.InferResult) -> dict[str, Any]:
    """The response parameters as plain values."""
    out = {}
    for key, value in result.get_response().parameters.items():
        out[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return out


def llm_metrics(chat_server) -> dict[str, float]:
    """The model's ``triserve_llm_*`` samples from the metrics port, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{chat_server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("triserve_llm_") and sample.labels.get("model") == MODEL
        and "le" not in sample.labels
    }


def stream(client: grpcclient.InferenceServerClient, inputs, cancel_after: int | None = None
           ) -> list[grpcclient.InferResult]:
    """Responses of one ModelStreamInfer request, up to the final one (or ``cancel_after``)."""
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    responses = []
    try:
        client.async_stream_infer(MODEL, inputs)
        while True:
            item = received.get(timeout=60)
            if isinstance(item, Exception):
                raise item
            responses.append(item)
            if parameters(item).get(FINAL) or len(responses) == cancel_after:
                return responses
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)


def test_seed_chat_turn_answers_in_words(client):
    question, answer = "What is the capital of Italy?", "The capital of Italy is Rome."
    result = client.infer(MODEL, chat_inputs(
        "What is the capital of France?", history=[question, answer],
        temperature="0.01", max_token="16000", history_len="10"))
    response = texts(result, "response")
    assert len(response) == 1 and "Paris" in response[0]
    assert texts(result, "history") == [question, answer, "What is the capital of France?", response[0]]
    params = parameters(result)
    assert params["finish_reason"] == "stop"
    assert params["prompt_tokens"] > 20 and params["completion_tokens"] > 3


def test_streaming_sends_pieces_then_history(client):
    responses = stream(client, chat_inputs("Name three colors.", max_new_tokens="24", stream="true"))
    assert len(responses) > 3
    pieces = [texts(r, "response")[0] for r in responses]
    final = responses[-1]
    reply = "".join(pieces)
    assert len(reply.split()) >= 3
    assert texts(final, "history") == ["Name three colors.", reply]
    assert all(r.as_numpy("history") is None for r in responses[:-1])
    assert parameters(final)["completion_tokens"] <= 24


def test_numbers_as_numeric_datatypes_and_stop_strings(client):
    result = client.infer(MODEL, chat_inputs(
        "Count from 1 to 10, separated by commas.",
        temperature=np.array([0.0], dtype=np.float32), max_new_tokens=np.array([40], dtype=np.int32),
        stop=["5", "five"]))
    response = texts(result, "response")[0]
    assert response and "5" not in response
    assert parameters(result)["finish_reason"] == "stop"


def test_concurrent_requests_are_batched(client, chat_server):
    running_seen = []
    done = threading.Event()

    def watch_running():
        while not done.is_set():
            running_seen.append(llm_metrics(chat_server)["triserve_llm_running_sequences"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_running)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(
                lambda i: client.infer(MODEL, chat_inputs(f"Tell me one fact about the number {i}.",
                                                          max_new_tokens="16")), range(8)))
    finally:
        done.set()
        watcher.join()
    assert all(texts(r, "response")[0].strip() for r in results)
    assert max(running_seen) > 1, f"never more than one sequence decoding at once: {running_seen}"


def test_second_turn_reuses_the_prefix_cache(client):
    question = "Give me a name for a black cat."
    first = client.infer(MODEL, chat_inputs(question, max_new_tokens="12"))
    history = texts(first, "history")
    second = client.infer(MODEL, chat_inputs("And one for a white cat?", history=history,
                                             max_new_tokens="12"))
    cached = parameters(second)["cached_tokens"]
    assert cached >= parameters(first)["prompt_tokens"], "the first turn's prompt was not reused"
    assert cached < parameters(second)["prompt_tokens"]


def cancelled_requests(chat_server) -> float:
    """``nv_inference_request_failure{reason="CANCELED"}`` of the chat model."""
    with urllib.request.urlopen(f"http://127.0.0.1:{chat_server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name.startswith("nv_inference_request_failure") and sample.labels.get("model") == MODEL
               and sample.labels.get("reason") == "CANCELED")


def generation_counters(chat_server) -> tuple[float, float]:
    """(tokens generated, requests cancelled) so far: take it before the request."""
    return llm_metrics(chat_server)["triserve_llm_generation_tokens_total"], cancelled_requests(chat_server)


def assert_generation_stopped(chat_server, before: tuple[float, float], requested: int) -> None:
    """The client went away and the engine really stopped: the request ended as cancelled (not by
    finishing its reply), no sequence runs, its slot is given back, the generated-token counter
    stays still, and far fewer than the ``requested`` tokens were generated."""
    deadline = time.monotonic() + 10
    while llm_metrics(chat_server)["triserve_llm_running_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = llm_metrics(chat_server)
    assert metrics["triserve_llm_running_sequences"] == 0, "the sequence still runs: nothing was cancelled"
    assert metrics["triserve_llm_waiting_sequences"] == 0
    assert metrics["triserve_llm_kv_cache_bytes_in_use"] == 0, "the slot was not given back"
    deadline = time.monotonic() + 10
    while cancelled_requests(chat_server) == before[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled_requests(chat_server) == before[1] + 1, "the request was not ended as cancelled"
    generated = metrics["triserve_llm_generation_tokens_total"]
    time.sleep(1.0)  # a live sequence makes >= 10 tokens in a second, even on a loaded machine
    assert llm_metrics(chat_server)["triserve_llm_generation_tokens_total"] == generated, \
        "tokens are still being generated after the client went away"
    assert generated - before[0] < requested // 2


def test_cancelling_a_stream_stops_the_generation(client, chat_server):
    before = generation_counters(chat_server)
    responses = stream(client, chat_inputs("Write a long story about a dragon.", max_new_tokens="1900", ignore_eos="true",
                                           stream="true"), cancel_after=3)
    assert len(responses) == 3
    assert_generation_stopped(chat_server, before, 1900)


@pytest.mark.parametrize("values, message", [
    ({"history": ["only a question"]}, "history has 1 elements"),
    ({"temperature": "-1"}, "temperature must be in [0, 100] (0 = greedy), got -1.0"),
    ({"top_p": "0"}, "top_p must be in (0, 1]"),
    ({"top_p": "1.5"}, "top_p must be in (0, 1]"),
    ({"max_token": "abc"}, "max_token: 'abc' is not an integer"),
    ({"temperature": "warm"}, "temperature: 'warm' is not a number"),
    ({"prompt": b"\xff\xfe bad bytes"}, "prompt is not valid UTF-8"),
    ({"prompt": "hello " * 3000}, f"the context of model '{MODEL}' is 2048 tokens"),
    ({"max_token": "10"}, "max_token (10) must be larger than the prompt"),
    ({"stream": "maybe"}, "stream: 'maybe' is not a boolean"),
])
def test_bad_input_is_invalid_argument_naming_it(client, values, message):
    values = {"prompt": "hi", "max_new_tokens": "4", **values}
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, chat_inputs(values.pop("prompt"), **values))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in caught.value.message()
    assert texts(client.infer(MODEL, chat_inputs("hi", max_new_tokens="2")), "response")[0]


def test_stream_true_on_a_unary_http_request_is_invalid_argument(chat_server):
    inputs = []
    for name, value in {"prompt": b"hi", "max_new_tokens": b"4", "stream": b"true"}.items():
        tensor = httpclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(tensor)
    with httpclient.InferenceServerClient(chat_server.http_url) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, inputs)
        assert caught.value.status() == "400"
        assert (f"model '{MODEL}' sent a streamed response to a unary request: unset 'stream'"
                in caught.value.message())
        assert client.is_server_ready()


def test_gguf_weights_stay_quantized_and_the_kv_reservation_is_not_resident(client, chat_server):
    """The Q4_1 GGUF is held at its own size (bf16 would be ~270 MB), and the KV cache reserved at
    load (755 MB for 16 x 2048 tokens) takes memory only where written: the resident part of its
    mapping (/proc/PID/smaps) is a fraction of it after this module's short chats."""
    stream(client, chat_inputs("Say hello.", max_new_tokens="8", stream="true"))
    metrics = llm_metrics(chat_server)
    weights, reserved = metrics["triserve_llm_weight_bytes"], metrics["triserve_llm_kv_cache_bytes_reserved"]
    assert 60e6 < weights < 120e6
    assert reserved == 16 * 2048 * 30 * 2 * 3 * 64 * 2  # slots x tokens x layers x K/V x kv heads x dim x bf16
    resident, size_kb = [], 0
    for line in Path(f"/proc/{chat_server.proc.pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size_kb = int(line.split()[1])
        elif line.startswith("Rss:") and size_kb * 1024 == reserved:
            resident.append(int(line.split()[1]) * 1024)
    assert resident, "the KV cache's mapping was not found"
    assert resident[0] < 0.25 * reserved  # all of it were the buffer zero-filled at load
