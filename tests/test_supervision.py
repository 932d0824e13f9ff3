"""Faults and overload against a real server: instance processes that die, execute and
initialize deadlines, the queue policy, request timeouts, priority levels, reshape.

The models are in ``tests/hardening_models``; ``crashy`` answers with its pid and dies
on request, and logs every ``initialize`` to ``$TRISERVE_TEST_STATE/<model>.init``.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serverproc import ServerProcess

TESTS = Path(__file__).parent
HARDENING_MODELS = TESTS / "hardening_models"


def build_repository(root: Path, names: list[str]) -> Path:
    repository = root / "repository"
    for name in names:
        source = HARDENING_MODELS / name
        if not source.is_dir():
            source = TESTS / "model_repository" / name
        shutil.copytree(source, repository / name)
    return repository


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(tmp_path_factory, state_dir):
    root = tmp_path_factory.mktemp("supervision")
    repository = build_repository(root, ["crashy", "hang", "reshape", "slow", "queue_timeout",
                                           "delay_order", "two_instances", "slow_unbounded", "priority_order"])
    with ServerProcess(repository, env={"TRISERVE_TEST_STATE": str(state_dir)}) as process:
        yield process


def action(name: str, text: str) -> httpclient.InferInput:
    tensor = httpclient.InferInput("ACTION", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def grpc_action(text: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("ACTION", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def pid_of(server, model: str = "crashy") -> int:
    with httpclient.InferenceServerClient(server.http_url) as client:
        return int(client.infer(model, [action(model, "pid")]).as_numpy("PID")[0])


def post_infer(server, model: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """A KServe infer over plain HTTP (tritonclient's HTTP client is not for threads)."""
    request = urllib.request.Request(f"{server.base_url}/v2/models/{model}/infer",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def watch_readiness(server, model: str, timeout: float = 60.0) -> tuple[bool, bool]:
    """Poll until the model is ready again; (model was seen not ready, server was seen not ready)."""
    model_down = server_down = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model_ready = http_status(f"{server.base_url}/v2/models/{model}/ready") == 200
        server_ready = http_status(f"{server.base_url}/v2/health/ready") == 200
        model_down |= not model_ready
        server_down |= not server_ready
        if model_down and model_ready and server_ready:
            return model_down, server_down
        time.sleep(0.02)
    raise AssertionError(f"model '{model}' did not come back within {timeout} s")


def restarts(server, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = f'triserve_instance_restarts_total{{model="{model}",version="1"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def init_count(state_dir: Path, model: str) -> int:
    path = state_dir / f"{model}.init"
    return len(path.read_text().split()) if path.exists() else 0


# --- supervision ----------------------------------------------------------------------------


def test_killed_idle_instance_is_restarted_and_readiness_follows(server, state_dir):
    pid = pid_of(server)
    inits, restarted = init_count(state_dir, "crashy"), restarts(server, "crashy")
    os.kill(pid, signal.SIGKILL)
    model_down, server_down = watch_readiness(server, "crashy")
    assert model_down and server_down  # strict readiness: no live instance, server not ready
    new_pid = pid_of(server)
    assert new_pid != pid
    assert init_count(state_dir, "crashy") == inits + 1  # initialize ran again
    assert restarts(server, "crashy") == restarted + 1
    assert f"instance 'crashy_0' process exited (exit code -9); restarting it" in server.log()


def test_killed_mid_request_fails_that_request_with_unavailable(server, state_dir):
    pid = pid_of(server)
    body = {"inputs": [{"name": "ACTION", "shape": [1], "datatype": "BYTES", "data": ["sleep:30"]}]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_infer, server, "crashy", body)
        busy = state_dir / f"{pid}.busy"
        deadline = time.monotonic() + 30
        while not busy.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert busy.exists()  # the request is executing in the instance now
        os.kill(pid, signal.SIGKILL)
        status, document = pending.result(timeout=30)
    assert status == 503
    assert "model 'crashy' instance 'crashy_0' process exited (exit code -9)" in document["error"]
    watch_readiness(server, "crashy")
    assert pid_of(server) != pid


def test_os_exit_inside_execute_over_grpc(server):
    pid = pid_of(server)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer("crashy", [grpc_action("exit:7")])
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        assert "instance 'crashy_0' process exited (exit code 7)" in error.value.message()
        # with no live instance (1.5 s: backoff, then a slow initialize) a request is refused at
        # once with the reason; only a stalled machine would let the restarted one answer it
        try:
            result = client.infer("crashy", [grpc_action("pid")])
        except InferenceServerException as refused:
            assert refused.status() == "StatusCode.UNAVAILABLE"
            assert "is not ready: no instance is running; it is being restarted" in refused.message()
        else:
            assert int(result.as_numpy("PID")[0]) != pid
        watch_readiness(server, "crashy")
        result = client.infer("crashy", [grpc_action("pid")])
    assert int(result.as_numpy("PID")[0]) != pid


def test_a_dead_instance_leaves_the_pool_while_its_sibling_serves(server):
    """two_instances: one killed, every request goes to the live one; the model stays ready."""
    body = {"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": [1.0]}]}

    def answers() -> list[tuple[int, dict]]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: post_infer(server, "two_instances", body), range(16)))

    live = {document["outputs"][0]["data"][0] for _, document in answers()}
    assert len(live) == 2  # concurrent requests use both instances
    victim = min(live)
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    after = answers()
    # none went to the dead instance (it would fail at once): its sibling (or, once back,
    # the restarted instance) served every one
    assert [status for status, _ in after] == [200] * 16
    served_by = {document["outputs"][0]["data"][0] for _, document in after}
    assert victim not in served_by and live - {victim} <= served_by
    assert http_status(f"{server.base_url}/v2/models/two_instances/ready") == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and f"model 'two_instances' instance" not in server.log():
        time.sleep(0.1)
    assert "model 'two_instances' instance 'two_instances_" in server.log()


