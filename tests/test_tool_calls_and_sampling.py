"""The pieces under the OpenAI fields, without a server: reading tool calls out of a reply
(``tool_choice`` ``auto``), the chat contract's tool inputs, and the sampler's OpenAI
penalties, ``min_p`` and logprobs."""

from __future__ import annotations

import json

import pytest
import torch

from triserve.backends.llm.sampling import SamplingParams, SamplingRow, make_generator, sample
from triserve.backends.llm.tools import ToolCallReader, parse_tool_calls, parse_tool_choice, parse_tools
from triserve.core.errors import InferError

TOOLS = parse_tools(json.dumps([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}},
]))
NAMES = {"get_weather", "get_time"}


@pytest.mark.parametrize("reply, calls, content", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     [("get_weather", {"city": "Paris"})], ""),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nChecking both.',
     [("get_weather", {"city": "Oslo"}), ("get_time", {})], "Checking both."),
    ('{"name": "get_time", "parameters": {"timezone": "UTC"}}', [("get_time", {"timezone": "UTC"})], ""),
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]',
     [("get_time", {}), ("get_weather", {"city": "Rome"})], ""),
    ("The weather is fine.", [], "The weather is fine."),
    ('<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>', [],
     '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>'),
    ('{"city": "Paris"}', [], '{"city": "Paris"}'),
    ("Sure! <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>", [],
     "Sure! <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"),
], ids=["hermes", "parallel-then-text", "llama-json", "json-array", "text", "unknown-tool", "plain-json",
        "text-first"])
def test_calls_are_read_from_the_start_of_a_reply(reply, calls, content):
    found_content, found = parse_tool_calls(reply, NAMES)
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in found] == calls
    assert found_content == content
    assert len({call["id"] for call in found}) == len(found)


def test_streamed_text_passes_and_a_call_is_held_back():
    text = ToolCallReader(TOOLS)
    assert [text.feed(piece) for piece in ["  ", "Hel", "lo", " there"]] == ["", "  Hel", "lo", " there"]
    assert text.finish() == ("", [])
    call = ToolCallReader(TOOLS)
    pieces = ["<tool", "_call>", '{"name": "get_time", ', '"arguments": {}}', "</tool_call>"]
    assert [call.feed(piece) for piece in pieces] == [""] * len(pieces)
    content, calls = call.finish()
    assert content == "" and calls[0]["function"]["name"] == "get_time"
    not_a_call = ToolCallReader(TOOLS)
    assert not_a_call.feed("<tool") == "" and not_a_call.feed("_response>") == "<tool_response>"


@pytest.mark.parametrize("tools, choice, message", [
    ("{}", None, "tools: expected a JSON array"),
    ('[{"type": "function", "function": {"name": "bad name"}}]', None, "function.name"),
    ('[{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]', None,
     "a second tool named 'f'"),
    ('[{"type": "function", "function": {"name": "f"}}]', "g", "no tool named 'g'"),
    (None, "required", "needs tools"),
])
def test_bad_tool_inputs_name_the_problem(tools, choice, message):
    with pytest.raises(InferError, match=message):
        parse_tool_choice(choice, parse_tools(tools))


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(max_new_tokens=8, **params), make_generator(0), [0, 1], prompt_len=1)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    logits[0, 1] = 1.0  # token 1 was generated once; token 0 is only in the prompt
    sampling = row(frequency_penalty=0.5, presence_penalty=0.25, logprobs=4)
    assert sample(logits, [sampling]) == [1]
    assert logits[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # the caller's logits are left as they were
    # the logprobs are those of the penalised logits [0, 0.25, 0, 0]: token 1 lost 0.5 + 0.25
    alternatives = dict(sampling.last_logprobs[2])
    assert alternatives[1] - alternatives[0] == pytest.approx(0.25)
    assert alternatives[0] == pytest.approx(alternatives[2]) == pytest.approx(alternatives[3])


def test_min_p_keeps_tokens_near_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits.clone(), [SamplingRow(SamplingParams(max_new_tokens=1, temperature=1.0, min_p=0.5),
                                                make_generator(seed), [0])])[0] for seed in range(200)}
    assert seen == {0, 1}  # 0.15 and 0.05 are below half of the top token's 0.5


def test_logprobs_of_the_chosen_token_and_alternatives():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    sampling = row(logprobs=2)
    assert sample(logits, [sampling]) == [1]
    token, logprob, top = sampling.last_logprobs
    assert token == 1 and logprob == pytest.approx(torch.log(torch.tensor(0.6)).item())
    assert [t for t, _ in top] == [1, 2]
