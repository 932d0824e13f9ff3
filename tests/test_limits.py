"""Every request limit against a real server: each is refused with a 4xx (gRPC
RESOURCE_EXHAUSTED / INVALID_ARGUMENT, or an error in the stream) naming the limit, its
value and its option; memory stays bounded; the server keeps serving.

The server runs with small limits, so the tests send megabytes, not gigabytes, except
where the point is a huge body (which must then never be read or inflated whole).
"""

from __future__ import annotations

import gzip
import json
import queue
import select
import socket
import struct
import zlib

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from openai import BadRequestError, OpenAI
from tritonclient.utils import InferenceServerException

from rawhttp import make_repository, open_trickle, push_body, read_response, request_head, rss
from serverproc import ServerProcess

MiB = 1 << 20
LIMITS = ["--max-request-body", "8MiB", "--max-decompressed-body", "16MiB", "--max-json-depth", "32",
          "--max-tensor-elements", "1000", "--grpc-max-message", "1MiB", "--grpc-max-stream-in-flight", "2",
          "--request-body-timeout", "3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = make_repository(tmp_path_factory.mktemp("limits"), ["identity_fp32", "identity_bytes", "chat_echo"],
                                 slow=True, echo_chat=True)
    with ServerProcess(repository, args=LIMITS) as process:
        yield process


def fp32_body(values) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [len(values)], "data": list(values)}]}


def infer_url(server, model="identity_fp32") -> str:
    return f"{server.base_url}/v2/models/{model}/infer"


def assert_serving(server) -> None:
    """The server still answers health and inference after whatever a test did to it."""
    assert requests.get(f"{server.base_url}/v2/health/ready", timeout=10).status_code == 200
    response = requests.post(infer_url(server), json=fp32_body([1.5, 2.5]), timeout=10)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.5, 2.5]


# --- body size ------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server):
    """A Content-Length of 200 MB gets 413 at once: the client never sends a byte of it."""
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(request_head(server.http_port, "/v2/models/identity_fp32/infer",
                                  {"Content-Length": str(200_000_000), "Content-Type": "application/json"}))
        response = read_response(sock, timeout=10)
    assert response.status == 413
    message = json.loads(response.body)["error"]
    assert "200000000 bytes" in message and "8 MiB" in message and "--max-request-body" in message
    assert response.headers["connection"] == "close"
    assert_serving(server)


def test_a_chunked_body_is_cut_at_the_limit_and_memory_stays_bounded(server):
    """Three 200 MB chunked bodies: each refused once 8 MiB arrived, none read whole (the
    issue saw 1.27 GB resident after three such bodies)."""
    push_body(server.http_port, "/v2/models/identity_fp32/infer", 16 * MiB)  # warm the allocator
    before = rss(server.proc.pid)
    for _ in range(3):
        response, sent = push_body(server.http_port, "/v2/models/identity_fp32/infer", 200 * MiB)
        assert response.status == 413, response
        assert "--max-request-body" in json.loads(response.body)["error"]
        assert sent < 200 * MiB  # the answer came while the body was still being sent
    grown = rss(server.proc.pid) - before
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    assert_serving(server)


def test_a_body_at_the_limit_is_read(server):
    """Just under 8 MiB of JSON is accepted (and decoded: the model echoes it)."""
    values = [0.5] * 1000
    body = json.dumps(fp32_body(values)).encode()
    padded = body[:-1] + b" " * (8 * MiB - len(body) - 1) + body[-1:]
    response = requests.post(infer_url(server), data=padded, timeout=30)
    assert response.status_code == 200, response.text


# --- compressed bodies ----------------------------------------------------------------------


