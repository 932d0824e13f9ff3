"""A client that stops reading a stream holds the model back instead of growing the server.

``flood`` (tests/hardening_models) is a decoupled Python model that sends COUNT responses of
SIZE bytes as fast as the server takes them, and records how many it sent. A raw HTTP client
of ``generate_stream`` and a tritonclient gRPC stream whose callback blocks stop reading
after the first response: the model's ``response_sender.send`` is then held back (its count
stops far below COUNT), the server's RSS stays bounded, other requests are served meanwhile,
and after ``--stream-stall-timeout`` the request is cancelled with an error saying why (the
model sees the cancellation and stops) and the model serves the next request.
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

import rawhttp
from serverproc import ServerProcess

MiB = 1 << 20
COUNT = 2000  # responses asked for: 2000 MiB, were they all kept
SIZE = MiB
STALL_TIMEOUT = 4.0
HELD_AT_MOST = 56  # responses the model gets out while its client does not read (16 MiB held + buffers on the way)
RSS_GROWTH_AT_MOST = 64 * MiB


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flood-state")


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_dir):
    repository = tmp_path_factory.mktemp("backpressure")
    shutil.copytree(rawhttp.TESTS / "hardening_models" / "flood", repository / "flood")
    shutil.copytree(rawhttp.TESTS / "model_repository" / "identity_fp32", repository / "identity_fp32")
    args = ["--stream-stall-timeout", str(STALL_TIMEOUT)]
    with ServerProcess(repository, args=args, env={"TRISERVE_TEST_STATE": str(state_dir)}) as process:
        yield process


def sent(state_dir: Path) -> int:
    try:
        return int((state_dir / "flood_sent").read_text() or 0)
    except FileNotFoundError:
        return 0


def held_back(state_dir: Path) -> int:
    """Wait until the model's count stops moving for a second; that count."""
    last = -1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = sent(state_dir)
        if now == last and now > 0:
            return now
        last = now
        time.sleep(1.0)
    raise AssertionError(f"the model was never held back: it sent {sent(state_dir)} responses")


def others_are_served(server) -> None:
    response = requests.post(f"{server.base_url}/v2/models/identity_fp32/infer", timeout=10, json={
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1, 2]}]})
    assert response.status_code == 200, response.text
    assert requests.get(f"{server.base_url}/v2/health/ready", timeout=10).status_code == 200


def flood_serves_again(server) -> None:
    response = requests.post(f"{server.base_url}/v2/models/flood/generate_stream",
                             json={"COUNT": 3, "SIZE": 5}, timeout=30)
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and len(events) == 3, response.text[:300]
    assert json.loads(events[0][len("data: "):])["DATA"] == "xxxxx"


def test_an_sse_client_that_stops_reading_holds_the_model_back(server, state_dir):
    (state_dir / "flood_sent").unlink(missing_ok=True)
    before = rawhttp.rss(server.proc.pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", server.http_port))
    with sock:
        body = json.dumps({"COUNT": COUNT, "SIZE": SIZE}).encode()
        sock.sendall(rawhttp.request_head(server.http_port, "/v2/models/flood/generate_stream",
                                          {"Content-Type": "application/json", "Content-Length": str(len(body))})
                     + body)
        head = sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        # ... and the client reads nothing more
        held = held_back(state_dir)
        assert held <= HELD_AT_MOST, f"{held} responses of {SIZE} bytes left the model while no one read them"
        assert rawhttp.rss(server.proc.pid) - before < RSS_GROWTH_AT_MOST
        others_are_served(server)

        time.sleep(STALL_TIMEOUT)  # the request is cancelled meanwhile
        # the client reads again: what waited comes, then the error event
        sock.settimeout(30)
        received = bytearray(head)
        while chunk := sock.recv(1 << 20):
            received += chunk
            if received.endswith(b"0\r\n\r\n"):  # the chunked body's end
                break
    events = [line for line in bytes(received).split(b"\n") if line.startswith(b"data: ")]
    last = json.loads(events[-1][len(b"data: "):])
    assert "error" in last, (len(events), bytes(received[-300:]), {k: str(v)[:50] for k, v in last.items()})
    error = last["error"]
    assert "--stream-stall-timeout" in error and "cancelled the request" in error
    assert len(events) - 1 <= HELD_AT_MOST
    stopped = sent(state_dir)
    time.sleep(0.5)
    assert sent(state_dir) == stopped < COUNT  # the model saw the cancellation and stopped
    flood_serves_again(server)


def test_a_grpc_stream_that_stops_reading_holds_the_model_back(server, state_dir):
    (state_dir / "flood_sent").unlink(missing_ok=True)
    before = rawhttp.rss(server.proc.pid)
    results: queue.Queue = queue.Queue()
    reading = threading.Event()

    def callback(result, error) -> None:
        results.put((result, error))
        reading.wait()  # the client stops reading: this is tritonclient's stream reader thread

    inputs = []
    for name, value in (("COUNT", COUNT), ("SIZE", SIZE)):
        tensor = grpcclient.InferInput(name, [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback)
        client.async_stream_infer("flood", inputs, request_id="flood-1")
        held = held_back(state_dir)
        assert held <= HELD_AT_MOST, f"{held} responses of {SIZE} bytes left the model while no one read them"
        assert rawhttp.rss(server.proc.pid) - before < RSS_GROWTH_AT_MOST
        others_are_served(server)

        time.sleep(STALL_TIMEOUT)  # the request is cancelled meanwhile
        reading.set()
        outcomes = []
        while True:
            result, error = results.get(timeout=30)
            outcomes.append((result, error))
            if error is not None:
                break
    finally:
        reading.set()
        client.stop_stream()
        client.close()
    assert "--stream-stall-timeout" in str(error) and "cancelled the request" in str(error)
    assert all(result.as_numpy("DATA")[0] == b"x" * SIZE for result, _ in outcomes[:-1])
    assert len(outcomes) - 1 <= HELD_AT_MOST
    stopped = sent(state_dir)
    time.sleep(0.5)
    assert sent(state_dir) == stopped < COUNT
    flood_serves_again(server)
