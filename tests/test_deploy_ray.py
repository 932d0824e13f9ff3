"""``triserve.deploy`` on a real local Ray cluster: two nodes on this machine, loopback only.

One cluster and one deployment serve the whole module (starting them is most of the
time): a repository with a Python-backend chat model (``chat_echo``), a slow streaming
Python model, and the default LLM chat model, two instances each, spread over the two
nodes. Every client the seed and triserve's users rely on talks to the front door;
then replicas and a node are killed under load, the deployment is scaled, and undeploy
is checked to leave no actor behind. Teardown stops every Ray process by PID
(``ray.cluster_utils.Cluster`` started them and knows them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serverproc import free_port
from test_legacy_predict import SEED_HISTORY, chat as seed_predict

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TESTS = Path(__file__).parent
ROOT = TESTS.parent
NAME = "demo"
SLOW_WORDS = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            words = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()[0].decode().split()
            for word in words:
                time.sleep(0.2)
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("word", np.array([word], dtype=np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''


def _slow_words(repository: Path) -> None:
    folder = repository / "slow_words"
    (folder / "1").mkdir(parents=True)
    config = (TESTS / "model_repository" / "stream_words" / "config.pbtxt").read_text()
    (folder / "config.pbtxt").write_text(config.replace('"stream_words"', '"slow_words"'))
    (folder / "1" / "model.py").write_text(textwrap.dedent(SLOW_WORDS))


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, every Ray process on 127.0.0.1; this process is the driver."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is first imported
    # Serve's autoscaling hears of requests in flight every second, not every 10 s (test speed;
    # the Ray processes the cluster starts inherit these)
    autoscaling_env = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                       "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": "0.02"}
    os.environ.update(autoscaling_env)
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=4, node_ip_address="127.0.0.1")
    # the head's dashboard answers Ray's state API (ray.util.state), on 127.0.0.1
    ray_cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port()))
    worker = ray_cluster.add_node(**node, include_dashboard=False)
    from triserve.deploy import cluster as deploy_cluster

    deploy_cluster.connect(ray_cluster.address)
    try:
        yield ray_cluster, worker
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()  # every process of both nodes, by the PIDs Ray recorded
        for variable in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", *autoscaling_env):
            os.environ.pop(variable, None)


@pytest.fixture(scope="module")
def predictor(cluster, tmp_path_factory):
    from triserve.deploy import TritonModel

    repository = tmp_path_factory.mktemp("deploy_repo")
    (repository / "chat_echo").symlink_to(TESTS / "model_repository" / "chat_echo")
    (repository / "smollm2").symlink_to(ROOT / "triserve" / "model_repository" / "smollm2")
    _slow_words(repository)
    return TritonModel(NAME).deploy(
        repository, protocol="grpc", endpoint=cluster[0].address, cpu=0.5, memory=0.25,
        instances=2, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        chatglm_model="smollm2")


def _echo_inputs(client_module, prompt: str) -> list:
    """chat_echo's five BYTES inputs, built with a tritonclient module (http or grpc)."""
    inputs = []
    for name, values in (("prompt", [prompt]), ("history", []), ("temperature", ["0.01"]),
                         ("max_token", ["64"]), ("history_len", ["0"])):
        tensor = client_module.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def _replicas(model: str, app: str = NAME) -> list[dict]:
    from ray.util.state import list_actors

    return [actor for actor in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{model}"),
                                                    ("state", "=", "ALIVE")], limit=1000)]


def _running(model: str, app: str = NAME) -> int:
    from triserve.deploy import TritonModel

    return TritonModel(app).status()["models"].get(model, {}).get("replicas", {}).get("RUNNING", 0)


