"""Structured output, tool calls and the sampling fields of the OpenAI API, driven by the
official ``openai`` client against the real default chat model (SmolLM2-135M-Instruct).

Constrained decoding makes the small model's JSON and tool calls valid by construction:
every output here is parsed and validated, never only looked at.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from conftest import DEFAULT_CHAT_MODEL

MODEL = DEFAULT_CHAT_MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "mood"],
}
NESTED = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                     "required": ["lat", "lon"]},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    },
    "required": ["city", "location", "sights"],
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"product": {"enum": ["apple", "bread", "milk"]}, "quantity": {"type": "integer"}},
            "required": ["product", "quantity"]}},
        "express": {"type": "boolean"},
    },
    "required": ["items", "express"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(chat_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{chat_server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as client:
        yield client


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 80, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=kwargs.pop("temperature", 0), **kwargs)


@pytest.mark.parametrize("schema, prompt", [
    (PERSON, "Describe a person."),
    (NESTED, "Describe a city you like."),
    (ORDER, "Order some groceries."),
], ids=["enum", "nested", "array-of-objects"])
def test_json_schema_output_validates(client, schema, prompt):
    completion = chat(client, [{"role": "user", "content": prompt}], response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    [choice] = completion.choices
    assert choice.finish_reason == "stop", choice.message.content
    document = json.loads(choice.message.content)
    jsonschema.validate(document, {**schema, "additionalProperties": False})


def test_json_schema_output_streams_and_samples(client):
    """Streamed and sampled (temperature 1) output still validates: the mask, not luck."""
    format_ = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in (1, 2):
        stream = chat(client, [{"role": "user", "content": "Describe someone."}], temperature=1.0, seed=seed,
                      response_format=format_, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_is_an_object(client):
    completion = chat(client, [{"role": "user", "content": "Give the name and age of a person as JSON."}],
                      response_format={"type": "json_object"}, max_tokens=120)
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_grammar_constrains_the_reply(client):
    completion = chat(client, [{"role": "user", "content": "Is the sky blue?"}],
                      extra_body={"grammar": 'start: ("yes" | "no") "."'})
    assert completion.choices[0].message.content in ("yes.", "no.")


def test_generate_takes_json_schema_and_grammar(chat_server):
    base = f"{chat_server.base_url}/v2/models/{MODEL}"
    with httpx.Client(timeout=120) as http:
        body = http.post(f"{base}/generate", json={"prompt": "Describe a person.", "temperature": 0,
                                                   "max_new_tokens": 80, "json_schema": json.dumps(PERSON)}).json()
        jsonschema.validate(json.loads(body["response"]), PERSON)
        body = http.post(f"{base}/generate", json={"prompt": "Pick a colour.", "temperature": 0,
                                                   "grammar": 'start: "red" | "green" | "blue"'}).json()
        assert body["response"] in ("red", "green", "blue")
        bad = http.post(f"{base}/generate", json={"prompt": "x", "json_schema": "{not json"})
        assert bad.status_code == 400 and "json_schema: not valid JSON" in bad.json()["error"]


def test_guided_and_free_sequences_share_a_batch(client):
    """Masks are per sequence: free greedy replies are unchanged by guided ones beside them."""
    prompts = ["Tell me about cats."]
    alone = [chat(client, [{"role": "user", "content": p}], max_tokens=16).choices[0].message.content
             for p in prompts]
    format_ = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    with ThreadPoolExecutor(2) as pool:
        guided = [pool.submit(chat, client, [{"role": "user", "content": p}], response_format=format_)
                  for p in prompts]
        free = [pool.submit(chat, client, [{"role": "user", "content": p}], max_tokens=16) for p in prompts]
        for future in guided:
            jsonschema.validate(json.loads(future.result().choices[0].message.content), PERSON)
        for future, reference in zip(free, alone):
            text = future.result().choices[0].message.content
            # no mask leaked onto the free row: it is the same prose, not JSON (not always token for
            # token: int4/bf16 kernels may break a near-tie differently in a batch of two)
            assert not text.lstrip().startswith("{") and text.split()[0] == reference.split()[0], (text, reference)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_gives_a_valid_call(client, tool_choice):
    completion = chat(client, ASK_WEATHER, tools=[WEATHER, TIME], tool_choice=tool_choice)
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments),
                        {**tool["function"]["parameters"], "additionalProperties": False})


def test_tool_choice_none_answers_in_text(client):
    completion = chat(client, ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=12)
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content


def test_streamed_tool_call_deltas_reassemble(client):
    unary = chat(client, ASK_WEATHER, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chat(client, ASK_WEATHER, tools=[WEATHER], tool_choice="required", stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    [call] = calls.values()
    assert call["id"].startswith("call_")
    assert (call["name"], json.loads(call["arguments"])) == (unary.function.name, json.loads(unary.function.arguments))


def test_parallel_tool_calls_when_asked(client):
    """With parallel_tool_calls the grammar allows several calls; SmolLM2 makes two here."""
    completion = chat(client, ASK_WEATHER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=True,
                      max_tokens=120)
    calls = completion.choices[0].message.tool_calls
    assert len(calls) >= 2
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)


def test_tool_results_in_the_conversation_reach_the_model(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    conversation = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21})}]
    short = chat(client, conversation, tools=[WEATHER], max_tokens=1)
    longer_result = [*conversation[:2], {**conversation[2], "content": json.dumps({"temperature": 21, "sky": "clear",
                                                                                   "wind": "calm"})}]
    longer = chat(client, longer_result, tools=[WEATHER], max_tokens=1)
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens + 5
    answer = chat(client, conversation, tools=[WEATHER], tool_choice="none", max_tokens=24)
    assert answer.choices[0].message.content


def test_messages_reach_the_template_as_they_came(client):
    """Two user messages in a row: no invented empty assistant turn between them."""
    from transformers import AutoTokenizer

    from triserve.cache import cache_dir

    folder = next(path for path in cache_dir("models").iterdir() if (path / "chat_template.jinja").exists())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "Are you there?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat(client, messages, max_tokens=1).usage.prompt_tokens == len(expected)


def test_n_choices_with_seeds(client):
    def ask():
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
                                              n=3, seed=7, max_tokens=6, user="ada")
    first, second = ask(), ask()
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in first.choices]
    assert len(set(texts)) > 1  # unset temperature: the model's default is sampling (OpenAI's 1.0)
    assert texts == [choice.message.content for choice in second.choices]
    assert 3 <= first.usage.completion_tokens <= 18  # the three choices' tokens together
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
                                              n=3, seed=7, max_tokens=6, stream=True)
    pieces = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
    assert [pieces[i] for i in range(3)] == texts


def test_logprobs_and_top_logprobs(client):
    completion = chat(client, [{"role": "user", "content": "Hello"}], max_tokens=6, logprobs=True, top_logprobs=3)
    choice = completion.choices[0]
    tokens = choice.logprobs.content
    assert len(tokens) == completion.usage.completion_tokens
    assert "".join(token.token for token in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token
        assert len(token.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    streamed = chat(client, [{"role": "user", "content": "Hello"}], max_tokens=6, logprobs=True, stream=True)
    chunks = [chunk for chunk in streamed if chunk.choices]
    entries = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    # every streamed token comes with its logprobs, and they spell the streamed reply (not always
    # token for token the unary reply: a prefix-cache hit prefills in other chunks, and bf16/int4
    # kernels may then break a near-tie differently)
    assert len(entries) == len(tokens) and all(entry.logprob <= 0 for entry in entries)
    assert "".join(entry.token for entry in entries) == "".join(chunk.choices[0].delta.content or ""
                                                             for chunk in chunks)
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                     logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == 3
    assert all(len(top) == 2 for top in text.choices[0].logprobs.top_logprobs)


def test_penalties_and_min_p_change_sampling(client):
    prompt = [{"role": "user", "content": "Repeat the word cat ten times."}]
    plain = chat(client, prompt, max_tokens=16).choices[0].message.content
    penalised = chat(client, prompt, max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != plain
    # min_p=1 keeps only the most likely token: sampling at temperature 1 becomes greedy
    for seed in (1, 2):
        assert chat(client, prompt, max_tokens=16, temperature=1.0, seed=seed,
                    extra_body={"min_p": 1.0}).choices[0].message.content == plain


def test_bad_schema_and_grammar_are_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError, match="grammar"):
        chat(client, ASK_WEATHER, extra_body={"grammar": "start: undefined_rule"})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        chat(client, ASK_WEATHER, tool_choice="required")
    assert chat(client, ASK_WEATHER, max_tokens=2).usage.completion_tokens == 2