def gzip_of_spaces(size: int) -> bytes:
    """A valid gzip of ``size`` spaces (a whole number of MiB), built without compressing
    ``size`` bytes: after a full flush every MiB compresses to the same bytes."""
    block = b" " * MiB
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    unit = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // MiB):
        crc = zlib.crc32(block, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + unit * (size // MiB) + compressor.flush()
            + struct.pack("<II", crc, size & 0xFFFFFFFF))


def test_a_gzip_bomb_is_refused_without_being_inflated(server):
    """1 MB of gzip that inflates to 1 GiB of spaces: refused once 16 MiB came out."""
    bomb = gzip_of_spaces(1 << 30)
    assert len(bomb) < 2 * MiB
    post = lambda: requests.post(infer_url(server), data=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
    post()  # warm the allocator
    before = rss(server.proc.pid)
    for _ in range(3):
        response = post()
        assert response.status_code == 413
        message = response.json()["error"]
        assert "16 MiB" in message and "--max-decompressed-body" in message
    grown = rss(server.proc.pid) - before
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    assert_serving(server)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_within_the_limit_are_served(server, encoding):
    body = json.dumps(fp32_body([1.0, 2.0, 3.0])).encode()
    data = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    response = requests.post(infer_url(server), data=data, headers={"Content-Encoding": encoding}, timeout=10)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
    # and on a route other than infer (the OpenAI one here)
    chat = json.dumps({"model": "echo_chat", "messages": [{"role": "user", "content": "zipped"}]}).encode()
    response = requests.post(f"{server.base_url}/v1/chat/completions", data=gzip.compress(chat),
                             headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 200 and "zipped" in response.json()["choices"][0]["message"]["content"]


def test_tritonclient_compression_is_served(server):
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    for algorithm in ("gzip", "deflate"):
        result = client.infer("identity_fp32", [tensor], request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize(("data", "encoding", "expected"), [
    (gzip.compress(b'{"inputs": []}')[:-12], "gzip", "truncated"),
    (b"not gzip at all", "gzip", "not valid gzip"),
    (zlib.compress(b"{}") + b"trailing", "deflate", "after the end"),
    (b"{}", "br", "unsupported Content-Encoding 'br'"),
], ids=["truncated", "not-gzip", "trailing-data", "unsupported"])
def test_bad_compressed_bodies_are_400(server, data, encoding, expected):
    response = requests.post(infer_url(server), data=data, headers={"Content-Encoding": encoding}, timeout=10)
    assert response.status_code == 400 and expected in response.json()["error"], response.text


# --- JSON nesting ---------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def test_json_nested_past_the_limit_is_400_on_every_route(server):
    deep = '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": ' + nested(40) + "}]}"
    response = requests.post(infer_url(server), data=deep, timeout=10)
    assert response.status_code == 400
    assert "32 levels" in response.json()["error"] and "--max-json-depth" in response.json()["error"]
    for path in ("/v2/models/chat_echo/generate", "/MultiBackendService/Predict", "/"):
        response = requests.post(server.base_url + path, data='{"prompt": ' + nested(100) + "}", timeout=10)
        assert response.status_code == 400 and "--max-json-depth" in response.json()["error"], path


def test_openai_clients_get_the_depth_error_in_openai_shape(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model="echo_chat", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"deep": json.loads(nested(40))})
    assert error.value.status_code == 400 and "--max-json-depth" in error.value.message
    assert error.value.body["type"] == "invalid_request_error"


def test_brackets_inside_strings_do_not_count_as_nesting(server):
    prompt = "[" * 200 + '\\"{' * 50 + "]" * 200
    body = {"model": "echo_chat", "messages": [{"role": "user", "content": prompt}]}
    response = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200 and prompt in response.json()["choices"][0]["message"]["content"]


def test_json_at_the_depth_limit_is_served_and_one_deeper_is_not(server):
    """Object, inputs array, input object, then 29 levels of data: 32 levels in all."""
    body = '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": ' + nested(29) + "}]}"
    response = requests.post(infer_url(server), data=body, timeout=10)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.0]
    body = '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": ' + nested(30) + "}]}"
    response = requests.post(infer_url(server), data=body, timeout=10)
    assert response.status_code == 400 and "--max-json-depth" in response.json()["error"]


# --- tensor elements --------------------------------------------------------------------------


def test_json_tensor_past_the_element_limit_is_400(server):
    assert requests.post(infer_url(server), json=fp32_body([1.0] * 1000), timeout=10).status_code == 200
    response = requests.post(infer_url(server), json=fp32_body([1.0] * 1001), timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == ("input 'INPUT0' has 1001 elements, over the limit of 1000 elements "
                                        "per tensor (--max-tensor-elements)")


def test_declared_shape_past_the_element_limit_is_refused_before_decoding(server):
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [10**12], "data": [1.0]}]}
    response = requests.post(infer_url(server), json=body, timeout=10)
    assert response.status_code == 400 and "--max-tensor-elements" in response.json()["error"]


def test_binary_bytes_tensor_past_the_element_limit_is_400(server):
    """2000 empty BYTES elements (4 bytes each on the wire) in the binary extension."""
    raw = struct.pack("<I", 0) * 2000
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    response = requests.post(infer_url(server, "identity_bytes"), data=header + raw,
                             headers={"Inference-Header-Content-Length": str(len(header))}, timeout=10)
    assert response.status_code == 400
    assert "more elements than the limit of 1000" in response.json()["error"]


def test_grpc_tensor_past_the_element_limit_is_invalid_argument(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [1001], "FP32")
    tensor.set_data_from_numpy(np.ones(1001, dtype=np.float32))
    with pytest.raises(InferenceServerException) as error:
        client.infer("identity_fp32", [tensor])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "--max-tensor-elements" in error.value.message()


