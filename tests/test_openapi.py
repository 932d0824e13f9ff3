"""/openapi.json describes every HTTP route and the errors each can answer, and real responses
(errors included: API key, limits, queue full, a model's error) match its schemas."""

from __future__ import annotations

import concurrent.futures
import json
import re
import select
import socket
import time

import jsonschema
import pytest
import requests

import rawhttp
from rawhttp import ECHO_CHAT_CONFIG, ECHO_CHAT_MODEL, make_repository
from serverproc import ServerProcess
from triserve.frontends.http.app import create_app
from triserve.options import ServerOptions

CHAT = {"prompt": "hi", "history": [], "temperature": 0.1, "max_token": 8, "history_len": 0}
FP32_INFER = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
PREDICT = {"model_name": "identity_fp32", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1],
                                                       "contents": {"fp32_contents": [1.0]}}]}
CHAT_COMPLETION = {"model": "chat_echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

# (method, documented path, concrete path, JSON body)
CALLS = [
    ("get", "/v2", "/v2", None),
    ("get", "/v2/health/live", "/v2/health/live", None),
    ("get", "/v2/health/ready", "/v2/health/ready", None),
    ("get", "/v2/models/stats", "/v2/models/stats", None),
    ("get", "/v2/models/{model}", "/v2/models/identity_fp32", None),
    ("get", "/v2/models/{model}", "/v2/models/no_such_model", None),
    ("get", "/v2/models/{model}/versions/{version}", "/v2/models/identity_fp32/versions/1", None),
    ("get", "/v2/models/{model}/ready", "/v2/models/identity_fp32/ready", None),
    ("get", "/v2/models/{model}/config", "/v2/models/identity_fp32/config", None),
    ("get", "/v2/models/{model}/stats", "/v2/models/identity_fp32/stats", None),
    ("post", "/v2/models/{model}/infer", "/v2/models/identity_fp32/infer", FP32_INFER),
    ("post", "/v2/models/{model}/versions/{version}/infer", "/v2/models/identity_fp32/versions/1/infer", FP32_INFER),
    ("post", "/v2/models/{model}/infer", "/v2/models/identity_fp32/infer", {"inputs": "no"}),
    ("post", "/v2/models/{model}/generate", "/v2/models/chat_echo/generate", CHAT),
    ("post", "/v2/models/{model}/generate_stream", "/v2/models/stream_words/generate_stream", {"prompt": "a b"}),
    ("post", "/v2/repository/index", "/v2/repository/index", {"ready": True}),
    ("post", "/v2/repository/models/{model}/load", "/v2/repository/models/identity_fp32/load", None),
    ("post", "/v2/repository/models/{model}/unload", "/v2/repository/models/identity_fp32/unload", None),
    ("post", "/MutilBackendService/Predict", "/MutilBackendService/Predict", PREDICT),
    ("post", "/MultiBackendService/Predict", "/MultiBackendService/Predict", {"model_name": 3}),
    ("post", "/", "/", {"prompt": "hi", "history": [["q", "a"]]}),
    ("get", "/v1/models", "/v1/models", None),
    ("get", "/v1/models/{model}", "/v1/models/chat_echo", None),
    ("post", "/v1/chat/completions", "/v1/chat/completions", CHAT_COMPLETION),
    ("post", "/v1/chat/completions", "/v1/chat/completions", {**CHAT_COMPLETION, "stream": True}),
    ("post", "/v1/completions", "/v1/completions", {"model": "chat_echo", "prompt": "hi", "max_tokens": 8}),
    ("get", "/openapi.json", "/openapi.json", None),
]


@pytest.fixture(scope="module")
def document(core_server) -> dict:
    response = requests.get(f"{core_server.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def validator(document: dict, schema: dict) -> jsonschema.Draft202012Validator:
    """A validator for ``schema`` whose ``$ref``s resolve inside the OpenAPI document."""
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_document_is_openapi_3_1_with_valid_schemas(document):
    assert document["openapi"].startswith("3.1")
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_route_of_the_app_is_documented(document):
    app = create_app(core=None, options=ServerOptions())
    documented = {re.sub(r"\{(\w+)\}", "{}", path) for path in document["paths"]}
    for route in app.routes:
        if "{base:path}" in route.path:
            continue  # the seed's predict under a deployment prefix, documented at the root
        path = re.sub(r"\{(\w+)(:\w+)?\}", "{}", route.path)
        assert path in documented, f"{route.path} is not in openapi.json"


@pytest.mark.parametrize(("method", "documented", "path", "body"), CALLS,
                         ids=[f"{c[0]} {c[2]}" + (" stream" if (c[3] or {}).get("stream") else "") for c in CALLS])
def test_real_responses_match_the_document(core_server, document, method, documented, path, body):
    response = requests.request(method, core_server.base_url + path, json=body, timeout=30)
    operation = document["paths"][documented][method]
    described = operation["responses"].get(str(response.status_code))
    assert described is not None, f"status {response.status_code} is not documented: {response.text}"
    if not response.content:
        assert "content" not in described
        return
    media_type = response.headers["content-type"].split(";")[0]
    schema = described["content"][media_type]["schema"]
    if media_type == "text/event-stream":
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events
        for event in events:
            if event != "[DONE]":
                validator(document, schema).validate(json.loads(event))
    else:
        validator(document, schema).validate(response.json())


# --- the error answers: documented for every operation, and real ones match -------------------

EDGE = {"400", "408", "413", "431", "500"}  # any request may get these, whatever its route
PUBLIC = {("get", "/"), ("get", "/ui"), ("get", "/ui/"), ("get", "/ui/{name}")}
INFERENCE = ["/v2/models/{model}/infer", "/v2/models/{model}/generate", "/v2/models/{model}/generate_stream",
             "/MultiBackendService/Predict", "/v1/chat/completions", "/v1/completions"]


def test_every_operation_documents_the_error_answers_it_can_give(document):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            where = f"{method.upper()} {path}"
            assert EDGE <= statuses, f"{where} lacks {EDGE - statuses}"
            if (method, path) in PUBLIC:
                assert "401" not in statuses, f"{where} is open: it is never 401"
            else:
                assert "401" in statuses, where
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            assert ("403" in statuses) == path.startswith("/v2/repository/models/"), where
            assert ("429" in statuses) == (path in ("/v1/chat/completions", "/v1/completions")), where
            for status, answer in operation["responses"].items():
                if status >= "400":
                    schema = answer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                    assert schema == ("OpenAIError" if path.startswith("/v1/") else "Error"), (where, status)
    for path in INFERENCE:
        post = document["paths"][path]["post"]["responses"]
        assert {"404", "503"} <= set(post), path
        assert "queue is full" in post["503" if not path.startswith("/v1/") else "429"]["description"]
        assert "shutting down" in post["503"]["description"]


API_KEY = "sk-openapi-test"
KEYED = {"Authorization": f"Bearer {API_KEY}"}
SLOW_CHAT_CONFIG = ECHO_CHAT_CONFIG.replace('name: "echo_chat"', 'name: "slow_chat"') + \
    "dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
SLOW_CHAT_MODEL = ECHO_CHAT_MODEL.replace("import numpy as np", "import time\n\nimport numpy as np").replace(
    "    def execute(self, requests):\n", "    def execute(self, requests):\n        time.sleep(2.0)\n")


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory):
    """An API key without a model control key (load/unload: 403), small limits, a slow chat model
    behind a queue of 1 (429 on OpenAI routes, 503 elsewhere)."""
    repository = make_repository(tmp_path_factory.mktemp("edge"), ["identity_fp32", "raises"])
    (repository / "slow_chat" / "1").mkdir(parents=True)
    (repository / "slow_chat" / "config.pbtxt").write_text(SLOW_CHAT_CONFIG)
    (repository / "slow_chat" / "1" / "model.py").write_text(SLOW_CHAT_MODEL)
    args = ["--api-key", API_KEY, "--max-request-body", "4096", "--request-body-timeout", "1",
            "--model-control-mode", "explicit", "--load-model", "*"]
    with ServerProcess(repository, args=args, headers=dict(KEYED)) as server:
        yield server


def check_documented(document: dict, method: str, path: str, status: int, body: bytes) -> None:
    """``status`` is documented for the operation and ``body`` matches its schema."""
    described = document["paths"][path][method]["responses"].get(str(status))
    assert described is not None, f"{method.upper()} {path}: status {status} is not documented ({body[:200]!r})"
    validator(document, described["content"]["application/json"]["schema"]).validate(json.loads(body))


def raw_request(server, head: bytes, body: bytes = b"", timeout: float = 10) -> rawhttp.RawResponse:
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(head + body)
        return rawhttp.read_response(sock, timeout)


def huge_head(server, path: str) -> rawhttp.RawResponse:
    """A header sent 8 KiB at a time until the server answers (it refuses past 64 KiB)."""
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode())
        try:
            for _ in range(16):
                if select.select([sock], [], [], 0.05)[0]:
                    break
                sock.sendall(b"a" * 8192)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return rawhttp.read_response(sock, 10)


