"""Triton's generate extension (/generate, /generate_stream) against a real server."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import requests
from test_llm_server import MODEL as CHAT_MODEL, assert_generation_stopped, generation_counters, llm_metrics


def post(server, model: str, endpoint: str, document, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}/v2/models/{model}/{endpoint}", json=document, timeout=30, **kwargs)


def events(response: requests.Response) -> list[dict]:
    """The JSON of every ``data:`` event of a server-sent event stream."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


CHAT = {"prompt": "hello", "history": ["q1", "a1"], "temperature": 0.5, "max_token": 64, "history_len": 1}


def test_generate_converts_values_to_declared_datatypes(core_server):
    response = post(core_server, "chat_echo", "generate", CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "chat_echo" and body["model_version"] == "1"
    # Numbers became the TYPE_STRING text chat_echo parses; one-element outputs are scalars.
    assert body["response"] == "echo: hello (temperature=0.5, max_token=64)"
    assert body["history"] == ["q1", "a1", "hello", body["response"]]  # [2, 2] sent flat


def test_generate_numeric_model_and_versioned_route(core_server):
    response = post(core_server, "identity_fp32_batched", "generate", {"INPUT0": [1.5, 2.5]})
    assert response.status_code == 200, response.text
    assert response.json()["OUTPUT0"] == [1.5, 2.5]
    response = requests.post(f"{core_server.base_url}/v2/models/identity_int16/versions/1/generate",
                             json={"INPUT0": 7}, timeout=30)
    assert response.json()["OUTPUT0"] == 7


def test_inputs_under_parameters_are_inputs(core_server):
    document = {"prompt": "hi", "history": [], "parameters": {"temperature": 0, "max_token": 5, "history_len": 0}}
    response = post(core_server, "chat_echo", "generate", document)
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "echo: hi (temperature=0.0, max_token=5)"


@pytest.mark.parametrize(
    ("model", "document", "status", "words"),
    [
        ("chat_echo", {**CHAT, "promt": "typo"}, 400, ["promt", "parameters"]),
        ("chat_echo", {**CHAT, "parameters": {"prompt": "twice"}}, 400, ["prompt", "both"]),
        ("chat_echo", {**CHAT, "parameters": {"nested": {"a": 1}}}, 400, ["nested"]),
        ("identity_fp32", {"INPUT0": ["not a number"]}, 400, ["INPUT0", "numbers"]),
        ("no_such_model", {"prompt": "x"}, 404, ["no_such_model"]),
        ("stream_words", {"prompt": "a b"}, 400, ["generate_stream"]),
    ],
    ids=["unknown-input", "duplicate-input", "bad-parameter", "wrong-type", "unknown-model", "decoupled"],
)
def test_generate_errors(core_server, model, document, status, words):
    response = post(core_server, model, "generate", document)
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["error"]


def test_malformed_json_is_400(core_server):
    response = requests.post(f"{core_server.base_url}/v2/models/chat_echo/generate", data=b"{", timeout=10)
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]


def test_generate_stream_sends_one_event_per_response(core_server):
    response = post(core_server, "stream_words", "generate_stream", {"prompt": "one two three"})
    assert response.status_code == 200, response.text
    assert [event["word"] for event in events(response)] == ["one", "two", "three"]
    assert all(event["model_name"] == "stream_words" for event in events(response))


def test_generate_stream_on_a_unary_model_is_one_event(core_server):
    response = post(core_server, "chat_echo", "generate_stream", CHAT)
    (event,) = events(response)
    assert event["response"].startswith("echo: hello")


def test_generate_stream_errors_before_inference_are_plain_json(core_server):
    response = post(core_server, "error_response", "generate_stream", {"INPUT0": [1.0]})
    assert response.status_code == 400
    assert response.json() == {"error": "error_response: INPUT0 was rejected"}
    # a number for a BYTES input is its text, as the generate extension converts values
    response = post(core_server, "stream_words", "generate_stream", {"prompt": 3})
    assert response.status_code == 200
    assert [event["word"] for event in events(response)] == ["3"]


def words_sent(core_server) -> int:
    """How many words slow_stream's instance has streamed so far (its ``__count__`` prompt)."""
    (event,) = events(post(core_server, "slow_stream", "generate_stream", {"prompt": "__count__"}))
    return int(event["word"])


def test_client_leaving_a_stream_stops_the_model_and_keeps_the_server_serving(core_server):
    before = words_sent(core_server)
    with requests.post(f"{core_server.base_url}/v2/models/slow_stream/generate_stream",
                       json={"prompt": " ".join(["word"] * 1000)}, stream=True, timeout=30) as response:
        first = next(response.iter_lines())
        assert first.startswith(b"data: ")
    # the one instance answers the count only once the cancelled execute returned:
    # it stopped early (1000 words take 10 s at the model's 0.01 s per word)
    assert 1 <= words_sent(core_server) - before < 1000
    again = post(core_server, "slow_stream", "generate_stream", {"prompt": "still here"})
    assert [event["word"] for event in events(again)] == ["still", "here"]


def test_client_leaving_a_unary_generate_cancels_the_generation(chat_server):
    before = generation_counters(chat_server)
    connection = http.client.HTTPConnection("127.0.0.1", chat_server.http_port, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{CHAT_MODEL}/generate",
                           json.dumps({"prompt": "Write a very long story about a dragon.",
                                       "max_new_tokens": 1500, "ignore_eos": True}),
                           {"Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while llm_metrics(chat_server)["triserve_llm_generation_tokens_total"] == before[0]:
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.05)
        assert llm_metrics(chat_server)["triserve_llm_running_sequences"] == 1
    finally:
        connection.close()  # the client gives up without reading the answer
    assert_generation_stopped(chat_server, before, 1500)


def test_client_leaving_a_generate_stream_cancels_the_generation(chat_server):
    before = generation_counters(chat_server)
    with requests.post(f"{chat_server.base_url}/v2/models/{CHAT_MODEL}/generate_stream", stream=True,
                       json={"prompt": "Write a very long story about a dragon.", "max_new_tokens": 1500, "ignore_eos": True},
                       timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
    assert_generation_stopped(chat_server, before, 1500)
