"""Triton Python-backend models (tests/model_repository) served by a real triserve process.

Everything goes through the official tritonclient (gRPC and HTTP) or the raw gRPC
stubs the seed's client used; EXECUTION_ENV_PATH tests start their own server on
a temporary repository with a venv-style environment built on the spot.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import sys
import sysconfig
import tarfile
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from serverproc import ServerProcess
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

SEED_HISTORY = ["你知道鸡兔同笼问题么", "鸡兔同笼问题是一个经典的数学问题。"]


@pytest.fixture(scope="module")
def grpc_client(core_server):
    with grpcclient.InferenceServerClient(core_server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def http_client(core_server):
    with httpclient.InferenceServerClient(core_server.http_url, concurrency=16) as client:
        yield client


def fp32_input(client_module, values: list[float], name: str = "INPUT0"):
    array = np.array(values, dtype=np.float32)
    tensor = client_module.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def bytes_input(client_module, name: str, values: list[str]):
    array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    tensor = client_module.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def test_chat_echo_answers_the_seed_client_request(core_server):
    """The seed's gRPC request: bytes_contents, history with shape [-1], outputs read raw."""
    request = service_pb2.ModelInferRequest(model_name="chat_echo")
    for name, shape, values in [("prompt", [1], ["请给出一个具体示例"]), ("history", [-1], SEED_HISTORY),
                                ("temperature", [1], ["0.01"]), ("max_token", [1], ["16000"]),
                                ("history_len", [1], ["10"])]:
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=shape)
        tensor.contents.bytes_contents.extend(v.encode("utf-8") for v in values)
    request.outputs.add(name="response")
    request.outputs.add(name="history")
    with grpc.insecure_channel(core_server.grpc_url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)

    outputs = {o.name: (list(o.shape), deserialize_bytes_tensor(raw))
               for o, raw in zip(reply.outputs, reply.raw_output_contents)}
    response_shape, response = outputs["response"]
    history_shape, history = outputs["history"]
    expected = "echo: 请给出一个具体示例 (temperature=0.01, max_token=16000)"
    assert (response_shape, response[0].decode()) == ([], expected)  # the model's 0-d str array
    assert history_shape == [2, 2]
    assert [h.decode() for h in history] == [*SEED_HISTORY, "请给出一个具体示例", expected]


def test_chat_echo_over_http_keeps_history_pairs(http_client):
    inputs = [bytes_input(httpclient, "prompt", ["hi"]), bytes_input(httpclient, "history", ["q", "a"]),
              bytes_input(httpclient, "temperature", ["0.5"]), bytes_input(httpclient, "max_token", ["9"]),
              bytes_input(httpclient, "history_len", ["0"])]
    result = http_client.infer("chat_echo", inputs)
    assert result.as_numpy("history").tolist() == [[b"hi", b"echo: hi (temperature=0.5, max_token=9)"]]


@pytest.mark.parametrize("values", [
    [b"", b"\x00nul\x00", b"\xff\xfe not UTF-8", "汉字".encode(), b"x" * 100_000],
    [],
], ids=["mixed", "empty"])
def test_bytes_elements_reach_the_model_and_come_back_unchanged(grpc_client, values):
    """BYTES tensors cross the process hop as item lists: every element, byte for byte."""
    array = np.array(values, dtype=np.object_).reshape([len(values)])
    tensor = grpcclient.InferInput("INPUT0", [len(values)], "BYTES")
    tensor.set_data_from_numpy(array)
    result = grpc_client.infer("identity_bytes", [tensor])
    output = result.as_numpy("OUTPUT0")
    assert output.shape == (len(values),)
    assert list(output) == values


def test_two_instances_serve_concurrent_requests(http_client):
    pending = [http_client.async_infer("two_instances", [fp32_input(httpclient, [0.0])])
               for _ in range(8)]
    results = [request.get_result() for request in pending]
    assert len({int(r.as_numpy("PID")[0]) for r in results}) == 2


