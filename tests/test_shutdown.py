"""Graceful stop against a real server: SIGTERM with streams in flight (HTTP SSE and gRPC).

New requests are refused at once (UNAVAILABLE), a stream that finishes within
``--drain-timeout`` ends normally, a longer one ends with a final error event or
status rather than a cut connection, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serverproc import ServerProcess
from test_supervision import build_repository, http_status


def stream_input(prompt: str, delay: float) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    pause = grpcclient.InferInput("delay", [1], "FP32")
    pause.set_data_from_numpy(np.array([delay], dtype=np.float32))
    return [text, pause]


def grpc_stream(server, prompt: str, delay: float, events: queue.Queue) -> grpcclient.InferenceServerClient:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer("slow_stream", stream_input(prompt, delay))
    return client


def sse_stream(server, prompt: str, delay: float, events: list, first: threading.Event) -> None:
    body = json.dumps({"prompt": prompt, "delay": delay}).encode()
    request = urllib.request.Request(f"{server.base_url}/v2/models/slow_stream/generate_stream", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                first.set()


@pytest.mark.slow
def test_sigterm_drains_streams_then_ends_the_rest_with_an_error(tmp_path):
    repository = build_repository(tmp_path, ["slow_stream"])
    config = repository / "slow_stream" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 3"))
    server = ServerProcess(repository, args=["--drain-timeout", "3"]).start()
    try:
        long_words = " ".join(f"w{i}" for i in range(60))  # 60 x 0.25 s: outlives the drain
        sse_events: list = []
        sse_started = threading.Event()
        sse = threading.Thread(target=sse_stream, args=(server, long_words, 0.25, sse_events, sse_started))
        sse.start()
        long_grpc: queue.Queue = queue.Queue()
        short_grpc: queue.Queue = queue.Queue()
        long_client = grpc_stream(server, long_words, 0.25, long_grpc)
        short_client = grpc_stream(server, "one two three", 0.6, short_grpc)
        assert sse_started.wait(30)
        first_long = long_grpc.get(timeout=30)
        assert first_long[1] is None
        first_short = short_grpc.get(timeout=30)
        assert first_short[1] is None

        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        # new requests are refused at once while the running ones finish
        request = urllib.request.Request(
            f"{server.base_url}/v2/models/slow_stream/generate_stream",
            json.dumps({"prompt": "late", "delay": 0.0}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        assert "shutting down" in json.loads(refused.value.read())["error"]
        assert http_status(f"{server.base_url}/v2/health/ready") == 400  # not ready, as Triton says it
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert not client.is_server_ready()
            with pytest.raises(InferenceServerException) as grpc_refused:
                client.infer("slow_stream", stream_input("late", 0.0))
        assert "shutting down" in grpc_refused.value.message()

        # the short stream finishes normally within the drain timeout
        short = [short_grpc.get(timeout=30) for _ in range(2)]
        assert [error for _, error in short] == [None, None]
        words = [first_short[0].as_numpy("word")[0]] + [r.as_numpy("word")[0] for r, _ in short]
        assert words == [b"one", b"two", b"three"]

        # the long gRPC stream ends with an error response naming the drain timeout
        long_results = []
        while True:
            result, error = long_grpc.get(timeout=30)
            if error is not None:
                break
            long_results.append(result)
        assert "did not finish within the drain timeout of 3 s" in error.message()
        assert 0 < len(long_results) < 59

        assert server.proc.wait(timeout=60) == 0
        sse.join(timeout=30)
        assert not sse.is_alive()
        # the SSE stream ends with an error event, not a cut connection
        assert "error" in sse_events[-1]
        assert "drain timeout" in sse_events[-1]["error"]
        assert 1 < len(sse_events) < 60
        log = server.log()
        assert "get up to 3 s to finish" in log and "triserve stopped" in log
        long_client.close()
        short_client.close()
    finally:
        server.stop()
