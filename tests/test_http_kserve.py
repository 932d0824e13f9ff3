"""KServe v2 REST against a real server: tritonclient.http for what Triton's own client
does (every datatype, JSON and binary), raw HTTP for the wire details and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serverproc import ServerProcess
from conftest import TEST_REPOSITORY

DTYPES = {
    "bool": np.bool_, "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bytes": np.object_,
}


@pytest.fixture(scope="module")
def client(core_server):
    with httpclient.InferenceServerClient(core_server.http_url) as client:
        yield client


def sample(dtype: type) -> np.ndarray:
    if dtype is np.object_:
        return np.array(["héllo", "", "wörld", "x" * 300], dtype=np.object_)
    if dtype is np.bool_:
        return np.array([True, False, True, True])
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    return np.array([info.min, 0, 1, info.max], dtype=dtype)


def infer(server, model: str, document: dict, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}/v2/models/{model}/infer", json=document, timeout=30, **kwargs)


def fp32_input(data=(1.0, 2.0), name="INPUT0", datatype="FP32", shape=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": list(data)}


def test_server_metadata_and_health(core_server, client):
    metadata = client.get_server_metadata()
    assert metadata["name"] == "triserve"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(metadata["extensions"])
    assert client.is_server_live() and client.is_server_ready()


def test_model_metadata_config_and_readiness(core_server, client):
    metadata = client.get_model_metadata("identity_fp32")
    assert metadata["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}]
    assert client.get_model_metadata("identity_fp32", "1")["name"] == "identity_fp32"
    config = client.get_model_config("identity_fp32_batched")
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32"
    assert client.is_model_ready("identity_fp32") and client.is_model_ready("identity_fp32", "1")
    assert not client.is_model_ready("no_such_model")
    response = requests.get(f"{core_server.base_url}/v2/models/no_such_model", timeout=10)
    assert response.status_code == 404 and "no_such_model" in response.json()["error"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_datatype_round_trips(client, dtype, binary):
    data = sample(DTYPES[dtype])
    datatype = "BYTES" if dtype == "bytes" else dtype.upper()
    tensor = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer(f"identity_{dtype}", [tensor], outputs=[output])
    got = result.as_numpy("OUTPUT0")
    if dtype == "bytes":
        # tritonclient gives JSON strings back as str, binary elements as bytes.
        assert [item.decode("utf-8") if binary else item for item in got] == list(data)
    else:
        assert got.dtype == data.dtype and np.array_equal(got, data)
    assert result.get_output("OUTPUT0")["shape"] == [4]


def test_json_request_wire_format(core_server):
    document = {
        "id": "request-7",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1], "data": [[1.5, 2.5], [3.5, 4.5]]}],
    }
    response = infer(core_server, "identity_fp32", document)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "request-7"
    assert body["model_name"] == "identity_fp32" and body["model_version"] == "1"
    assert body["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [4], "data": [1.5, 2.5, 3.5, 4.5]}]


def test_binary_request_and_response_framing(core_server):
    values = np.arange(6, dtype=np.float32)
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [6],
                    "parameters": {"binary_data_size": values.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = requests.post(
        f"{core_server.base_url}/v2/models/identity_fp32/infer",
        data=header + values.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    json_length = int(response.headers["Inference-Header-Content-Length"])
    body = json.loads(response.content[:json_length])
    assert body["outputs"][0]["parameters"] == {"binary_data_size": values.nbytes}
    assert "data" not in body["outputs"][0]
    assert np.array_equal(np.frombuffer(response.content[json_length:], dtype=np.float32), values)


def test_bytes_output_that_is_not_utf8_is_sent_binary(core_server, client):
    tensor = httpclient.InferInput("INPUT0", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"\xff\xfe", b"ok"], dtype=np.object_), binary_data=True)
    result = client.infer("identity_bytes", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)])
    assert list(result.as_numpy("OUTPUT0")) == [b"\xff\xfe", b"ok"]
    assert result.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 4 + 2 + 4 + 2


def test_gzip_compressed_request(client):
    tensor = httpclient.InferInput("INPUT0", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
    result = client.infer("identity_fp32", [tensor], request_compression_algorithm="gzip")
    assert result.as_numpy("OUTPUT0").tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("model", "document", "status", "words"),
    [
        ("no_such_model", {"inputs": [fp32_input()]}, 404, ["no_such_model"]),
        ("identity_fp32", {"inputs": []}, 400, ["inputs"]),
        ("identity_fp32", {"inputs": [fp32_input(), fp32_input(name="EXTRA")]}, 400, ["EXTRA"]),
        ("identity_fp32", {"inputs": [fp32_input(datatype="INT32", data=[1, 2])]}, 400, ["INPUT0", "INT32"]),
        ("identity_fp32", {"inputs": [fp32_input(shape=[3])]}, 400, ["INPUT0", "[3]"]),
        ("identity_fp32", {"inputs": [fp32_input(data=[1, "two"])]}, 400, ["INPUT0", "numbers"]),
        ("identity_int8", {"inputs": [fp32_input(datatype="INT8", data=[1, 300])]}, 400, ["INPUT0", "INT8 range"]),
        ("identity_fp32", {"inputs": [fp32_input(datatype="FP128")]}, 400, ["INPUT0", "FP128"]),
        ("identity_fp32", {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1]}]}, 400, ["INPUT0", "no 'data'"]),
        ("identity_fp32", {"inputs": [fp32_input()], "ouputs": []}, 400, ["ouputs"]),
        ("identity_fp32", {"inputs": [fp32_input()], "outputs": [{"name": "NOPE"}]}, 400, ["NOPE"]),
        ("identity_fp32", {"inputs": [fp32_input()], "parameters": {"binary_data_output": "yes"}}, 400, ["binary_data_output"]),
        ("stream_words", {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a b"]}]}, 400, ["decoupled", "streaming"]),
        ("error_response", {"inputs": [fp32_input()]}, 400, ["INPUT0 was rejected"]),
    ],
    ids=["unknown-model", "no-inputs", "extra-input", "wrong-datatype", "shape-mismatch", "wrong-json-type",
         "int-overflow", "unknown-datatype", "no-data", "unknown-field", "unknown-output", "bad-flag",
         "decoupled", "model-error"],
)
def test_bad_requests_name_the_problem(core_server, model, document, status, words):
    response = infer(core_server, model, document)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message


BINARY_HEADER = json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
).encode()


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b'{"inputs": [', {}, ["malformed JSON"]),
        (b"[1, 2]", {}, ["JSON object"]),
        (BINARY_HEADER, {"Inference-Header-Content-Length": "999"}, ["Inference-Header-Content-Length"]),
        (BINARY_HEADER + b"\x00\x00", {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
         ["INPUT0", "binary_data_size"]),
        (BINARY_HEADER + bytes(12), {"Inference-Header-Content-Length": str(len(BINARY_HEADER))},
         ["4 bytes of binary data"]),
        (b"not gzip", {"Content-Encoding": "gzip"}, ["gzip"]),
    ],
    ids=["malformed-json", "not-an-object", "header-too-long", "binary-too-short", "binary-too-long", "bad-gzip"],
)
def test_malformed_bodies_are_400(core_server, body, headers, words):
    response = requests.post(f"{core_server.base_url}/v2/models/identity_fp32/infer", data=body,
                             headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["error"]
    assert requests.get(f"{core_server.base_url}/v2/health/ready", timeout=10).status_code == 200


def test_unknown_route_is_a_json_404(core_server):
    response = requests.get(f"{core_server.base_url}/v2/nothing/here", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_statistics_count_known_requests(core_server, client):
    def counts() -> tuple[int, int]:
        (stats,) = client.get_inference_statistics("identity_uint16", "1")["model_stats"]
        return stats["inference_count"], stats["inference_stats"]["success"]["count"]

    before = counts()
    tensor = httpclient.InferInput("INPUT0", [1], "UINT16")
    tensor.set_data_from_numpy(np.array([7], dtype=np.uint16))
    for _ in range(3):
        client.infer("identity_uint16", [tensor])
    assert counts() == (before[0] + 3, before[1] + 3)
    every = client.get_inference_statistics()["model_stats"]
    assert {"identity_uint16", "chat_echo"} <= {entry["name"] for entry in every}
    assert requests.get(f"{core_server.base_url}/v2/models/no_such_model/stats", timeout=10).status_code == 404


def test_repository_index_and_control_needs_explicit_mode(core_server, client):
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["identity_fp32"]["state"] == "READY"
    with pytest.raises(InferenceServerException, match="explicit"):
        client.load_model("identity_fp32")


def test_load_and_unload_in_explicit_mode():
    args = ["--model-control-mode", "explicit", "--load-model", "identity_int32"]
    with ServerProcess(TEST_REPOSITORY, args=args) as server, httpclient.InferenceServerClient(server.http_url) as client:
        assert not client.is_model_ready("identity_fp64")
        client.load_model("identity_fp64")
        assert client.is_model_ready("identity_fp64")
        client.unload_model("identity_fp64")
        assert not client.is_model_ready("identity_fp64")

        config = client.get_model_config("identity_int32")
        config["max_batch_size"] = 4
        client.load_model("identity_int32", config=json.dumps(config))
        assert client.get_model_config("identity_int32")["max_batch_size"] == 4

        response = requests.post(f"{server.base_url}/v2/repository/models/identity_fp64/load",
                                 json={"parameters": {"file:1/model.py": "eA=="}}, timeout=10)
        assert response.status_code == 400 and "file:1/model.py" in response.json()["error"]