# --- gRPC messages and streams --------------------------------------------------------------


def test_grpc_message_over_the_limit_is_resource_exhausted(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [600_000], "FP32")  # 2.4 MB
    tensor.set_data_from_numpy(np.ones(600_000, dtype=np.float32))
    with pytest.raises(InferenceServerException) as error:
        client.infer("identity_fp32", [tensor])
    assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(MiB) in error.value.message()  # grpc names the limit: "... larger than max (2400xxx vs. 1048576)"
    assert_serving(server)


def test_a_stream_past_its_in_flight_limit_gets_errors_not_a_hang(server):
    """Five slow requests on one stream with a limit of 2: two are served, three get an
    error naming the limit at once; afterwards the same stream serves again."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        def send(request_id: str, seconds: float) -> None:
            tensor = grpcclient.InferInput("INPUT0", [1], "FP32")
            tensor.set_data_from_numpy(np.array([seconds], dtype=np.float32))
            client.async_stream_infer("slow", [tensor], request_id=request_id)

        for index in range(5):
            send(f"r{index}", 1.0)
        replies = [results.get(timeout=60) for _ in range(5)]
        errors = [error for _, error in replies if error is not None]
        served = [result for result, error in replies if error is None]
        assert len(served) == 2 and len(errors) == 3
        assert all("the limit is 2 (--grpc-max-stream-in-flight)" in error.message() for error in errors)
        send("again", 0.0)
        result, error = results.get(timeout=30)
        assert error is None and result.get_response().id == "again"
    finally:
        client.stop_stream()


# --- slow and many connections --------------------------------------------------------------


def test_trickled_bodies_do_not_stop_health_or_inference_and_time_out(server):
    """200 connections each announce a body and trickle one byte of it: health checks and
    inference go on meanwhile, and each trickled request is refused with 408 in the end."""
    socks = [open_trickle(server.http_port, "/v2/models/identity_fp32/infer", 1000) for _ in range(200)]
    try:
        for _ in range(5):
            assert requests.get(f"{server.base_url}/v2/health/ready", timeout=5).status_code == 200
            response = requests.post(infer_url(server), json=fp32_body([3.0]), timeout=5)
            assert response.status_code == 200
        for sock in socks[:3]:
            sock.sendall(b" ")  # still trickling
        response = read_response(socks[0], timeout=30)
        assert response.status == 408
        message = json.loads(response.body)["error"]
        assert "3 s" in message and "--request-body-timeout" in message
    finally:
        for sock in socks:
            sock.close()
    assert_serving(server)


def test_a_refused_body_does_not_disturb_the_next_requests(server):
    """After refusals of every kind, every kind of request is still served."""
    requests.post(infer_url(server), data=b"[" * 100, timeout=10)
    response, _ = push_body(server.http_port, "/v1/chat/completions", 20 * MiB)
    assert response.status == 413 and json.loads(response.body)["error"]["type"] == "invalid_request_error"
    assert_serving(server)
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="echo_chat", messages=[{"role": "user", "content": "still here"}])
    assert "still here" in reply.choices[0].message.content


@pytest.mark.parametrize("request_line", [b"GET /v2/health/ready HTTP/1.1",
                                          b"POST /v2/models/identity_fp32/infer HTTP/1.1"],
                         ids=["uvicorn-path", "plain-infer-path"])
def test_a_huge_request_head_is_431_and_a_trickled_one_408(server, request_line):
    """uvicorn alone reads a request head of any size (quadratic time in httptools) and
    waits for it forever: 200 MB of one header and a head sent a byte at a time. KServe
    infer's head, which triserve's own protocol reads, has the same limits."""
    before = rss(server.proc.pid)
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 200 * MiB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"a" * MiB)
                sent += MiB
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = read_response(sock, timeout=10)
    assert response.status == 431 and "64 KiB" in json.loads(response.body)["error"]
    assert sent < 200 * MiB
    assert rss(server.proc.pid) - before < 32 * MiB

    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(request_line + b"\r\nX-Slow: ")
        assert requests.get(f"{server.base_url}/v2/health/ready", timeout=5).status_code == 200
        for _ in range(60):  # a byte every 0.25 s for up to 15 s (the limit is 3 s): no byte restarts the clock
            if select.select([sock], [], [], 0.25)[0]:
                break
            sock.sendall(b"a")
        response = read_response(sock, timeout=30)
    message = json.loads(response.body)["error"]
    assert response.status == 408 and "request head" in message and "--request-body-timeout" in message
    assert_serving(server)
