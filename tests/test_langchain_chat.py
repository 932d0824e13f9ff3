"""ChatTriserve against LangChain's standard chat-model suites, plus what they do not
cover: server errors as exceptions, per-call model override, connection retries."""

from __future__ import annotations

import httpx
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from conftest import DEFAULT_CHAT_MODEL
from serverproc import free_port
from triserve.langchain import ChatTriserve, TriserveError

# Short replies keep the suites fast on a CPU; greedy decoding keeps them repeatable.
FAST = {"model": DEFAULT_CHAT_MODEL, "temperature": 0, "max_tokens": 16}


class TestChatTriserveUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatTriserve]:
        return ChatTriserve

    @property
    def chat_model_params(self) -> dict:
        return {"model": DEFAULT_CHAT_MODEL, "base_url": "http://127.0.0.1:8000/v1"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"TRISERVE_API_KEY": "secret", "TRISERVE_BASE_URL": "http://example.test:8000/v1"}, {},
                {"api_key": "secret", "base_url": "http://example.test:8000/v1"})

    @property
    def has_tool_calling(self) -> bool:
        return False  # the chat contract has no tools; the server refuses them with a 400

    @property
    def has_structured_output(self) -> bool:
        return False  # needs tool calling or a JSON mode, neither of which triserve has


class TestChatTriserveIntegration(ChatModelIntegrationTests):
    base_url = ""  # set from the chat_server fixture: the suite's properties cannot take fixtures

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _point_at_server(cls, chat_server) -> None:
        cls.base_url = f"{chat_server.base_url}/v1"

    @property
    def chat_model_class(self) -> type[ChatTriserve]:
        return ChatTriserve

    @property
    def chat_model_params(self) -> dict:
        return {**FAST, "base_url": self.base_url}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the chat contract has no tools; the server refuses them with a 400

    @property
    def has_structured_output(self) -> bool:
        return False  # needs tool calling or a JSON mode, neither of which triserve has

    @property
    def supports_json_mode(self) -> bool:
        return False  # response_format other than text is refused by the server

    @property
    def model_override_value(self) -> None:
        # The default repository serves a single chat model, so there is no second model to
        # switch to; test_model_kwarg_overrides_the_model below shows the override reaches
        # the server.
        return None


@pytest.fixture(scope="module")
def chat(chat_server) -> ChatTriserve:
    return ChatTriserve(**FAST, base_url=f"{chat_server.base_url}/v1")


def test_usage_and_finish_reason_arrive_on_one_closing_chunk(chat):
    chunks = list(chat.stream([SystemMessage("You are a storyteller."),
                               HumanMessage("Tell me a long story.")], max_tokens=4))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    with_usage = [chunk for chunk in chunks if chunk.usage_metadata]
    assert with_usage == [chunks[-1]]
    assert chunks[-1].usage_metadata["output_tokens"] == 4
    assert chunks[-1].response_metadata["finish_reason"] == "length"
    assert chunks[-1].response_metadata["model_name"] == DEFAULT_CHAT_MODEL


def test_call_kwargs_override_fields(chat):
    message = chat.invoke("Tell me a long story.", max_tokens=2)
    assert message.usage_metadata["output_tokens"] == 2
    assert message.response_metadata["finish_reason"] == "length"


def test_model_kwarg_overrides_the_model(chat):
    with pytest.raises(TriserveError, match="The model 'other-model' does not exist") as caught:
        chat.invoke("Hello", model="other-model")
    assert caught.value.status_code == 404


async def test_server_errors_raise_with_the_server_message_async(chat):
    with pytest.raises(TriserveError, match="n=1"):
        await chat.ainvoke("Hello", n=3)
    with pytest.raises(TriserveError, match="Invalid type for 'temperature'"):
        async for _ in chat.astream("Hello", temperature="warm"):
            pass


def test_connection_failures_raise_after_retries():
    unreachable = ChatTriserve(model=DEFAULT_CHAT_MODEL, base_url=f"http://127.0.0.1:{free_port()}/v1",
                               max_retries=1, timeout=5)
    with pytest.raises(httpx.ConnectError):
        unreachable.invoke("Hello")
