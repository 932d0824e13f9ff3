"""triserve's own HTTP/2 gRPC server (frontends/grpc/h2.py) where the wire itself matters.

Every other gRPC test runs on it too (it is the default); these cover what only a transport
can get wrong: deadlines and cancellation reaching the model, messages larger than the
HTTP/2 flow-control windows and frames, compressed requests, many calls multiplexed on one
connection, a client that sends garbage, and ``--grpc-server grpcio`` kept working.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import TEST_REPOSITORY
from serverproc import ServerProcess


def bytes_input(name: str, items: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_))
    return tensor


@pytest.fixture(scope="module")
def client(core_server):
    with grpcclient.InferenceServerClient(core_server.grpc_url) as triton:
        yield triton


def cancelled_count(client) -> int:
    result = client.infer("cancellable", [bytes_input("INPUT0", [b"__cancelled__"])])
    return int(result.as_numpy("OUTPUT0")[0])


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the model never got the request"
        time.sleep(0.01)


def test_a_passed_deadline_ends_the_call_and_cancels_the_inference(client, tmp_path):
    before = cancelled_count(client)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("cancellable", [bytes_input("INPUT0", [f"60 {tmp_path / 'began'}".encode()])],
                     client_timeout=1.0)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert (tmp_path / "began").exists()
    # the model polls is_cancelled(): it answers the count only once the cancelled request returned
    assert cancelled_count(client) == before + 1
    assert time.monotonic() - started < 30  # not the 60 s the request asked the model to wait


def test_a_client_cancelling_a_call_cancels_the_inference(core_server, client, tmp_path):
    before = cancelled_count(client)
    began = tmp_path / "began"
    request = service_pb2.ModelInferRequest(model_name="cancellable")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(f"60 {began}".encode())
    with grpc.insecure_channel(core_server.grpc_url) as channel:
        future = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request)
        wait_for(began)
        assert future.cancel()  # RST_STREAM on the wire
    assert cancelled_count(client) == before + 1


@pytest.mark.parametrize("size", [3 * 1024 * 1024 + 7, 20 * 1024 * 1024])
def test_messages_larger_than_the_windows_and_frames_arrive_whole(client, size):
    # 16 MiB stream windows, 64 KiB client windows at first, 16 KiB-1 MiB frames: many of each
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    result = client.infer("identity_bytes", [bytes_input("INPUT0", [payload, b"tail"])])
    assert result.as_numpy("OUTPUT0").tolist() == [payload, b"tail"]


def test_large_calls_in_parallel_share_the_connection_window(client):
    payloads = [bytes([i]) * (6 * 1024 * 1024) for i in range(4)]
    answers: dict[int, list] = {}

    def call(i: int) -> None:
        answers[i] = client.infer("identity_bytes", [bytes_input("INPUT0", [payloads[i]])]).as_numpy("OUTPUT0")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {i: answer.tolist() for i, answer in answers.items()} == {i: [payloads[i]] for i in range(4)}


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_read(client, algorithm):
    text = ("compress me " * 1000).encode()
    result = client.infer("identity_bytes", [bytes_input("INPUT0", [text])], compression_algorithm=algorithm)
    assert result.as_numpy("OUTPUT0").tolist() == [text]


def test_many_calls_multiplexed_on_one_connection_each_get_their_own_answer(client):
    answers: dict[str, bytes] = {}
    done = threading.Semaphore(0)
    count = 200

    def callback(result, error):
        answers[result.get_response().id if error is None else str(error)] = (
            None if error is not None else result.as_numpy("OUTPUT0")[0])
        done.release()

    for i in range(count):
        client.async_infer("identity_bytes", [bytes_input("INPUT0", [f"call {i}".encode()])],
                           callback=callback, request_id=str(i))
    for _ in range(count):
        assert done.acquire(timeout=60)
    assert answers == {str(i): f"call {i}".encode() for i in range(count)}


def http2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(4, 0, 0) + http2_frame(1, 4, 0, b"\x82"),  # HEADERS on stream 0
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(4, 0, 0) + http2_frame(1, 4, 1, b"\xff\xff\xff\xff\x7f"),  # bad HPACK
])
def test_a_client_sending_garbage_is_disconnected_and_others_are_served(core_server, client, garbage):
    with socket.create_connection(("127.0.0.1", core_server.grpc_port), timeout=10) as sock:
        sock.sendall(garbage)
        answer = read_until_closed(sock)  # the server closes the connection
    if garbage.startswith(b"PRI"):
        # its last frame is a GOAWAY (type 7) with an error code: PROTOCOL_ERROR or COMPRESSION_ERROR
        goaway = answer.rfind(b"\x07\x00\x00\x00\x00\x00")
        assert goaway >= 3
        code = struct.unpack(">I", answer[goaway + 10:goaway + 14])[0]
        assert code in (0x1, 0x9)
    result = client.infer("identity_bytes", [bytes_input("INPUT0", [b"still here"])])
    assert result.as_numpy("OUTPUT0").tolist() == [b"still here"]


def test_an_unknown_method_is_unimplemented(core_server):
    with grpc.insecure_channel(core_server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpcio_server_stays_selectable():
    with ServerProcess(TEST_REPOSITORY, args=["--grpc-server", "grpcio", "--model-control-mode", "explicit",
                                              "--load-model", "identity_bytes"]) as server:
        assert f"gRPC (grpcio) on 127.0.0.1:{server.grpc_port}" in server.log()
        with grpcclient.InferenceServerClient(server.grpc_url) as triton:
            text = uuid.uuid4().hex.encode()
            result = triton.infer("identity_bytes", [bytes_input("INPUT0", [text])])
            assert result.as_numpy("OUTPUT0").tolist() == [text]


def test_metadata_past_one_frame_is_read_and_past_the_limit_refuses_only_that_call(core_server, tmp_path):
    request = service_pb2.ModelInferRequest(model_name="cancellable")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(f"1 {tmp_path / 'began'}".encode())
    with grpc.insecure_channel(core_server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        running = stub.ModelInfer.future(request, timeout=60)  # in flight on the same connection
        wait_for(tmp_path / "began")
        # 40 KB of metadata crosses 16 KiB frames: HEADERS + CONTINUATION
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=[("x-big", "a" * 40000)],
                               timeout=10).live
        with pytest.raises(grpc.RpcError) as caught:
            stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=[("x-big", "a" * 70000)], timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "65536" in caught.value.details()
        answer = running.result()  # the call in flight on the connection was answered as usual
        assert answer.raw_output_contents[0] == struct.pack("<I", 13) + b"not cancelled"
