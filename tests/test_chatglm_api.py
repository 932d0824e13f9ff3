"""ChatGLM's api.py (``POST /``) on a chat model, through LangChain's own ChatGLM client."""

from __future__ import annotations

import re
import warnings

import pytest
import requests

from conftest import TEST_REPOSITORY
from serverproc import ServerProcess

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_community.llms import ChatGLM


@pytest.fixture(scope="module")
def chatglm_server():
    # seed_config is a chat model too: --chatglm-model must pick chat_echo over it.
    args = ["--model-control-mode", "explicit", "--load-model", "seed_config", "--load-model", "chat_echo",
            "--load-model", "identity_fp32", "--chatglm-model", "chat_echo"]
    with ServerProcess(TEST_REPOSITORY, args=args) as server:
        yield server


def test_langchain_chatglm_works_unchanged(chatglm_server):
    llm = ChatGLM(endpoint_url=chatglm_server.base_url + "/", with_history=True, temperature=0.25, max_token=300)
    first = llm.invoke("你好")
    assert first == "echo: 你好 (temperature=0.25, max_token=300)"
    assert llm.history == [["你好", first]]
    second = llm.invoke("again")
    assert second.startswith("echo: again")
    assert llm.history == [["你好", first], ["again", second]]


def test_response_shape_and_defaults(chatglm_server):
    response = requests.post(chatglm_server.base_url, json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    # api.py's defaults: max_length 2048, temperature 0.95.
    assert body["response"] == "echo: hi (temperature=0.95, max_token=2048)"
    assert body["history"] == [["hi", body["response"]]] and body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"history": []}, ["prompt"]),
        ({"prompt": "x", "history": [["only question"]]}, ["history", "pairs"]),
        ({"prompt": "x", "max_lenght": 5}, ["max_lenght"]),
        ({"prompt": "x", "temperature": "hot"}, ["temperature"]),
    ],
    ids=["no-prompt", "bad-history", "unknown-field", "wrong-type"],
)
def test_bad_requests_are_400(chatglm_server, document, words):
    response = requests.post(chatglm_server.base_url, json=document, timeout=30)
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["error"]


def test_first_chat_model_without_chatglm_model(core_server):
    response = requests.post(core_server.base_url, json={"prompt": "hi", "history": [["q", "a"]]}, timeout=30)
    assert response.status_code == 200, response.text
    assert "hi" in response.json()["response"]


def test_unknown_chatglm_model_is_404():
    args = ["--model-control-mode", "explicit", "--load-model", "identity_fp32", "--chatglm-model", "missing"]
    with ServerProcess(TEST_REPOSITORY, args=args) as server:
        response = requests.post(server.base_url, json={"prompt": "hi"}, timeout=30)
        assert response.status_code == 404 and "missing" in response.json()["error"]
