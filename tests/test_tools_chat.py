"""``triserve chat`` driven through a pseudo-terminal (pexpect), as a person types into it:
against a running server, and embedded (it starts a server on the default repository itself
and stops it on exit)."""

from __future__ import annotations

import os
import re
import sys
import time

import pexpect
import pytest

from conftest import DEFAULT_CHAT_MODEL, TEST_REPOSITORY
from serverproc import ServerProcess

# The seed's client: its question and the history it sends.
SEED_PROMPT = "请给出一个具体示例"
SEED_QUESTION = "你知道鸡兔同笼问题么"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SUMMARY = re.compile(r"(\d+) tokens, [\d.]+ tokens/s, prompt (\d+) tokens")

# A chat-contract Python model that shows what it was sent.
ECHO_CONFIG = """
name: "echo_chat"
backend: "python"
max_batch_size: 0
input [
  { name: "prompt", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "history", data_type: TYPE_STRING, dims: [ -1 ], optional: true },
  { name: "system", data_type: TYPE_STRING, dims: [ -1 ], optional: true }
]
output [
  { name: "response", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "history", data_type: TYPE_STRING, dims: [ -1 ] }
]
"""
ECHO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


def texts(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return [] if tensor is None else [v.decode("utf-8") for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            prompt, history, system = texts(request, "prompt")[0], texts(request, "history"), texts(request, "system")
            reply = f"echo: {prompt} | turns before: {len(history) // 2} | system: {system[0] if system else '-'}"
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("response", np.array([reply.encode()], dtype=object)),
                pb_utils.Tensor("history", np.array([t.encode() for t in [*history, prompt, reply]], dtype=object)),
            ]))
        return responses
"""


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("chat_repository")
    (repository / "echo_chat" / "1").mkdir(parents=True)
    (repository / "echo_chat" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repository / "echo_chat" / "1" / "model.py").write_text(ECHO_MODEL)
    with ServerProcess(repository) as server:
        yield server


def spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "LANG": "C.UTF-8", "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "triserve", "chat", *args], env=env, encoding="utf-8",
                          timeout=120, dimensions=(50, 200))
    child.expect("you> ")
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Type a line; what the terminal showed until the next prompt, without colour codes."""
    child.sendline(line)
    child.expect("you> ")
    return ANSI.sub("", child.before).replace("\r\n", "\n")


def leave(child: pexpect.spawn) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_with_a_running_server_renders_the_seeds_chinese_and_keeps_history(echo_server):
    child = spawn("--url", echo_server.base_url)
    assert "echo_chat" in child.before  # the server's only chat model, picked by itself
    shown = say(child, SEED_QUESTION)
    assert SEED_QUESTION in shown.splitlines()[0]  # the typed line echoes back intact
    assert f"echo_chat> echo: {SEED_QUESTION} | turns before: 0 | system: -" in shown
    shown = say(child, SEED_PROMPT)
    assert f"echo: {SEED_PROMPT} | turns before: 1 | system: -" in shown
    assert "\ufffd" not in shown and "??" not in shown
    assert "system prompt set" in say(child, "/system 用中文回答")
    assert "turns before: 2 | system: 用中文回答" in say(child, "再来一个")
    assert "conversation forgotten" in say(child, "/reset")
    assert "turns before: 0 | system: 用中文回答" in say(child, "你好")
    say(child, "/system -")
    assert "turns before: 1 | system: -" in say(child, "你好")
    assert "/reset" in say(child, "/help")
    leave(child)


def test_chat_names_a_model_that_is_not_there(echo_server):
    child = pexpect.spawn(sys.executable, ["-m", "triserve", "chat", "--url", echo_server.base_url,
                                           "--model", "no_such_model"], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "no chat model named 'no_such_model'" in ANSI.sub("", child.before)
    assert "echo_chat" in child.before  # the models it could have picked


@pytest.mark.slow
def test_embedded_chat_keeps_history_resets_and_sets_the_system_prompt():
    child = spawn("--temperature", "0", "--max-tokens", "12")
    started = re.search(r"started triserve \(pid (\d+)\)", ANSI.sub("", child.before))
    assert started, child.before
    server_pid = int(started.group(1))
    assert DEFAULT_CHAT_MODEL in child.before

    def turn(prompt: str) -> tuple[int, int]:
        shown = say(child, prompt)
        assert f"{DEFAULT_CHAT_MODEL}> " in shown
        completion, prompt_tokens = map(int, SUMMARY.search(shown).groups())
        return prompt_tokens, completion

    question = "What is the capital of France?"
    first_prompt, first_reply = turn(question)
    # the second turn carries the first one: its prompt holds the question and the reply again
    second_prompt, _ = turn(question)
    assert second_prompt >= first_prompt + first_reply + 5
    say(child, "/reset")
    assert turn(question)[0] == first_prompt  # the same prompt as a fresh conversation's
    assert "system prompt set" in say(child, "/system You are a pirate. Answer like one, always.")
    assert turn(question)[0] != first_prompt
    assert "You are a pirate" in say(child, "/system")
    leave(child)
    with pytest.raises(ProcessLookupError):  # the server it started is gone
        os.kill(server_pid, 0)


def test_chat_refuses_url_with_model_repository():
    child = pexpect.spawn(sys.executable, ["-m", "triserve", "chat", "--url", "http://127.0.0.1:1",
                                           "--model-repository", str(TEST_REPOSITORY)],
                          encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0 and "not both" in child.before


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_midway_and_the_server_stops_generating(chat_server):
    from test_ui import llm_metrics

    child = spawn("--url", chat_server.base_url, "--max-tokens", "1500", "--temperature", "0.7")
    before = llm_metrics(chat_server)
    child.sendline("Write a very long story about a dragon who learns to cook, in many chapters.")
    child.expect(f"{DEFAULT_CHAT_MODEL}> ")
    child.expect(r"\w+ \w+ \w+ \w+")  # a few words of the reply have arrived
    child.sendintr()
    child.expect("you> ")
    assert "stopped" in ANSI.sub("", child.before)
    deadline = time.monotonic() + 15
    while llm_metrics(chat_server)["triserve_llm_running_sequences"] != 0:
        assert time.monotonic() < deadline, "the engine kept decoding the stopped reply"
        time.sleep(0.2)
    stopped = llm_metrics(chat_server)["triserve_llm_generation_tokens_total"]
    time.sleep(1.5)
    assert llm_metrics(chat_server)["triserve_llm_generation_tokens_total"] == stopped
    assert 0 < stopped - before["triserve_llm_generation_tokens_total"] < 1500
    leave(child)


def test_embedded_server_starts_again_when_a_port_is_taken_meanwhile(tmp_path, monkeypatch):
    """The embedded server's ports are chosen free and bound seconds later; when another process
    takes one meanwhile (here: held by this test), the server is started again on other ports."""
    import io
    import shutil
    import socket

    from rich.console import Console

    from triserve.tools import embedded

    repository = tmp_path / "repository"
    shutil.copytree(TEST_REPOSITORY / "chat_echo", repository / "chat_echo")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = embedded._free_port
    monkeypatch.setattr(embedded, "_free_port", lambda: next(ports, None) or real())
    shown = io.StringIO()
    try:
        with embedded.EmbeddedServer(repository, Console(file=shown)) as server:
            assert server.http_port != taken.getsockname()[1]
            assert server.process is not None and server.process.poll() is None
            pid = server.process.pid
        assert "a port was taken by another process meanwhile" in shown.getvalue()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped
    finally:
        taken.close()
