"""TriserveLLM (the seed's LangChain class, fixed) against the real default chat model over KServe v2."""

from __future__ import annotations

import pytest
from langchain_core.prompts import PromptTemplate

from conftest import DEFAULT_CHAT_MODEL
from triserve.langchain import TriserveError, TriserveLLM


@pytest.fixture(scope="module")
def llm(chat_server) -> TriserveLLM:
    # Greedy and short: repeatable answers, fast on a CPU.
    return TriserveLLM(url=chat_server.base_url, model=DEFAULT_CHAT_MODEL, temperature=0, max_new_tokens=12)


def test_call_answers_a_prompt_in_a_chain(llm):
    chain = PromptTemplate.from_template("Say hello to {name}.") | llm
    answer = chain.invoke({"name": "Ada"})
    assert isinstance(answer, str) and answer.strip()


def test_chat_round_trips_history(llm):
    answer, history = llm.chat("My name is Ada.")
    assert answer.strip()
    assert history == [["My name is Ada.", answer]]
    second, history = llm.chat("What is my name?", history)
    assert second.strip()
    assert history == [["My name is Ada.", answer], ["What is my name?", second]]


def test_history_changes_the_answer_context(llm):
    """The same question with and without earlier turns reaches the model differently."""
    alone, _ = llm.chat("Repeat the number I told you.")
    with_history, _ = llm.chat("Repeat the number I told you.",
                               [["Remember the number 4711.", "I will remember 4711."]])
    assert alone != with_history


def test_stop_words_cut_the_text(llm):
    full = llm.invoke("Hello")
    words = full.split()
    assert len(words) >= 3, full
    stop_word = words[2]
    assert llm.invoke("Hello", stop=[stop_word]) == full[: full.index(stop_word)]
    # stop words are text, not patterns
    assert llm.invoke("Hello", stop=[".*", "(["]) == full.split(".*")[0].split("([")[0]
    answer, history = llm.chat("Hello", stop=[stop_word])
    assert answer == full[: full.index(stop_word)]
    assert history[-1] == ["Hello", answer]


def test_seed_predict_url_is_accepted(chat_server):
    llm = TriserveLLM(url=f"{chat_server.base_url}/MultiBackendService/Predict", temperature=0,
                      max_new_tokens=2)
    assert llm.url == chat_server.base_url
    assert llm.invoke("Hello").strip()


def test_http_errors_raise_with_the_server_message(chat_server):
    missing = TriserveLLM(url=chat_server.base_url, model="no_such_model")
    with pytest.raises(TriserveError, match="no_such_model") as caught:
        missing.invoke("Hello")
    assert caught.value.status_code in (400, 404)
    assert "查询结果错误" not in str(caught.value)
    bad_temperature = TriserveLLM(url=chat_server.base_url, temperature=-1, max_new_tokens=2)
    with pytest.raises(TriserveError, match="temperature"):
        bad_temperature.invoke("Hello")
