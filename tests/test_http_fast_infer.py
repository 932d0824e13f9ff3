"""KServe ``POST .../infer`` answered by triserve's HTTP protocol itself (no ASGI cycle):
what a client sees on the wire must be what any other request gets. Raw sockets for
what ordinary clients do not do (pipelining, one byte per write, leaving mid-pipeline),
tritonclient for connection reuse, a second server for the API key and the access log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient

from conftest import TEST_REPOSITORY
from rawhttp import make_repository, read_next_response
from serverproc import ServerProcess
from test_python_backend import cancelled_so_far, wait_for_file


def infer_request(model: str, values: list[float], *, version: str = "", extra_headers: str = "") -> bytes:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [len(values)],
                                   "data": values}]}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra_headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def answer(stream) -> tuple[int, dict[str, str], bytes]:
    """The next response on the connection: status, headers (lower-case names), body."""
    response = read_next_response(stream)
    return response.status, response.headers, response.body


def outputs(body: bytes) -> list[float]:
    return json.loads(body)["outputs"][0]["data"]


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_pipelined_infer_requests_are_answered_in_order(core_server):
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"".join(infer_request("identity_fp32", [float(i), -1.0]) for i in range(20)))
        for i in range(20):
            status, headers, body = answer(stream)
            assert status == 200 and headers["content-type"] == "application/json"
            assert outputs(body) == [float(i), -1.0]


def test_infer_and_other_requests_pipelined_keep_their_order(core_server):
    requests = [
        (get_request("/v2/health/ready"), 200, None),
        (infer_request("identity_fp32", [1.0]), 200, [1.0]),
        (get_request("/v2/models/identity_fp32"), 200, "identity_fp32"),
        (infer_request("no_such_model", [2.0]), 404, "no_such_model"),
        (infer_request("identity_fp32", [3.0], version="1"), 200, [3.0]),
        (get_request("/v2/no/such/route"), 404, "/v2/no/such/route"),
        (infer_request("identity_fp32", [4.0], extra_headers="Content-Encoding: identity\r\n"), 200, [4.0]),
        (infer_request("identity_fp32", [5.0]), 200, [5.0]),
    ]
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"".join(request for request, _, _ in requests))
        for request, status, expected in requests:
            got_status, _, body = answer(stream)
            assert got_status == status, (request[:60], body)
            if isinstance(expected, list):
                assert outputs(body) == expected
            elif isinstance(expected, str):
                assert expected in body.decode()


def test_a_request_split_into_single_byte_writes_is_answered(core_server):
    binary = np.array([1.5, 2.5, -3.0], dtype=np.float32).tobytes()
    document = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3],
                                       "parameters": {"binary_data_size": len(binary)}}],
                           "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    body = document + binary
    request = (f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: t\r\n"
               f"Inference-Header-Content-Length: {len(document)}\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        for i in range(len(request)):
            sock.send(request[i:i + 1])
            time.sleep(0.0005)
        status, headers, reply = answer(stream)
    assert status == 200
    json_length = int(headers["inference-header-content-length"])
    assert json.loads(reply[:json_length])["outputs"][0]["parameters"]["binary_data_size"] == len(binary)
    assert reply[json_length:] == binary


def test_connection_close_and_http_1_0_end_the_connection_after_the_answer(core_server):
    for request in (infer_request("identity_fp32", [7.0], extra_headers="Connection: close\r\n"),
                    infer_request("identity_fp32", [7.0]).replace(b"HTTP/1.1", b"HTTP/1.0", 1)):
        with connect(core_server) as sock, sock.makefile("rb") as stream:
            sock.sendall(request + infer_request("identity_fp32", [8.0]))  # the second is never answered
            status, headers, body = answer(stream)
            assert status == 200 and outputs(body) == [7.0]
            assert headers["connection"] == "close"
            assert stream.read() == b""  # closed by the server


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(core_server):
    """Between two requests a connection may idle 5 s (uvicorn's keep-alive timeout), then the
    server closes it: idle connections do not pile up. A request in time keeps it open."""
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(infer_request("identity_fp32", [1.0]))
        assert answer(stream)[0] == 200
        time.sleep(2)
        sock.sendall(infer_request("identity_fp32", [2.0]))
        status, _, body = answer(stream)
        assert status == 200 and outputs(body) == [2.0]
        idle_since = time.monotonic()
        assert stream.read() == b""  # closed by the server (the socket's timeout is 30 s)
        assert time.monotonic() - idle_since < 15


def test_the_server_sleeps_once_requests_stop(core_server):
    """Busy polling (``--busy-poll-us``, on by default) keeps the event loop awake only right
    after a model process was written to or answered: once requests stop, the server process
    spends no CPU (a loop left spinning would spend a whole core)."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{core_server.http_port}")
    tensor = httpclient.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    for _ in range(200):
        client.infer("identity_fp32", [tensor])
    client.close()
    server = psutil.Process(core_server.proc.pid)
    time.sleep(0.5)
    before = sum(server.cpu_times()[:2])
    time.sleep(2)
    assert sum(server.cpu_times()[:2]) - before < 0.2  # seconds of CPU in 2 s: asleep, not spinning