def test_exception_in_execute_reaches_client_and_instance_keeps_serving(grpc_client, http_client):
    for _ in range(2):
        with pytest.raises(InferenceServerException) as error:
            grpc_client.infer("raises", [fp32_input(grpcclient, [1.0])])
        assert "raises: this model always fails in execute" in error.value.message()
        assert "INTERNAL" in str(error.value.status())
    with pytest.raises(InferenceServerException, match="always fails in execute") as error:
        http_client.infer("raises", [fp32_input(httpclient, [1.0])])
    assert error.value.status() == "500"
    assert grpc_client.infer("async_model", [fp32_input(grpcclient, [1.0])]).as_numpy("OUTPUT0").tolist() == [2.0]


def test_error_response_keeps_its_code(grpc_client, http_client):
    with pytest.raises(InferenceServerException, match="INPUT0 was rejected") as error:
        grpc_client.infer("error_response", [fp32_input(grpcclient, [1.0])])
    assert "INVALID_ARGUMENT" in str(error.value.status())
    with pytest.raises(InferenceServerException, match="INPUT0 was rejected") as error:
        http_client.infer("error_response", [fp32_input(httpclient, [1.0])])
    assert error.value.status() == "400"


def cancelled_so_far(http_client) -> int:
    """How many requests the ``cancellable`` model has seen cancelled (it answers once its one
    instance is free, i.e. after the request before it ended)."""
    result = http_client.infer("cancellable", [bytes_input(httpclient, "INPUT0", ["__cancelled__"])])
    return int(result.as_numpy("OUTPUT0")[0])


def wait_for_file(path: Path) -> None:
    for _ in range(3000):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError("the model never got the request")