def test_real_error_answers_match_the_document(edge_server, document):
    base = edge_server.base_url
    cases = []  # (method, documented path, status, body)

    for path, concrete in (("/v2/models/{model}/infer", "/v2/models/identity_fp32/infer"),
                           ("/v1/chat/completions", "/v1/chat/completions")):
        response = requests.post(base + concrete, json={}, timeout=10)  # no key
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        cases.append(("post", path, 401, response.content))
        head = rawhttp.request_head(edge_server.http_port, concrete, {"Content-Length": "5000", **KEYED})
        response = raw_request(edge_server, head)  # refused before the body is sent
        assert response.status == 413
        cases.append(("post", path, 413, response.body))
        response = requests.post(base + concrete, data=b"not gzip", timeout=10,
                                 headers={**KEYED, "Content-Encoding": "gzip"})
        assert response.status_code == 400
        cases.append(("post", path, 400, response.content))
        response = huge_head(edge_server, concrete)
        assert response.status == 431
        cases.append(("post", path, 431, response.body))
        # a head that never completes: 408 after --request-body-timeout (1 s)
        partial = rawhttp.request_head(edge_server.http_port, concrete, KEYED)[:-2]
        response = raw_request(edge_server, partial)
        assert response.status == 408
        cases.append(("post", path, 408, response.body))

    response = requests.post(base + "/v2/repository/models/identity_fp32/unload", headers=KEYED, timeout=10)
    assert response.status_code == 403
    cases.append(("post", "/v2/repository/models/{model}/unload", 403, response.content))
    response = requests.get(base + "/v2/health/ready", timeout=10)
    assert response.status_code == 401
    cases.append(("get", "/v2/health/ready", 401, response.content))

    # a model's own error is a 500
    response = requests.post(base + "/v2/models/raises/infer", headers=KEYED, timeout=30, json={
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1]}]})
    assert response.status_code == 500
    cases.append(("post", "/v2/models/{model}/infer", 500, response.content))

    # a full queue: one request runs, one waits, the rest are refused (429 on OpenAI routes, 503 elsewhere)
    chat = {"model": "slow_chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(requests.post, base + "/v1/chat/completions", json=chat, headers=KEYED, timeout=30)
        time.sleep(0.5)
        waiting = pool.submit(requests.post, base + "/v1/chat/completions", json=chat, headers=KEYED, timeout=30)
        time.sleep(0.5)
        refused_openai = requests.post(base + "/v1/chat/completions", json=chat, headers=KEYED, timeout=30)
        refused_generate = requests.post(base + "/v2/models/slow_chat/generate", json={"prompt": "hi"},
                                         headers=KEYED, timeout=30)
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert refused_openai.status_code == 429, refused_openai.text
    assert refused_openai.json()["error"]["code"] == "rate_limit_exceeded"
    cases.append(("post", "/v1/chat/completions", 429, refused_openai.content))
    assert refused_generate.status_code == 503 and "Exceeds maximum queue size" in refused_generate.text
    cases.append(("post", "/v2/models/{model}/generate", 503, refused_generate.content))

    for method, path, status, body in cases:
        check_documented(document, method, path, status, body)