def test_expect_100_continue_is_honoured(core_server):
    request = infer_request("identity_fp32", [9.0], extra_headers="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(head + b"\r\n\r\n")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
        sock.sendall(body)
        status, _, reply = answer(stream)
    assert status == 200 and outputs(reply) == [9.0]


def test_large_pipelined_answers_arrive_whole_to_a_slow_reader(core_server):
    """Three 16 MB answers queued on one connection, read slowly: flow control holds the
    later ones back and every byte arrives, in order."""
    values = [np.arange(4 << 20, dtype=np.float32) + i for i in range(3)]
    requests = []
    for array in values:
        raw = array.tobytes()
        document = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [array.size],
                                           "parameters": {"binary_data_size": len(raw)}}],
                               "parameters": {"binary_data_output": True}}).encode()
        requests.append((f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: t\r\n"
                         f"Inference-Header-Content-Length: {len(document)}\r\n"
                         f"Content-Length: {len(document) + len(raw)}\r\n\r\n").encode() + document + raw)
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        # sent from a thread: the server stops reading while it answers (its pipeline), and
        # the answers fill the socket until this reader reads
        sender = threading.Thread(target=sock.sendall, args=(b"".join(requests),))
        sender.start()
        time.sleep(1.0)  # the server writes until the socket is full, then waits for the reader
        for array in values:
            status, headers, body = answer(stream)
            assert status == 200
            json_length = int(headers["inference-header-content-length"])
            assert body[json_length:] == array.tobytes()
            time.sleep(0.2)
        sender.join()


def test_tritonclient_reuses_one_connection(core_server):
    server_process = psutil.Process(core_server.proc.pid)

    def established() -> int:
        return sum(1 for c in server_process.net_connections("tcp")
                   if c.laddr.port == core_server.http_port and c.status == psutil.CONN_ESTABLISHED)

    before = established()
    with httpclient.InferenceServerClient(core_server.http_url, concurrency=1) as client:
        for i in range(30):
            tensor = httpclient.InferInput("INPUT0", [2], "FP32")
            tensor.set_data_from_numpy(np.array([i, i + 1], dtype=np.float32), binary_data=i % 2 == 0)
            result = client.infer("identity_fp32", [tensor])
            assert result.as_numpy("OUTPUT0").tolist() == [i, i + 1]
        assert established() == before + 1


def cancellable_request(text: str) -> bytes:
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1], "data": [text]}]}).encode()
    return (f"POST /v2/models/cancellable/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def test_leaving_mid_pipeline_cancels_the_work_and_drops_the_queued_request(core_server, tmp_path):
    client = httpclient.InferenceServerClient(core_server.http_url)
    before = cancelled_so_far(client)
    first, second = tmp_path / "first", tmp_path / "second"
    with connect(core_server) as sock:
        sock.sendall(cancellable_request(f"60 {first}") + cancellable_request(f"60 {second}"))
        wait_for_file(first)
    # the model saw the first cancelled (without it, the count would come 60 s later, unchanged)
    assert cancelled_so_far(client) == before + 1
    client.close()
    assert not second.exists()  # the queued request of a connection that went away never ran


def test_leaving_mid_body_leaves_the_server_serving(core_server):
    request = infer_request("identity_fp32", [1.0, 2.0])
    with connect(core_server) as sock:
        sock.sendall(request[:-5])
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(request)
        status, _, body = answer(stream)
    assert status == 200 and outputs(body) == [1.0, 2.0]


@pytest.fixture(scope="module")
def keyed_server():
    with ServerProcess(TEST_REPOSITORY, args=["--api-key", "sesame", "--log-verbose", "1"],
                       headers={"Authorization": "Bearer sesame"}) as server:
        yield server


def test_the_api_key_and_the_access_log_apply_to_pipelined_infer(keyed_server):
    with connect(keyed_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(infer_request("identity_fp32", [1.0], extra_headers="Authorization: Bearer sesame\r\n")
                     + infer_request("identity_fp32", [2.0], version="1",
                                     extra_headers="Authorization: Bearer sesame\r\n")
                     + infer_request("identity_fp32", [3.0]))
        assert [answer(stream)[0] for _ in range(2)] == [200, 200]
        status, headers, body = answer(stream)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
        assert "error" in json.loads(body)
        assert stream.read() == b""
    for _ in range(100):
        log = keyed_server.log()
        if log.count('"POST /v2/models/identity_fp32') >= 3:
            break
        time.sleep(0.05)
    assert '"POST /v2/models/identity_fp32/infer HTTP/1.1" 200' in log
    assert '"POST /v2/models/identity_fp32/versions/1/infer HTTP/1.1" 200' in log
    assert '"POST /v2/models/identity_fp32/infer HTTP/1.1" 401' in log


def test_binary_request_through_struct_framed_bytes(core_server):
    """BYTES over the binary extension (4-byte length prefixes), as perf_analyzer sends them."""
    elements = [b"hello", b"", "wörld".encode()]
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    document = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [3],
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
    request = (f"POST /v2/models/identity_bytes/infer HTTP/1.1\r\nHost: t\r\n"
               f"Inference-Header-Content-Length: {len(document)}\r\nContent-Length: {len(document) + len(raw)}"
               "\r\n\r\n").encode() + document + raw
    with connect(core_server) as sock, sock.makefile("rb") as stream:
        sock.sendall(request * 3)
        for _ in range(3):
            status, _, body = answer(stream)
            assert status == 200 and outputs(body) == ["hello", "", "wörld"]


def test_sigterm_waits_for_an_infer_in_flight(tmp_path):
    """Graceful shutdown: the answer being computed still arrives, whole; the request queued
    behind it on the connection is refused as shutting down; then the connection closes."""
    repository = make_repository(tmp_path / "repository", [], slow=True)
    server = ServerProcess(repository).start()
    try:
        with connect(server) as sock, sock.makefile("rb") as stream:
            sock.sendall(infer_request("slow", [1.5, 2.0]) + infer_request("slow", [0.0]))
            time.sleep(0.5)  # the model is sleeping on the first
            os.kill(server.proc.pid, signal.SIGTERM)
            status, _, body = answer(stream)
            assert status == 200 and outputs(body) == [1.5, 2.0]
            status, _, body = answer(stream)
            assert status == 503 and "shutting down" in json.loads(body)["error"]
            assert stream.read() == b""
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