def test_client_leaving_a_unary_http_infer_cancels_it_in_the_model(core_server, http_client, tmp_path):
    before = cancelled_so_far(http_client)
    started = tmp_path / "started"
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1],
                                   "data": [f"60 {started}"]}]})
    connection = http.client.HTTPConnection("127.0.0.1", core_server.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/cancellable/infer", body, {"Content-Type": "application/json"})
        wait_for_file(started)
    finally:
        connection.close()  # the client gives up without reading the answer
    # the model saw the cancellation (without it, the count would come 60 s later, unchanged)
    assert cancelled_so_far(http_client) == before + 1


def test_cancelled_unary_grpc_infer_is_cancelled_in_the_model(grpc_client, http_client, tmp_path):
    before = cancelled_so_far(http_client)
    started = tmp_path / "started"
    answers: queue.SimpleQueue = queue.SimpleQueue()
    call = grpc_client.async_infer("cancellable", [bytes_input(grpcclient, "INPUT0", [f"60 {started}"])],
                                   callback=lambda result, error: answers.put(error))
    wait_for_file(started)
    call.cancel()
    assert "CANCELLED" in str(answers.get(timeout=30))
    assert cancelled_so_far(http_client) == before + 1


def cancellable_statistics(http_client) -> tuple[int, int, int]:
    stats = http_client.get_inference_statistics("cancellable")["model_stats"][0]
    inference = stats["inference_stats"]
    return stats["inference_count"], int(inference["queue"]["ns"]), int(inference["compute_infer"]["ns"])


def test_a_request_sent_behind_a_running_one_counts_its_wait_as_queue_time(http_client, tmp_path):
    # One instance, no batching: the second request is sent to the instance process while the
    # first runs (so the process never waits for the server between the two), and only starts
    # after it: its 0.5 s of waiting is queue time, as in Triton, not compute time.
    count, queue_ns, compute_ns = cancellable_statistics(http_client)
    pending = [http_client.async_infer("cancellable", [bytes_input(httpclient, "INPUT0", [f"0.5 {tmp_path / n}"])])
               for n in ("first", "second")]
    assert [p.get_result().as_numpy("OUTPUT0")[0] for p in pending] == [b"not cancelled"] * 2
    count_after, queue_after, compute_after = cancellable_statistics(http_client)
    assert count_after == count + 2
    compute_s, queue_s = (compute_after - compute_ns) / 1e9, (queue_after - queue_ns) / 1e9
    assert 0.95 <= compute_s < 1.3, f"two 0.5 s executes counted as {compute_s:.2f} s of compute"
    assert queue_s >= 0.4, f"the second request's wait counted as {queue_s:.2f} s of queue"


def test_a_request_cancelled_while_it_waits_behind_another_never_reaches_the_model(
        grpc_client, http_client, tmp_path):
    before = cancelled_so_far(http_client)
    answers: queue.SimpleQueue = queue.SimpleQueue()
    grpc_client.async_infer("cancellable", [bytes_input(grpcclient, "INPUT0", [f"1 {tmp_path / 'first'}"])],
                            callback=lambda result, error: answers.put(("first", error)))
    wait_for_file(tmp_path / "first")
    waiting = grpc_client.async_infer(
        "cancellable", [bytes_input(grpcclient, "INPUT0", [f"60 {tmp_path / 'second'}"])],
        callback=lambda result, error: answers.put(("second", error)))
    time.sleep(0.2)  # queued behind the first, which still runs
    waiting.cancel()
    results = dict(answers.get(timeout=30) for _ in range(2))
    assert results["first"] is None and "CANCELLED" in str(results["second"])
    # the model finished the first and never saw the second (it would have created its file and
    # counted it cancelled, or waited 60 s)
    assert cancelled_so_far(http_client) == before
    assert not (tmp_path / "second").exists()


def test_async_execute(http_client):
    result = http_client.infer("async_model", [fp32_input(httpclient, [1.5, -2.0])])
    assert result.as_numpy("OUTPUT0").tolist() == [3.0, -4.0]


def test_bls_exec_and_async_exec(grpc_client):
    result = grpc_client.infer("bls_caller", [fp32_input(grpcclient, [1.0, 2.0])])
    assert result.as_numpy("SYNC").tolist() == [1.0, 2.0]
    assert result.as_numpy("ASYNC").tolist() == [2.0, 3.0]


def test_dynamic_batching_merges_concurrent_requests(grpc_client):
    # gRPC async_infer puts all 64 requests on the wire at once (the HTTP client's
    # greenlets send them one after another, so they would never meet in the queue)
    answers: queue.Queue = queue.Queue()
    for value in range(64):
        tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[value, value]], dtype=np.float32))
        grpc_client.async_infer("identity_fp32_batched", [tensor],
                                lambda result, error, value=value: answers.put((value, result, error)))
    results = [answers.get(timeout=30) for _ in range(64)]
    assert all(error is None for _, _, error in results)
    assert all(result.as_numpy("OUTPUT0")[0, 0] == value for value, result, _ in results)
    executed = [int(result.as_numpy("OUTPUT1")[0, 0]) for _, result, _ in results]
    assert max(executed) > 1
    assert max(executed) <= 8  # max_batch_size


def test_decoupled_model_streams_one_response_per_word(grpc_client):
    responses: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        grpc_client.async_stream_infer(
            "stream_words", [bytes_input(grpcclient, "prompt", ["one two three"])],
            enable_empty_final_response=True)
        words = []
        while True:
            result, error = responses.get(timeout=10)
            assert error is None
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("word") is not None:
                words.append(result.as_numpy("word")[0].decode())
            if final:
                break
    finally:
        grpc_client.stop_stream()
    assert words == ["one", "two", "three"]


def test_seed_config_kind_gpu_runs_on_cpu_without_gpu(http_client):
    inputs = [bytes_input(httpclient, name, [value]) for name, value in
              [("prompt", "x"), ("history", ""), ("temperature", "0"), ("max_token", "1"),
               ("history_len", "0")]]
    response = http_client.infer("seed_config", inputs).as_numpy("response")
    assert response.shape == ()
    assert response.item().decode() in ("x @ CPU:0", "x @ GPU:0")


# -- EXECUTION_ENV_PATH -------------------------------------------------------------------