def test_execute_past_its_deadline_fails_and_the_instance_is_recycled(server, state_dir):
    pid = pid_of(server, "hang")
    with httpclient.InferenceServerClient(server.http_url, network_timeout=60) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer("hang", [action("hang", "sleep:30")])
    assert error.value.status() == "503"
    assert "instance 'hang_0' execute did not return within 1 s" in error.value.message()
    watch_readiness(server, "hang")
    assert pid_of(server, "hang") != pid
    assert init_count(state_dir, "hang") == 2


# --- queue policy, request timeouts ----------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def overload(server, model: str, clients: int) -> tuple[list[str], list[float], int, int]:
    """``clients`` concurrent infers (half HTTP, half gRPC) while a thread checks health every
    50 ms; the outcome of each ("served" or "<status> <message>"), the health latencies, and the
    server's RSS (KiB) before and after."""
    # tritonclient HTTP clients of earlier tests are gevent objects: collect them here, on the
    # thread that made them, not in a worker thread below
    gc.collect()
    data = np.ones([1, 4], dtype=np.float32)
    rss_before = rss_kib(server.proc.pid)
    health_latencies: list[float] = []
    stop = threading.Event()

    def health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert http_status(f"{server.base_url}/v2/health/live") == 200
            health_latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    def one(index: int) -> str:
        if index % 2:
            status, document = post_infer(server, model, {"inputs": [
                {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": data.ravel().tolist()}]})
            return "served" if status == 200 else f"{status} {document['error']}"
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(data)
            try:
                client.infer(model, [tensor], client_timeout=120)
                return "served"
            except InferenceServerException as error:
                return f"{error.status()} {error.message()}"

    watcher = threading.Thread(target=health)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(one, range(clients)))
    finally:
        stop.set()
        watcher.join()
    rss_after = rss_kib(server.proc.pid)
    served = outcomes.count("served")
    latencies = sorted(health_latencies)
    print(f"\n{model}: {clients} clients, {served} served, {clients - served} refused; server RSS "
          f"{rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; health: {len(latencies)} checks, "
          f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    return outcomes, latencies, rss_before, rss_after


@pytest.mark.slow
def test_hundreds_of_clients_on_a_bounded_queue_are_all_answered(server):
    """400 concurrent clients, 1 slow instance, max_queue_size 16: every request is served or
    refused with 503 "Exceeds maximum queue size"; health checks keep answering."""
    outcomes, _, rss_before, rss_after = overload(server, "slow", 400)
    served = outcomes.count("served")
    refused = [o for o in outcomes if o != "served"]
    assert served >= 17  # at least the instance's work plus a full queue
    assert refused, "400 clients against a queue of 16 must see refusals"
    for outcome in refused:
        assert outcome.split(" ", 1)[0] in ("503", "StatusCode.UNAVAILABLE"), outcome
        assert "Exceeds maximum queue size" in outcome, outcome
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    (line,) = [line for line in metrics.splitlines() if line.startswith("nv_inference_request_failure{")
               and 'model="slow"' in line and 'reason="REJECTED"' in line]
    assert float(line.split()[-1]) == len(refused)  # counted as Triton counts them
    assert rss_after - rss_before < 300 * 1024  # bounded: refused requests leave nothing behind
    assert http_status(f"{server.base_url}/v2/health/ready") == 200


@pytest.mark.slow
def test_hundreds_of_clients_on_an_unbounded_queue_are_all_served(server):
    """300 concurrent clients queue behind one 10 ms instance (no queue policy): all served."""
    outcomes, latencies, rss_before, rss_after = overload(server, "slow_unbounded", 300)
    assert outcomes == ["served"] * 300
    assert len(latencies) > 1  # health checks answered while 300 requests waited
    assert rss_after - rss_before < 300 * 1024


def test_queue_timeout_rejects_with_tritons_error_and_a_request_may_shorten_it(server):
    """queue_timeout: 2 s per execute, queued requests expire after 3 s (REJECT); a request's
    own ``timeout`` (microseconds) shortens it."""
    data = np.ones([1, 2], dtype=np.float32)

    def send(timeout_us: int | None) -> str:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
            tensor.set_data_from_numpy(data)
            try:
                kwargs = {"timeout": timeout_us} if timeout_us is not None else {}
                client.infer("queue_timeout", [tensor], **kwargs)
                return "served"
            except InferenceServerException as error:
                return f"{error.status()} {error.message()}"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(send, None)  # executes at once, for 2 s
        time.sleep(0.3)
        short = pool.submit(send, 200_000)  # may wait 0.2 s: expires behind the first
        default = [pool.submit(send, None) for _ in range(2)]  # the second waits 3 s: expires
        outcomes = [first.result(), short.result(), *(f.result() for f in default)]
    assert outcomes[0] == "served"
    assert outcomes[1] == "StatusCode.UNAVAILABLE Request timeout expired"
    assert "served" in outcomes[2:]
    assert "StatusCode.UNAVAILABLE Request timeout expired" in outcomes[2:]


def test_request_timeout_without_a_queue_policy(server):
    """crashy has no dynamic_batching: a request's own ``timeout`` bounds its queue time."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(post_infer, server, "crashy", {"inputs": [
            {"name": "ACTION", "shape": [1], "datatype": "BYTES", "data": ["sleep:2"]}]})
        time.sleep(0.3)
        status, document = post_infer(server, "crashy", {"parameters": {"timeout": 200_000}, "inputs": [
            {"name": "ACTION", "shape": [1], "datatype": "BYTES", "data": ["pid"]}]})
        assert busy.result()[0] == 200
    assert (status, document["error"]) == (503, "Request timeout expired")


def test_timeout_action_delay_runs_expired_requests_after_the_others(server):
    def send(timeout_us: int | None) -> int:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
        if timeout_us is not None:
            body["parameters"] = {"timeout": timeout_us}
        status, document = post_infer(server, "delay_order", body)
        assert status == 200, document
        return document["outputs"][0]["data"][0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(send, None)
        time.sleep(0.3)
        expires = pool.submit(send, 100_000)  # expires while the first runs: delayed
        time.sleep(0.2)
        patient = pool.submit(send, None)
        orders = [first.result(), expires.result(), patient.result()]
    assert orders[1] == orders[0] + 2 and orders[2] == orders[0] + 1


# --- priority levels ------------------------------------------------------------------------


def test_a_high_priority_request_is_served_before_the_queued_low_ones(server):
    """priority_order: 1 instance, priority_levels 2 (default 2). While a 3 s request runs, three
    low-priority requests queue (HTTP ``parameters``), then a high one arrives (tritonclient gRPC
    ``priority=1``): it runs next, the low ones after it in their order."""
    def post(seconds: float, priority: int | None) -> int:
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [seconds]}]}
        if priority is not None:
            body["parameters"] = {"priority": priority}
        status, document = post_infer(server, "priority_order", body)
        assert status == 200, document
        return document["outputs"][0]["data"][0]

    def grpc_high() -> int:
        tensor = grpcclient.InferInput("INPUT0", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[0.1]], dtype=np.float32))
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            return int(client.infer("priority_order", [tensor], priority=1).as_numpy("ORDER")[0][0])

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        running = pool.submit(post, 3.0, None)
        time.sleep(0.5)
        low = [pool.submit(post, 0.1, priority) for priority in (2, 0, None)]  # 0 and none: the default, 2
        time.sleep(0.7)
        high = pool.submit(grpc_high)
        first, lows, high = running.result(), [future.result() for future in low], high.result()
    assert high == first + 1, (first, high, lows)
    assert sorted(lows) == [first + 2, first + 3, first + 4]


def test_a_priority_out_of_range_is_refused_naming_it(server):
    body = {"parameters": {"priority": 3},
            "inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}
    status, document = post_infer(server, "priority_order", body)
    assert status == 400
    assert "'priority' 3 is out of range" in document["error"] and "priority_levels is 2" in document["error"]
    status, document = post_infer(server, "priority_order", {**body, "parameters": {"priority": "high"}})
    assert status == 400 and "'priority' must be a non-negative integer" in document["error"]
    tensor = grpcclient.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[0.0]], dtype=np.float32))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("priority_order", [tensor], priority=7)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'priority' 7 is out of range" in refused.value.message()
        # the model still serves
        assert client.infer("priority_order", [tensor], priority=1).as_numpy("ORDER") is not None


# --- reshape ------------------------------------------------------------------------------


def test_reshape_both_ways_over_http_and_grpc(server):
    data = np.arange(8, dtype=np.int32).reshape(2, 4)
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput("INPUT0", [2, 4], "INT32")
        tensor.set_data_from_numpy(data)
        result = client.infer("reshape", [tensor])
    assert result.as_numpy("SEEN_SHAPE").tolist() == [[2, 2, 2], [2, 2, 2]]  # the model saw [2, 2]
    assert result.as_numpy("OUTPUT0").shape == (2, 4)  # the client gets dims back
    assert result.as_numpy("OUTPUT0").tolist() == (data * 10).tolist()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("INPUT0", [1, 4], "INT32")
        tensor.set_data_from_numpy(data[:1])
        result = client.infer("reshape", [tensor])
        assert result.get_response().outputs[0].shape == [1, 4]
        assert result.as_numpy("OUTPUT0").tolist() == [[0, 10, 20, 30]]
        metadata = client.get_model_metadata("reshape", as_json=True)
    assert metadata["inputs"][0]["shape"] == ["-1", "4"]
