"""API keys against real servers, through every client a user has: raw HTTP (what curl
sends), tritonclient HTTP and gRPC, the ``openai`` client, ``ChatTriserve`` and
``TriserveLLM``; and the metrics port, health checks and model control.

``keyed``: ``--api-key`` and ``--model-control-key`` (explicit model control).
``env_keyed``: the key from ``TRISERVE_API_KEY``, ``--open-health``, no model control key
(so load/unload are refused to everyone).
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from rawhttp import make_repository
from serverproc import ServerProcess
from triserve.langchain import ChatTriserve, TriserveLLM
from triserve.langchain.transport import TriserveError

API_KEY = "sk-test-4f9c2b7e"
CONTROL_KEY = "ctl-test-81d0aa"
ENV_KEY = "env-test-77e1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FP32 = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}
CHAT = {"model": "echo_chat", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("auth"), ["identity_fp32", "chat_echo"], echo_chat=True)


@pytest.fixture(scope="module")
def keyed(repository):
    args = ["--api-key", API_KEY, "--model-control-key", CONTROL_KEY,
            "--model-control-mode", "explicit", "--load-model", "*"]
    with ServerProcess(repository, args=args, headers=dict(AUTH)) as server:
        yield server


@pytest.fixture(scope="module")
def env_keyed(repository):
    args = ["--open-health", "--model-control-mode", "explicit", "--load-model", "*"]
    with ServerProcess(repository, args=args, env={"TRISERVE_API_KEY": ENV_KEY}) as server:
        yield server


# --- raw HTTP (what curl sends) ---------------------------------------------------------------

ROUTES = [
    ("GET", "/v2", None),
    ("GET", "/v2/models/identity_fp32", None),
    ("GET", "/v2/models/identity_fp32/ready", None),
    ("GET", "/v2/models/stats", None),
    ("POST", "/v2/models/identity_fp32/infer", FP32),
    ("POST", "/v2/models/chat_echo/generate", {"prompt": "hi", "history": [], "temperature": "0",
                                               "max_token": "8", "history_len": "0"}),
    ("POST", "/v2/repository/index", {}),
    ("POST", "/", {"prompt": "hi"}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("GET", "/openapi.json", None),
    ("GET", "/v2/health/ready", None),
    ("GET", "/v2/health/live", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_the_key(keyed, method, path, body):
    url = keyed.base_url + path
    for headers, message in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "invalid API key"),
                             ({"Authorization": f"Basic {API_KEY}"}, "missing API key")):
        response = requests.request(method, url, json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert API_KEY not in response.text and "wrong" not in response.text
        error = response.json()["error"]
        if path.startswith("/v1/"):
            assert error["code"] == "invalid_api_key" and message in error["message"]
        else:
            assert message in error
    response = requests.request(method, url, json=body, headers=dict(AUTH), timeout=10)
    assert response.status_code == 200, response.text
    # the scheme is case-insensitive, as HTTP says
    response = requests.request(method, url, json=body, headers={"authorization": f"bearer {API_KEY}"}, timeout=10)
    assert response.status_code == 200


def test_the_chat_page_opens_without_the_key_and_its_calls_need_it(keyed):
    """A browser cannot send a bearer token when it opens a page: the page's static files are
    open (they hold no data), and the page asks for the key that its API calls carry."""
    page = requests.get(keyed.base_url + "/", timeout=10)
    assert page.status_code == 200 and 'id="api_key"' in page.text
    assert requests.get(keyed.base_url + "/ui/app.js", timeout=10).status_code == 200
    assert requests.post(keyed.base_url + "/", json={"prompt": "hi"}, timeout=10).status_code == 401
    assert requests.get(keyed.base_url + "/v1/models", timeout=10).status_code == 401


def test_open_health_leaves_only_health_open(env_keyed):
    for path in ("/v2/health/ready", "/v2/health/live"):
        assert requests.get(env_keyed.base_url + path, timeout=10).status_code == 200
    for path in ("/v2", "/v2/models/identity_fp32/ready", "/v2/models/stats"):
        assert requests.get(env_keyed.base_url + path, timeout=10).status_code == 401
    response = requests.get(env_keyed.base_url + "/v2", headers={"Authorization": f"Bearer {ENV_KEY}"}, timeout=10)
    assert response.status_code == 200  # the key came from TRISERVE_API_KEY


def test_metrics_port_needs_the_key(keyed):
    url = f"http://127.0.0.1:{keyed.metrics_port}/metrics"
    response = requests.get(url, timeout=10)
    assert response.status_code == 401 and "missing API key" in response.json()["error"]
    response = requests.get(url, headers=dict(AUTH), timeout=10)
    assert response.status_code == 200 and "nv_inference_request_success" in response.text


# --- tritonclient -------------------------------------------------------------------------------


def fp32_input(module, values):
    tensor = module.InferInput("INPUT0", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


def test_tritonclient_http(keyed):
    client = httpclient.InferenceServerClient(keyed.http_url)
    with pytest.raises(InferenceServerException) as error:
        client.infer("identity_fp32", [fp32_input(httpclient, [1.0])])
    assert "missing API key" in error.value.message()
    with pytest.raises(InferenceServerException, match="invalid API key"):
        client.get_server_metadata(headers={"Authorization": "Bearer nope"})
    result = client.infer("identity_fp32", [fp32_input(httpclient, [1.0, 2.0])], headers=dict(AUTH))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [1.0, 2.0])
    assert client.is_server_ready(headers=dict(AUTH))


def test_tritonclient_grpc(keyed):
    client = grpcclient.InferenceServerClient(keyed.grpc_url)
    grpc_auth = {"authorization": f"Bearer {API_KEY}"}
    for call in (lambda **kw: client.infer("identity_fp32", [fp32_input(grpcclient, [1.0])], **kw),
                 lambda **kw: client.get_server_metadata(**kw),
                 lambda **kw: client.is_server_live(**kw)):
        with pytest.raises(InferenceServerException) as error:
            call()
        assert error.value.status() == "StatusCode.UNAUTHENTICATED" and "missing API key" in error.value.message()
        with pytest.raises(InferenceServerException) as error:
            call(headers={"authorization": "Bearer nope"})
        assert error.value.status() == "StatusCode.UNAUTHENTICATED" and "invalid API key" in error.value.message()
    result = client.infer("identity_fp32", [fp32_input(grpcclient, [3.0])], headers=grpc_auth)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [3.0])
    assert client.is_server_live(headers=grpc_auth) and client.is_server_ready(headers=grpc_auth)


def test_tritonclient_grpc_stream(keyed):
    for headers, ok in (({}, False), ({"authorization": f"Bearer {API_KEY}"}, True)):
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(keyed.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
        try:
            client.async_stream_infer("identity_fp32", [fp32_input(grpcclient, [5.0])])
        except InferenceServerException:
            assert not ok  # the refused stream may already be closed; its error went to the callback
        result, error = results.get(timeout=30)
        client.stop_stream()
        if ok:
            assert error is None and result.as_numpy("OUTPUT0").tolist() == [5.0]
        else:
            assert error is not None and "UNAUTHENTICATED" in str(error.status())


def test_grpc_health_follows_open_health(keyed, env_keyed):
    for server, open_health in ((keyed, False), (env_keyed, True)):
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            if open_health:
                assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            else:
                with pytest.raises(grpc.RpcError) as error:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as error:  # the server-streaming Watch too
                    next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10,
                                   metadata=[("authorization", f"Bearer {API_KEY}")])
                assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        if open_health:
            assert client.is_server_live() and client.is_server_ready()
            with pytest.raises(InferenceServerException, match="missing API key"):
                client.is_model_ready("identity_fp32")  # a model's readiness is not a health check


# --- model control --------------------------------------------------------------------------------


def test_model_control_needs_its_own_key(keyed):
    load = f"{keyed.base_url}/v2/repository/models/identity_fp32/load"
    unload = f"{keyed.base_url}/v2/repository/models/identity_fp32/unload"
    for headers in ({}, AUTH):  # the API key is not the model control key
        response = requests.post(unload, headers=headers, timeout=10)
        assert response.status_code == 401 and "model control" in response.json()["error"]
    control = {"Authorization": f"Bearer {CONTROL_KEY}"}
    assert requests.post(unload, headers=control, timeout=30).status_code == 200
    assert requests.get(f"{keyed.base_url}/v2/models/identity_fp32/ready", headers=dict(AUTH), timeout=10).status_code != 200
    assert requests.post(load, headers=control, timeout=60).status_code == 200

    client = grpcclient.InferenceServerClient(keyed.grpc_url)
    with pytest.raises(InferenceServerException) as error:
        client.unload_model("identity_fp32", headers={"authorization": f"Bearer {API_KEY}"})
    assert error.value.status() == "StatusCode.UNAUTHENTICATED"
    client.unload_model("identity_fp32", headers={"authorization": f"Bearer {CONTROL_KEY}"})
    client.load_model("identity_fp32", headers={"authorization": f"Bearer {CONTROL_KEY}"})
    assert client.is_model_ready("identity_fp32", headers={"authorization": f"Bearer {API_KEY}"})


def test_model_control_is_off_with_an_api_key_and_no_control_key(env_keyed):
    key = {"Authorization": f"Bearer {ENV_KEY}"}
    response = requests.post(f"{env_keyed.base_url}/v2/repository/models/identity_fp32/unload", headers=key,
                             timeout=10)
    assert response.status_code == 403 and "--model-control-key" in response.json()["error"]
    client = grpcclient.InferenceServerClient(env_keyed.grpc_url)
    with pytest.raises(InferenceServerException) as error:
        client.unload_model("identity_fp32", headers={"authorization": f"Bearer {ENV_KEY}"})
    assert error.value.status() == "StatusCode.PERMISSION_DENIED"
    assert client.is_model_ready("identity_fp32", headers={"authorization": f"Bearer {ENV_KEY}"})


# --- OpenAI and LangChain clients -------------------------------------------------------------------


def test_openai_client_sends_its_api_key(keyed):
    bad = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.chat.completions.create(**CHAT)
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=API_KEY, max_retries=0)
    assert good.chat.completions.create(**CHAT).choices[0].message.content == "echo: hello"
    pieces = [chunk.choices[0].delta.content or "" for chunk in good.chat.completions.create(**CHAT, stream=True)
              if chunk.choices]
    assert "".join(pieces) == "echo: hello"
    assert "echo_chat" in {model.id for model in good.models.list()}


def test_chat_triserve_sends_its_api_key(keyed, monkeypatch):
    base_url = f"{keyed.base_url}/v1"
    with pytest.raises(TriserveError) as error:
        ChatTriserve(model="echo_chat", base_url=base_url, api_key="wrong").invoke("hello")
    assert error.value.status_code == 401 and "invalid API key" in error.value.message
    chat = ChatTriserve(model="echo_chat", base_url=base_url, api_key=API_KEY)
    assert chat.invoke("hello").content == "echo: hello"
    assert "".join(chunk.content for chunk in chat.stream("hello")) == "echo: hello"
    monkeypatch.setenv("TRISERVE_API_KEY", API_KEY)
    assert ChatTriserve(model="echo_chat", base_url=base_url).invoke("from env").content == "echo: from env"


def test_triserve_llm_sends_its_api_key(keyed, monkeypatch):
    monkeypatch.delenv("TRISERVE_API_KEY", raising=False)
    with pytest.raises(TriserveError) as error:
        TriserveLLM(url=keyed.base_url, model="chat_echo").invoke("hello")
    assert error.value.status_code == 401
    llm = TriserveLLM(url=keyed.base_url, model="chat_echo", api_key=API_KEY)
    answer, history = llm.chat("hello")
    assert "hello" in answer and history[-1][0] == "hello"
    monkeypatch.setenv("TRISERVE_API_KEY", API_KEY)
    assert "again" in TriserveLLM(url=keyed.base_url, model="chat_echo").invoke("again")
