"""/openapi.json describes every HTTP route, and real responses match its schemas."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests

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
