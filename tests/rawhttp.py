"""HTTP at the socket level, for what ordinary clients cannot do: announce a body and not
send it, trickle it, or keep pushing one after the server refused it.

Also the small model repositories the hardening tests build, and the server's RSS.
"""

from __future__ import annotations

import select
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TESTS = Path(__file__).parent

SLOW_CONFIG = """
name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

SLOW_MODEL = '''
"""Sleeps INPUT0[0] seconds, then returns INPUT0."""
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            time.sleep(float(values.reshape(-1)[0]) if values.size else 0.0)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", values)]))
        return responses
'''


ECHO_CHAT_CONFIG = """
name: "echo_chat"
backend: "python"
max_batch_size: 0
input [
  { name: "prompt" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "history" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "system" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "max_new_tokens" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "temperature" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "top_p" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "top_k" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "repetition_penalty" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "seed" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "stop" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "raw" data_type: TYPE_STRING dims: [ -1 ] optional: true }
]
output [ { name: "response" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ECHO_CHAT_MODEL = '''
"""A chat model for the OpenAI routes without an LLM: answers "echo: <prompt>"."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)[0]
            text = b"echo: " + prompt
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("response", np.array([text], dtype=np.object_))]))
        return responses
'''


def make_repository(root: Path, models: list[str], slow: bool = False, echo_chat: bool = False) -> Path:
    """A repository with copies of some test models (and the ``slow`` and ``echo_chat`` models)."""

    root.mkdir(parents=True, exist_ok=True)
    for name in models:
        shutil.copytree(TESTS / "model_repository" / name, root / name)
    if slow:
        (root / "slow" / "1").mkdir(parents=True)
        (root / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
        (root / "slow" / "1" / "model.py").write_text(SLOW_MODEL)
    if echo_chat:
        (root / "echo_chat" / "1").mkdir(parents=True)
        (root / "echo_chat" / "config.pbtxt").write_text(ECHO_CHAT_CONFIG)
        (root / "echo_chat" / "1" / "model.py").write_text(ECHO_CHAT_MODEL)
    return root


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(lines[0].split()[1]), headers, body)


def read_response(sock: socket.socket, timeout: float = 30.0) -> RawResponse:
    """Read until the server closes the connection or a whole response with a length arrived."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = parse_response(data).headers.get("content-length")
            if length is not None and len(body) >= int(length):
                break
    return parse_response(data)


def read_next_response(stream) -> RawResponse:
    """The next of several responses on one connection, from its buffered socket file
    (``sock.makefile("rb")``): reads exactly one response's bytes, so pipelined ones stay."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(status_line.split()[1]), headers, stream.read(int(headers.get("content-length", 0))))


def request_head(port: int, path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def push_body(port: int, path: str, total: int, headers: dict[str, str] | None = None,
              chunk_size: int = 1 << 20) -> tuple[RawResponse, int]:
    """Send a ``total``-byte chunked body until the server answers; (its answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        sock.sendall(request_head(port, path, {"Transfer-Encoding": "chunked", **(headers or {})}))
        chunk = b" " * chunk_size
        sent = 0
        try:
            while sent < total:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered: stop sending
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock), sent


def open_trickle(port: int, path: str, declared: int, first: bytes = b"{") -> socket.socket:
    """A connection that announces a ``declared``-byte body and sends only ``first`` of it."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request_head(port, path, {"Content-Length": str(declared), "Content-Type": "application/json"})
                 + first)
    return sock


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