def _wait(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def test_instances_are_replicas_spread_over_both_nodes(cluster, predictor):
    assert predictor.models == ("chat_echo", "slow_words", "smollm2")
    for model in predictor.models:
        replicas = _replicas(model)
        assert len(replicas) == 2, model
        assert len({actor["node_id"] for actor in replicas}) == 2, f"{model}: both replicas on one node"
    from triserve.deploy import status

    assert status()[NAME]["models"]["chat_echo"]["replicas"] == {"RUNNING": 2}


def test_nothing_listens_beyond_loopback_except_serve_replica_grpc(cluster, predictor):
    """Every listening socket of every Ray process of both nodes (GCS, raylets, workers,
    agents, dashboard, the replicas and the model instance processes they start) and of
    this driver is on 127.0.0.1 -- the same check as ``ss -ltnp`` -- except Serve's
    inter-replica gRPC server, which every replica binds to [::]:0 unconditionally
    (ray/serve/_private/replica.py): the one exception Serve cannot avoid."""
    import psutil

    ray_cluster, worker = cluster
    roots = [psutil.Process(info.process.pid) for node in (ray_cluster.head_node, worker)
             for infos in node.all_processes.values() for info in infos if info.process is not None]
    ours = {process.pid: process for root in [*roots, psutil.Process()]
            for process in [root, *root.children(recursive=True)]}
    replicas = {actor["pid"] for model in (*predictor.models, "frontdoor") for actor in _replicas(model)}
    assert replicas <= ours.keys()
    listening = [conn for conn in psutil.net_connections(kind="tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.pid in ours]
    beyond = []
    for conn in listening:
        host = conn.laddr.ip
        if host.startswith("127.") or host in ("::1",) or host.startswith("::ffff:127."):
            continue
        if conn.pid in replicas and host == "::":
            continue  # Serve's inter-replica gRPC server
        beyond.append(f"{host}:{conn.laddr.port} {' '.join(ours[conn.pid].cmdline())[:120]}")
    assert not beyond, f"listening beyond loopback: {beyond}"
    assert len(listening) > 10, "the check found too few of Ray's sockets to mean anything"
    loopback_ports = {conn.laddr.port for conn in listening}
    for port in (predictor.http_port, predictor.grpc_port, predictor.metrics_port):
        assert port in loopback_ports, port


def _front_door_counts(predictor, model: str) -> tuple[int, int, float]:
    """Successful requests of ``model`` as the front door reports them: HTTP statistics,
    gRPC ModelStatistics, and the /metrics counter (which must be one series, not one per replica)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(f"127.0.0.1:{predictor.http_port}") as client:
        (http_stats,) = client.get_inference_statistics(model)["model_stats"]
    with grpcclient.InferenceServerClient(predictor.grpc_url) as client:
        (grpc_stats,) = client.get_inference_statistics(model).model_stats
    with urllib.request.urlopen(predictor.metrics_url, timeout=30) as page:
        text = page.read().decode()
    series = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line]
    assert len(series) == 1, f"nv_inference_request_success of {model}: {len(series)} series"
    return http_stats["inference_stats"]["success"]["count"], grpc_stats.inference_stats.success.count, series[0]


def _per_replica_counts(model: str) -> dict[str, int]:
    """Successful requests of ``model`` on each of its replicas, asked of each one."""
    from ray import serve

    answers = serve.get_deployment_handle(model, app_name=NAME).broadcast("figures").results(timeout_s=60)
    return {answer["replica"]: sum(row["inference_stats"]["success"]["count"] for row in answer["statistics"])
            for answer in answers}


def test_statistics_and_metrics_sum_every_replica(predictor):
    import tritonclient.http as httpclient

    before = _per_replica_counts("chat_echo")
    assert len(before) == 2
    _wait(lambda: _front_door_counts(predictor, "chat_echo") == (sum(before.values()),) * 3, 30,
          "front door statistics settled")
    sent = 40

    def send(count):
        with httpclient.InferenceServerClient(f"127.0.0.1:{predictor.http_port}") as client:
            for _ in range(count):
                client.infer("chat_echo", _echo_inputs(httpclient, "count me"))

    threads = [threading.Thread(target=send, args=(sent // 4,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = _per_replica_counts("chat_echo")
    assert after.keys() == before.keys()
    assert all(after[r] > before[r] for r in after), f"the requests did not reach both replicas: {before} -> {after}"
    assert sum(after.values()) - sum(before.values()) == sent
    expected = (sum(after.values()),) * 3  # HTTP stats, gRPC stats, /metrics: the sum over both replicas
    _wait(lambda: _front_door_counts(predictor, "chat_echo") == expected, 30,
          f"front door statistics and metrics showing {expected[0]}")


def test_seed_grpc_request_and_sdk_predict(predictor):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import deserialize_bytes_tensor

    request = service_pb2.ModelInferRequest(model_name="chat_echo")
    history = ["你知道鸡兔同笼问题么", "鸡兔同笼问题是一个经典的数学问题。"]
    for name, shape, values in (("prompt", [1], ["请给出一个具体示例"]), ("history", [-1], history),
                                ("temperature", [1], ["0.01"]), ("max_token", [1], ["16000"]),
                                ("history_len", [1], ["10"])):
        tensor = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype="BYTES", shape=shape)
        tensor.contents.bytes_contents.extend(value.encode("utf8") for value in values)
        request.inputs.extend([tensor])
    request.outputs.extend([service_pb2.ModelInferRequest().InferRequestedOutputTensor(name=n)
                            for n in ("response", "history")])
    with grpc.insecure_channel(predictor.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    reply = deserialize_bytes_tensor(response.raw_output_contents[0])[0].decode()
    assert reply == "echo: 请给出一个具体示例 (temperature=0.01, max_token=16000)"
    assert list(response.outputs[1].shape) == [2, 2]

    assert predictor.protocol == "grpc" and predictor.url == predictor.grpc_url
    answer, new_history = predictor.predict("hi", history=[["q", "a"]], temperature=0.5,
                                            max_token=64, model="chat_echo")
    assert answer == "echo: hi (temperature=0.5, max_token=64)"
    assert new_history == [["q", "a"], ["hi", answer]]


def test_seed_http_predict_and_tritonclient_http(predictor):
    reply, history = seed_predict(predictor.predict_url, "chat_echo", "你好", SEED_HISTORY)
    assert reply == "echo: 你好 (temperature=0.01, max_token=32000)"
    assert history == SEED_HISTORY + [["你好", reply]]

    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(f"127.0.0.1:{predictor.http_port}") as client:
        assert client.is_server_ready() and client.is_model_ready("chat_echo")
        assert [i["name"] for i in client.get_model_metadata("chat_echo")["inputs"]][:2] == ["prompt", "history"]
        result = client.infer("chat_echo", _echo_inputs(httpclient, "x"))
        assert result.as_numpy("response").reshape(-1)[0].decode().startswith("echo: x")
        with pytest.raises(Exception, match="unknown model 'nope'"):
            client.infer("nope", _echo_inputs(httpclient, "x"))
        with pytest.raises(Exception, match="missing required input"):
            client.infer("chat_echo", _echo_inputs(httpclient, "x")[:1])
        stats = client.get_inference_statistics("chat_echo")["model_stats"]
        assert stats and stats[0]["name"] == "chat_echo"


def test_openai_stream_langchain_and_grpc_stream(predictor):
    from openai import OpenAI

    client = OpenAI(base_url=predictor.openai_url, api_key="none")
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")

    from triserve.langchain import TriserveLLM

    assert TriserveLLM(url=predictor.predict_url, model="chat_echo").invoke("hey").startswith("echo: hey")

    import requests

    glm = requests.post(predictor.http_url + "/", json={"prompt": "Hi", "history": [], "max_length": 64,
                                                         "temperature": 0.01}, timeout=120)
    assert glm.status_code == 200 and glm.json()["response"] and glm.json()["history"][0][0] == "Hi"
    generated = requests.post(f"{predictor.http_url}/v2/models/chat_echo/generate", timeout=60,
                              json={"prompt": "g", "history": [], "temperature": "0.01",
                                    "max_token": "8", "history_len": "0"})
    assert generated.status_code == 200, generated.text
    assert generated.json()["response"].startswith("echo: g")

    words = _grpc_stream(predictor, "one two three")
    assert words == ["one", "two", "three"]

    with urllib.request.urlopen(predictor.metrics_url, timeout=30) as page:
        metrics = page.read().decode()
    assert 'nv_inference_request_success{model="chat_echo"' in metrics


def _grpc_stream(predictor, prompt: str, on_word=None) -> list:
    """Words of slow_words through gRPC ModelStreamInfer; an error ends the list as an exception."""
    import queue

    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    out: list = []
    with grpcclient.InferenceServerClient(predictor.grpc_url) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        tensor = grpcclient.InferInput("prompt", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        client.async_stream_infer("slow_words", [tensor], enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                out.append(error)
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            out.append(result.as_numpy("word")[0].decode())
            if on_word:
                on_word(len(out))
        client.stop_stream()
    return out


def test_override_false_refuses_with_a_clear_error(predictor):
    from triserve.deploy import DeployError, TritonModel

    with pytest.raises(DeployError, match="exists already.*override=True"):
        TritonModel(NAME).deploy(TESTS / "model_repository" / "chat_echo")


def test_a_model_that_cannot_load_fails_the_deploy_with_its_error(cluster, predictor, tmp_path):
    from triserve.deploy import DeployError, TritonModel, status

    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "nope"\n')
    with pytest.raises(DeployError, match="backend 'nope' is not supported"):
        TritonModel("broken").deploy(broken, cpu=0.25, http_port=free_port(), grpc_port=free_port(),
                                     metrics_port=free_port(), timeout=300)
    TritonModel("broken").undeploy()
    assert "broken" not in status()


def test_cut_stream_ends_with_error_readiness_follows_and_replica_returns(predictor):
    killed = threading.Event()
    readiness: list[tuple[bool, int]] = []  # (after the kill, HTTP status of the model's ready)
    polling = threading.Event()

    def poll_readiness():
        ready_url = f"{predictor.http_url}/v2/models/slow_words/ready"
        while not polling.is_set():
            try:
                with urllib.request.urlopen(ready_url, timeout=10) as page:
                    readiness.append((killed.is_set(), page.status))
            except urllib.error.HTTPError as exc:
                readiness.append((killed.is_set(), exc.code))
            time.sleep(0.05)

    def kill_all_slow_words(count):
        if count == 2 and not killed.is_set():
            for actor in _replicas("slow_words"):
                os.kill(actor["pid"], signal.SIGKILL)
            killed.set()

    poller = threading.Thread(target=poll_readiness)
    poller.start()
    try:
        words = _grpc_stream(predictor, "a b c d e f g h i j k l m n o p", on_word=kill_all_slow_words)
        assert words[:2] == ["a", "b"] and isinstance(words[-1], Exception)
        assert "stream stopped" in str(words[-1]) and "send the request again" in str(words[-1])
        _wait(lambda: _running("slow_words") == 2 and len(_replicas("slow_words")) == 2, 120,
              "slow_words replicas back")
        _wait(lambda: readiness and readiness[-1] == (True, 200), 30, "slow_words ready again")
    finally:
        polling.set()
        poller.join()
    assert (False, 200) in readiness, "the model was not ready before the kill"
    assert any(after and status != 200 for after, status in readiness), \
        "the model stayed ready with no live replica"
    assert _grpc_stream(predictor, "back again") == ["back", "again"]


def test_node_death_under_steady_unary_load_loses_no_request(cluster, predictor, capsys):
    import tritonclient.http as httpclient

    ray_cluster, worker = cluster
    records: list[tuple[float, float, str | None]] = []
    stop = threading.Event()

    def load():
        with httpclient.InferenceServerClient(f"127.0.0.1:{predictor.http_port}",
                                              network_timeout=120) as client:
            inputs = _echo_inputs(httpclient, "load")
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.infer("chat_echo", inputs)
                    error = None
                except Exception as exc:  # counted, and the test fails on any
                    error = str(exc)
                records.append((started, time.monotonic() - started, error))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        before_pids = {actor["pid"] for actor in _replicas("chat_echo")}
        killed_at = time.monotonic()
        ray_cluster.remove_node(worker, allow_graceful=False)  # raylet and every worker on it
        back_after = _wait(lambda: len(_replicas("chat_echo")) == 2 and _running("chat_echo") == 2
                           and {a["pid"] for a in _replicas("chat_echo")} != before_pids,
                           180, "a new chat_echo replica running")
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failures = [error for _, _, error in records if error]
    before = sorted(latency for started, latency, _ in records if started < killed_at)
    after = [latency for started, latency, _ in records if killed_at <= started < killed_at + back_after]
    figures = {"requests": len(records), "failed": len(failures),
               "p50_before_ms": round(1000 * before[len(before) // 2], 1),
               "max_after_kill_ms": round(1000 * max(after), 1) if after else None,
               "replica_back_s": round(back_after, 1)}
    with capsys.disabled():
        print(f"\n[deploy] node killed under load: {json.dumps(figures)}")
    assert not failures, failures[:3]
    assert len(records) > 20


def test_scale_down_and_up_on_the_live_deployment(cluster, predictor):
    from triserve.deploy import TritonModel

    # the head alone has the CPUs for every replica (the worker node was killed above)
    frontdoor_pid = _replicas("frontdoor")[0]["pid"]
    TritonModel(NAME).scale(instances=1, timeout=240)
    _wait(lambda: all(_running(m) == 1 and len(_replicas(m)) == 1 for m in predictor.models), 120,
          "scaled down to 1")
    assert predictor.predict("still", model="chat_echo")[0].startswith("echo: still")
    TritonModel(NAME).scale(instances=2, timeout=240)
    _wait(lambda: all(_running(m) == 2 for m in predictor.models), 240, "scaled up to 2")
    assert _replicas("frontdoor")[0]["pid"] == frontdoor_pid, "scaling restarted the front door"
    over_http = TritonModel(NAME).predictor("http")
    assert over_http.url == predictor.http_url
    assert over_http.predict("again", model="chat_echo")[0].startswith("echo: again")


def test_cli_deploys_an_autoscaled_bls_pipeline_joining_the_local_cluster(cluster, predictor, tmp_path, capsys):
    """``triserve deploy`` without --endpoint (TritonModel.deploy(endpoint=None)) joins the
    running local cluster; a model's BLS calls reach another model's deployment; with
    --min/--max-replicas, Serve's autoscaling adds a replica under load."""
    address = cluster[0].address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)

    def triserve(*args, check=True, endpoint=True):
        command = [sys.executable, "-m", "triserve", *args] + (["--endpoint", address] if endpoint else [])
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert not check or result.returncode == 0, result.stderr[-3000:]
        return result

    repository = tmp_path / "pipeline"
    repository.mkdir()
    for model in ("bls_caller", "identity_fp32"):
        (repository / model).symlink_to(TESTS / "model_repository" / model)
    http_port = free_port()
    deployed = triserve("deploy", str(repository), "--name", "cli-bls", "--cpu", "0.25",
                        "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
                        "--http-port", str(http_port), "--grpc-port", str(free_port()),
                        "--metrics-port", str(free_port()), endpoint=False)
    endpoints = json.loads(deployed.stdout)
    assert endpoints["http"] == f"http://127.0.0.1:{http_port}"
    assert endpoints["models"] == ["bls_caller", "identity_fp32"] and endpoints["chat_model"] is None
    state = json.loads(triserve("status", "cli-bls").stdout)
    assert {m: s["replicas"] for m, s in state["cli-bls"]["models"].items()} == {
        "bls_caller": {"RUNNING": 1}, "identity_fp32": {"RUNNING": 1}}

    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(f"127.0.0.1:{http_port}") as client:
        tensor = httpclient.InferInput("INPUT0", [3], "FP32")
        tensor.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
        result = client.infer("bls_caller", [tensor])
        assert result.as_numpy("SYNC").tolist() == [1.0, 2.0, 3.0]
        assert result.as_numpy("ASYNC").tolist() == [2.0, 3.0, 4.0]
        # both BLS calls ran on identity_fp32's own replica, counted there
        _wait(lambda: client.get_inference_statistics("identity_fp32")["model_stats"][0]
              ["inference_stats"]["success"]["count"] == 2, 30, "identity_fp32 counting the BLS calls")

    # autoscaling: with requests in flight above the target, Serve adds the second replica
    stop, failures = threading.Event(), []

    def load():
        with httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=120) as client:
            while not stop.is_set():
                try:
                    client.infer("bls_caller", [tensor])
                except Exception as exc:  # counted: the test fails on any
                    failures.append(str(exc))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        upscaled_after = _wait(lambda: _running("bls_caller", "cli-bls") == 2, 120,
                               "bls_caller autoscaled to 2 replicas")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    with capsys.disabled():
        print(f"\n[deploy] autoscaled to 2 replicas after {upscaled_after:.1f} s of load")
    assert not failures, failures[:3]

    again = triserve("deploy", str(repository), "--name", "cli-bls", check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    triserve("undeploy", "cli-bls")
    _wait(lambda: not [m for m in ("bls_caller", "identity_fp32", "frontdoor") if _replicas(m, "cli-bls")],
          60, "cli-bls actors gone")
    missing = triserve("undeploy", "cli-bls", check=False)
    assert missing.returncode == 1 and "no deployment named 'cli-bls'" in missing.stderr


def test_undeploy_leaves_no_actor_no_process_and_closes_the_ports(predictor):
    import psutil
    from ray.util.state import list_actors

    from triserve.deploy import TritonModel

    replicas = [psutil.Process(actor["pid"]) for model in (*predictor.models, "frontdoor")
                for actor in _replicas(model)]
    processes = replicas + [child for replica in replicas for child in replica.children(recursive=True)]
    assert len(processes) > len(replicas), "no model instance process found under the replicas"
    TritonModel(NAME).undeploy()
    _wait(lambda: not [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                       if a["class_name"].startswith(f"ServeReplica:{NAME}:")], 60, "replicas gone")

    def alive(process):
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    _wait(lambda: not [p for p in processes if alive(p)], 60,
          "the replicas' processes and their model instance processes gone")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", predictor.http_port), timeout=5).close()
    assert TritonModel(NAME).status() == {"status": "NOT_DEPLOYED"}
