"""The OpenAI-compatible API, driven by the official ``openai`` client, LangChain's
``ChatOpenAI`` and raw HTTP, against the real default chat model.

The model is small: tests assert on structure and behaviour (token counts, finish
reasons, determinism under greedy decoding and seeds), never on wording.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI

from conftest import DEFAULT_CHAT_MODEL
from test_llm_server import assert_generation_stopped, generation_counters

MODEL = DEFAULT_CHAT_MODEL
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def base_url(chat_server) -> str:
    return f"{chat_server.base_url}/v1"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def http(base_url) -> httpx.Client:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def greedy(client: openai.OpenAI, messages: list[dict], max_tokens: int = 12, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kwargs)


def test_models_lists_the_chat_model(client):
    models = client.models.list()
    assert MODEL in [model.id for model in models.data]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_has_openai_shape_and_usage(client):
    completion = greedy(client, [{"role": "system", "content": "Answer briefly."}, *HELLO])
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_ends_with_finish_reason_length(client):
    completion = greedy(client, [{"role": "user", "content": "Tell me a long story about a dragon."}],
                        max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


def test_max_completion_tokens_is_max_tokens(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                                max_completion_tokens=2)
    assert completion.usage.completion_tokens == 2


def test_history_reaches_the_model(client):
    """Earlier turns become history: they count as prompt tokens."""
    alone = greedy(client, HELLO, max_tokens=1)
    with_history = greedy(client, [{"role": "user", "content": "My name is Ada."},
                                   {"role": "assistant", "content": "Nice to meet you, Ada."},
                                   {"role": "user", "content": "Hello"},
                                   {"role": "user", "content": "Hello"}], max_tokens=1)
    assert with_history.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_stream_chunks_match_the_unary_answer(client):
    unary = greedy(client, HELLO)
    stream = greedy(client, HELLO, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, finish_chunk, usage_chunk = chunks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert text == unary.choices[0].message.content
    assert len(content_chunks) > 2  # piece by piece, not one blob
    assert finish_chunk.choices[0].finish_reason == unary.choices[0].finish_reason
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == unary.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(greedy(client, HELLO, max_tokens=4, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer(client):
    full = greedy(client, HELLO, max_tokens=16).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop_word = words[2]
    cut = greedy(client, HELLO, max_tokens=16, stop=[stop_word]).choices[0]
    assert cut.message.content == full[: full.index(stop_word)]
    assert cut.finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    def sample() -> str:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
            temperature=1.0, top_p=0.95, seed=1234).choices[0].message.content
    # In bfloat16 (the default dtype) logits move slightly with how a prompt was split between
    # the prefix cache and prefill, so a seed repeats exactly from the same cache state (as in
    # vLLM; float32 repeats always). The first call puts the prompt in the cache for both.
    sample()
    assert sample() == sample()


def test_text_completion_is_raw(client):
    completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=4, temperature=0)
    assert completion.object == "text_completion"
    [choice] = completion.choices
    assert choice.text
    # raw: no chat template wraps the prompt, so it is only a handful of tokens
    assert completion.usage.prompt_tokens < 10
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text


def test_langchain_chat_openai_invoke_and_stream(base_url):
    chat = ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL, max_tokens=8, temperature=0,
                      max_retries=0, stream_usage=True)
    message = chat.invoke("Hello")
    assert isinstance(message, AIMessage) and message.content
    assert message.usage_metadata["output_tokens"] > 0
    assert message.response_metadata["model_name"] == MODEL
    full = None
    for chunk in chat.stream("Hello"):
        assert isinstance(chunk, AIMessageChunk)
        full = chunk if full is None else full + chunk
    assert full.content == message.content
    assert full.usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("body, param, words", [
    ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature", "Invalid type"),
    ({"model": MODEL, "messages": HELLO, "temperature": 2.5}, "temperature", "at most 2"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"model": MODEL, "messages": HELLO, "stop": 5}, "stop", "Invalid type"),
    ({"model": MODEL, "messages": "Hello"}, "messages", "Invalid type"),
    ({"model": MODEL}, "messages", "Missing required parameter"),
    ({"messages": HELLO}, "model", "Missing required parameter"),
    ({"model": MODEL, "messages": HELLO, "n": 0}, "n", "at least 1"),
    ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "at most 20"),
    ({"model": MODEL, "messages": HELLO, "presence_penalty": 3}, "presence_penalty", "at most 2"),
    ({"model": MODEL, "messages": HELLO, "min_p": 1.5}, "min_p", "at most 1"),
    ({"model": MODEL, "messages": HELLO, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "not in 'tools'"),
    ({"model": MODEL, "messages": HELLO, "response_format": {"type": "xml"}}, "response_format", "Invalid type"),
    ({"model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format",
     "'json_schema' is required"),
    ({"model": MODEL, "messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}}},
     None, "json_schema"),
    ({"model": MODEL, "messages": HELLO, "grammar": "start: ("}, None, "grammar"),
    ({"model": MODEL, "messages": HELLO, "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
    ({"model": MODEL, "messages": HELLO, "bogus": 1}, "bogus", "Unrecognized request argument"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}, "messages", "robot"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "42"}]}, "messages", "tool_call_id"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "Hi", "nickname": "ada"}]}, "messages",
     "Unrecognized field 'messages[0].nickname'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content"),
    ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when 'stream' is enabled"),
])
def test_bad_fields_are_400_naming_the_field(http, body, param, words):
    error = error_of(http.post("/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert words in error["message"]


def test_malformed_json_is_400(http):
    error = error_of(http.post("/chat/completions", content=b'{"model": ',
                               headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    error = error_of(http.post("/completions", content=b"[1, 2]"), 400)
    assert "JSON object" in error["message"]


def test_unknown_model_is_404(http, client):
    error = error_of(http.post("/chat/completions", json={"model": "nope", "messages": HELLO}), 404)
    assert error["message"] == "The model 'nope' does not exist"
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x")
    assert http.get("/models/nope").status_code == 404


def test_server_keeps_serving_after_errors_and_a_dropped_stream(http, client):
    for _ in range(3):
        http.post("/chat/completions", content=b"not json")
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long essay."}],
               "max_tokens": 1000, "stream": True}
    with http.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # drop the connection mid-generation
    completion = greedy(client, HELLO, max_tokens=2)
    assert completion.usage.completion_tokens == 2


LONG_STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]


def test_ignore_eos_runs_the_reply_to_max_tokens(client):
    """A short answer ends at the end-of-turn token; with vLLM's `ignore_eos` it runs to max_tokens."""
    short = greedy(client, HELLO, max_tokens=300)
    assert short.choices[0].finish_reason == "stop"
    assert short.usage.completion_tokens < 300
    full = greedy(client, HELLO, max_tokens=300, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 300
    assert full.choices[0].message.content.startswith(short.choices[0].message.content)


def test_client_timeout_stops_the_generation(base_url, chat_server):
    """The openai client gives up (its timeout): the server stops generating for it."""
    before = generation_counters(chat_server)
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3) as impatient:
        with pytest.raises(openai.APITimeoutError):  # 1800 tokens take far longer than 3 s
            impatient.chat.completions.create(model=MODEL, messages=LONG_STORY, max_tokens=1800,
                                              extra_body={"ignore_eos": True})
    assert_generation_stopped(chat_server, before, 1800)


def test_closing_a_stream_stops_the_generation(client, chat_server):
    before = generation_counters(chat_server)
    chunks = client.chat.completions.create(model=MODEL, messages=LONG_STORY, max_tokens=1800, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), chunks):
        pass
    chunks.close()  # the client goes away mid-stream
    assert_generation_stopped(chat_server, before, 1800)