ENV_MODEL = textwrap.dedent('''
    """Reports which Python runs it."""
    import sys

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            prefix = pb_utils.Tensor("PREFIX", np.array([sys.prefix], dtype=np.object_))
            return [pb_utils.InferenceResponse(output_tensors=[prefix]) for _ in requests]
''')


def env_model_config(name: str, archive: str) -> str:
    return textwrap.dedent(f'''
        name: "{name}"
        backend: "python"
        input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }} ]
        output [ {{ name: "PREFIX", data_type: TYPE_STRING, dims: [ 1 ] }} ]
        parameters: {{
          key: "EXECUTION_ENV_PATH",
          value: {{string_value: "$$TRITON_MODEL_DIRECTORY/{archive}"}}
        }}
    ''')


def pack_env(root: Path, archive: Path, python: str | None, site_packages: str | None) -> None:
    """A venv-pack style archive: bin/python, pyvenv.cfg, and ``site_packages`` (ours) through a .pth."""
    lib = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    lib.mkdir(parents=True)
    (root / "bin").mkdir()
    if python is None:  # a Python that claims to be another version
        (root / "bin" / "python").write_text("#!/bin/sh\necho 3.8\n")
        (root / "bin" / "python").chmod(0o755)
    else:
        (root / "bin" / "python").symlink_to(python)
    home = Path(os.path.realpath(sys.executable)).parent
    (root / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    if site_packages:
        (lib / "triserve-test.pth").write_text(site_packages + "\n")
    with tarfile.open(archive, "w:gz") as tar:
        for item in root.iterdir():
            tar.add(item, arcname=item.name)


def add_env_model(repository: Path, name: str, archive_name: str, **env) -> None:
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(env_model_config(name, archive_name))
    (model_dir / "1" / "model.py").write_text(ENV_MODEL)
    pack_env(repository.parent / f"{name}-env", model_dir / archive_name, **env)


def model_prefix(server: ServerProcess, name: str) -> str:
    with httpclient.InferenceServerClient(server.http_url) as client:
        result = client.infer(name, [fp32_input(httpclient, [0.0])])
    return result.as_numpy("PREFIX")[0].decode()


def test_execution_env_archive_is_unpacked_once_and_runs_the_model(tmp_path):
    repository = tmp_path / "repository"
    add_env_model(repository, "in_env", "env.tar.gz", python=os.path.realpath(sys.executable),
                  site_packages=sysconfig.get_paths()["purelib"])
    cache = tmp_path / "cache"
    env = {"TRISERVE_CACHE_DIR": str(cache)}

    with ServerProcess(repository, env=env) as server:
        prefix = Path(model_prefix(server, "in_env"))
    (unpacked,) = [p for p in (cache / "envs").iterdir() if p.is_dir()]
    assert prefix == unpacked
    first_inode = unpacked.stat().st_ino

    with ServerProcess(repository, env=env) as server:
        assert Path(model_prefix(server, "in_env")) == unpacked
    assert [p for p in (cache / "envs").iterdir() if p.is_dir()] == [unpacked]
    assert unpacked.stat().st_ino == first_inode


def test_broken_execution_envs_fail_to_load_with_the_reason(tmp_path):
    repository = tmp_path / "repository"
    add_env_model(repository, "no_numpy", "env.tar.gz", python=os.path.realpath(sys.executable),
                  site_packages=None)
    add_env_model(repository, "old_python", "env.tar.gz", python=None, site_packages=None)
    env = {"TRISERVE_CACHE_DIR": str(tmp_path / "cache")}

    with ServerProcess(repository, args=["--model-control-mode", "explicit"], env=env) as server:
        with httpclient.InferenceServerClient(server.http_url) as client:
            with pytest.raises(InferenceServerException) as error:
                client.load_model("no_numpy")
            assert "EXECUTION_ENV_PATH" in error.value.message()
            assert "No module named 'numpy'" in error.value.message()
            with pytest.raises(InferenceServerException) as error:
                client.load_model("old_python")
            assert "has Python 3.8, but triserve runs Python 3." in error.value.message()
            assert client.is_server_live()
