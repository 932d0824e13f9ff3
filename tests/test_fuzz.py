"""Fuzzing, bounded so it runs in CI: zero 5xx, zero crashes, zero undocumented answers.

- schemathesis generates requests (valid and invalid) for every operation of
  ``/openapi.json`` and sends them to a real server serving test models; every answer
  must be documented for its operation (status, content type, body schema);
- hypothesis drives the binary tensor extension and the BYTES codec, directly and
  through the real ``/infer`` endpoint, and OpenAI sampling values at their edges
  against the real default chat model (``max_tokens`` capped, so generation stays short).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawhttp import make_repository
from serverproc import ServerProcess
from triserve.core import datatypes
from triserve.core.errors import InferError
from triserve.frontends.http import kserve, openapi

# Models that answer any input without raising (a model that raises is a 500 by design, as in
# Triton: chat_echo parses its numbers with int(), like the seed's model.py).
MODELS = ["identity_fp32", "identity_bytes", "identity_int8", "identity_bool", "identity_fp16",
          "identity_fp32_batched", "stream_words", "async_model", "two_instances"]
MODEL_NAMES = [*MODELS, "echo_chat"]
DATATYPES = list(datatypes.KSERVE_TO_NUMPY)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    repository = make_repository(tmp_path_factory.mktemp("fuzz"), MODELS, echo_chat=True)
    # small limits, so generated bodies also meet them
    args = ["--max-tensor-elements", "4096", "--max-json-depth", "16", "--chatglm-model", "echo_chat"]
    with ServerProcess(repository, args=args) as server:
        yield server


def _steer(case) -> None:
    """Point half the generated model names at real models (else nearly every case is a 404),
    and keep generation lengths small."""
    parameters = case.path_parameters or {}
    if "model" in parameters:
        text = str(parameters["model"])
        if len(text) % 2:
            parameters["model"] = MODEL_NAMES[len(text) % len(MODEL_NAMES)]
        if "version" in parameters and len(str(parameters["version"])) % 2:
            parameters["version"] = "1"
    if isinstance(case.body, dict):
        if "model" in case.body and len(str(case.body["model"])) % 2:
            case.body["model"] = MODEL_NAMES[len(str(case.body["model"])) % len(MODEL_NAMES)]
        for key in ("max_tokens", "max_completion_tokens", "max_new_tokens", "max_length", "max_token"):
            if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool):
                case.body[key] = max(min(case.body[key], 4), -1)


# The document is built from the package, as the server serves it (the OpenAI part and the
# error answers included), so the operations are known when tests are collected: one test per
# operation. Each response must be one the document gives for the operation: its status, its
# content type and its body's schema.
DOCUMENT = json.loads(openapi.document())
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = [(method.upper(), path) for path, methods in DOCUMENT["paths"].items() for method in methods]
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_openapi_operations_never_answer_5xx(fuzz_server, method, path):
    operation = SCHEMA[path][method]
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                         operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=int(os.environ.get("TRISERVE_FUZZ_EXAMPLES", "12")), deadline=None, derandomize=True,
              database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def call(case) -> None:
        _steer(case)
        response = case.call(base_url=fuzz_server.base_url, timeout=30)
        assert response.status_code < 500, (f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
                                            f"{response.status_code} {response.text[:300]}")
        case.validate_response(response, checks=CHECKS)

    call()


def test_the_server_survived_the_fuzzing(fuzz_server):
    response = requests.post(f"{fuzz_server.base_url}/v2/models/identity_fp32/infer", timeout=10,
                             json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1]}]})
    assert response.status_code == 200
    assert fuzz_server.proc.poll() is None


# --- the binary tensor extension -------------------------------------------------------------

shapes = st.lists(st.integers(min_value=-2, max_value=6), max_size=3)
sizes = st.one_of(st.integers(min_value=-2, max_value=64), st.just("7"), st.just(1.5), st.none())


@st.composite
def binary_bodies(draw):
    """A JSON header naming binary inputs (sizes right, wrong or odd), then arbitrary bytes."""
    inputs = []
    payload = b""
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        datatype = draw(st.sampled_from(DATATYPES + ["FP8", ""]))
        data = draw(st.binary(max_size=48))
        size = draw(st.one_of(st.just(len(data)), sizes))
        entry = {"name": draw(st.sampled_from(["INPUT0", f"IN{index}", ""])), "datatype": datatype,
                 "shape": draw(st.one_of(shapes, st.just([-1]))), "parameters": {"binary_data_size": size}}
        inputs.append(entry)
        payload += data
    header = json.dumps({"inputs": inputs}).encode()
    header_length = draw(st.one_of(st.just(str(len(header))), st.integers(-3, len(header) + 80).map(str),
                                   st.just("x")))
    return header + payload + draw(st.binary(max_size=8)), header_length


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(binary_bodies())
def test_binary_extension_decoding_only_raises_invalid_argument(body_and_length):
    body, header_length = body_and_length
    try:
        request, _ = kserve.decode_infer_request("m", "", body, header_length, max_elements=1024)
    except InferError as error:
        assert error.code.http_status == 400, error
    else:
        for tensor in request.inputs:
            assert tensor.data.size == datatypes.element_count(tensor.shape)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(binary_bodies(), st.sampled_from(["identity_fp32", "identity_bytes", "identity_int8", "identity_bool"]))
def test_binary_extension_over_http_never_answers_5xx(fuzz_server, body_and_length, model):
    body, header_length = body_and_length
    response = requests.post(f"{fuzz_server.base_url}/v2/models/{model}/infer", data=body, timeout=30,
                             headers={"Inference-Header-Content-Length": header_length})
    assert response.status_code < 500, response.text


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_bytes_tensors_round_trip_through_http(fuzz_server, items):
    """Arbitrary bytes (not UTF-8 included) in, the same bytes out, as binary data."""
    raw = datatypes.pack_bytes(np.array(items, dtype=np.object_))
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [len(items)],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    response = requests.post(f"{fuzz_server.base_url}/v2/models/identity_bytes/infer", data=header + raw,
                             headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert response.status_code == 200, response.text
    json_length = int(response.headers["Inference-Header-Content-Length"])
    assert datatypes.unpack_bytes(response.content[json_length:]).tolist() == items


# --- the BYTES codec (core/datatypes.py) -------------------------------------------------------


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=16)), max_size=20))
def test_bytes_codec_round_trips(items):
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    packed = datatypes.pack_bytes(array)
    expected = [item if isinstance(item, bytes) else item.encode("utf-8") for item in items]
    assert datatypes.unpack_bytes(packed).tolist() == expected
    assert datatypes.from_raw(packed, "BYTES").tolist() == expected
    for view in (memoryview(packed), bytearray(packed)):  # the HTTP body's slices, any buffer
        decoded = datatypes.unpack_bytes(view).tolist()
        assert decoded == expected and all(type(item) is bytes for item in decoded)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=96), st.one_of(st.none(), st.integers(min_value=0, max_value=8)))
def test_bytes_codec_on_arbitrary_data_only_raises_value_error(data, max_items):
    try:
        items = datatypes.unpack_bytes(data, max_items)
    except datatypes.TooManyElements:
        assert max_items is not None
    except ValueError:
        return
    else:
        assert max_items is None or len(items) <= max_items
        assert datatypes.pack_bytes(items) == data  # what decodes is exactly what was sent


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=64), st.sampled_from(DATATYPES), st.one_of(st.none(), st.integers(0, 8)))
def test_raw_decoding_of_every_datatype_only_raises_value_error(data, datatype, max_items):
    try:
        array = datatypes.from_raw(data, datatype, max_items)
    except ValueError:
        return
    assert max_items is None or array.size <= max_items
    assert datatypes.to_raw(array, datatype) == data


# --- sampling values at their edges, against the real chat model ------------------------------

edge_floats = st.one_of(st.sampled_from([0.0, 1e-300, 1e-40, 1e-8, 0.5, 1.0, 2.0, 1e300, -1.0]),
                        st.floats(min_value=0, max_value=2))
edge_ints = st.sampled_from([0, 1, 2, 50, 2**31, 2**53, 2**63 - 1, 2**63, -1])


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(temperature=edge_floats, top_p=edge_floats, top_k=edge_ints, repetition_penalty=edge_floats,
       seed=edge_ints, stream=st.booleans())
def test_openai_sampling_edges_never_answer_5xx(chat_server, temperature, top_p, top_k, repetition_penalty,
                                                seed, stream):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2,
            "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "repetition_penalty": repetition_penalty, "seed": seed, "stream": stream}
    response = requests.post(f"{chat_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code < 500, response.text
    if response.status_code == 200 and stream:
        assert '"error"' not in response.text, response.text
