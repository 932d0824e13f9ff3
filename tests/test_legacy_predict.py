"""The seed's JSON predict (``<base>/MutilBackendService/Predict``), read back exactly as
the seed's LangChain ``ChatGLM`` class (section 四 of the article) reads it."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import requests


# --- the seed's client code, as published ----------------------------------------------

def _deserialize_bytes_tensor(encoded_tensor):
    strs = list()
    offset = 0
    val_buf = encoded_tensor
    while offset < len(val_buf):
        l = struct.unpack_from("<I", val_buf, offset)[0]  # noqa: E741
        offset += 4
        sb = struct.unpack_from("<{}s".format(l), val_buf, offset)[0]
        offset += l
        strs.append(sb)
    return np.array(strs, dtype=np.object_)


def _infer(url, model_name, query, history, temperature, max_token, history_len):
    query = base64.b64encode(query.encode("utf-8")).decode("utf-8")
    history_origin = np.asarray(history).reshape((-1,))
    history = [base64.b64encode(item.encode("utf-8")).decode("utf-8") for item in history_origin]
    temperature = base64.b64encode(temperature.encode("utf-8")).decode("utf-8")
    max_token = base64.b64encode(max_token.encode("utf-8")).decode("utf-8")
    history_len = base64.b64encode(history_len.encode("utf-8")).decode("utf-8")
    data = {
        "model_name": model_name,
        "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [query]}},
            {"name": "history", "datatype": "BYTES", "shape": [-1], "contents": {"bytes_contents": history}},
            {"name": "temperature", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [temperature]}},
            {"name": "max_token", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [max_token]}},
            {"name": "history_len", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [history_len]}},
        ],
        "outputs": [{"name": "response"}, {"name": "history"}],
    }
    return requests.post(url=url, data=json.dumps(data, ensure_ascii=True),
                         headers={"Content_Type": "application/json"}, timeout=120)


def chat(url, model_name, query, history):
    """The seed's ``ChatGLM.chat``: the reply and the history reshaped from outputs[1].shape."""
    response = _infer(url, model_name, query, history, "0.01", "32000", "10")
    if response.status_code != 200:
        return "查询结果错误"
    result = json.loads(response.text)
    res = base64.b64decode(result["raw_output_contents"][0].encode("utf-8"))
    res_response = _deserialize_bytes_tensor(res)[0].decode()
    history_shape = result["outputs"][1]["shape"]
    history_enc = base64.b64decode(result["raw_output_contents"][1].encode("utf-8"))
    res_history = np.array([i.decode() for i in _deserialize_bytes_tensor(history_enc)]).reshape(history_shape).tolist()
    return res_response, res_history


# --- tests --------------------------------------------------------------------------------

SEED_HISTORY = [["你知道鸡兔同笼问题么", "鸡兔同笼问题是一个经典的数学问题。"]]


@pytest.mark.parametrize("service", ["MutilBackendService", "MultiBackendService"])
def test_seed_client_reads_reply_and_history(core_server, service):
    url = f"{core_server.base_url}/{service}/Predict"
    reply, history = chat(url, "chat_echo", "请给出一个具体示例", SEED_HISTORY)
    assert reply.startswith("echo: 请给出一个具体示例")
    # chat_echo builds its history as the seed's model.py does: an [n, 2] array of pairs.
    assert history == [*SEED_HISTORY, ["请给出一个具体示例", reply]]


def test_served_under_a_deployment_prefix(core_server):
    url = f"{core_server.base_url}/some/deployment/prefix/MutilBackendService/Predict"
    reply, history = chat(url, "seed_config", "你好", [])
    assert reply.startswith("你好 @ ")
    assert history == [["你好", reply]]


def test_response_is_protobuf_json_with_proto_field_names(core_server):
    response = _infer(f"{core_server.base_url}/MutilBackendService/Predict", "chat_echo", "hi", [], "0.1", "5", "0")
    body = response.json()
    assert body["model_name"] == "chat_echo"
    assert [output["name"] for output in body["outputs"]] == ["response", "history"]
    # The model's 0-d response keeps its shape; the int64 dims are JSON integers.
    assert body["outputs"][0] == {"name": "response", "datatype": "BYTES", "shape": []}
    assert body["outputs"][1]["shape"] == [1, 2]


def test_raw_input_contents_and_numeric_tensors(core_server):
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    document = {
        "model_name": "identity_fp32",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}],
        "raw_input_contents": [base64.b64encode(values.tobytes()).decode()],
    }
    response = requests.post(f"{core_server.base_url}/MultiBackendService/Predict", json=document, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["outputs"][0]["shape"] == [3]
    raw = base64.b64decode(body["raw_output_contents"][0])
    assert np.frombuffer(raw, dtype=np.float32).tolist() == values.tolist()


@pytest.mark.parametrize(
    ("document", "status", "words"),
    [
        ({"model_name": "chat_echo", "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                                                   "contents": {"bytes_contents": ["not base64!"]}}]},
         400, ["bytes_contents"]),
        ({"model_name": "identity_fp32", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": ["x"]}]},
         400, ["shape"]),
        ({"model_name": "identity_fp32", "inptus": []}, 400, ["inptus"]),
        ({"model_name": "identity_fp32", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2],
                                                       "contents": {"fp32_contents": [1.0]}}]},
         400, ["INPUT0"]),
        ({"model_name": "no_such_model", "inputs": []}, 404, ["no_such_model"]),
    ],
    ids=["invalid-base64", "wrong-field-type", "unknown-field", "count-mismatch", "unknown-model"],
)
def test_errors_are_json_with_4xx(core_server, document, status, words):
    response = requests.post(f"{core_server.base_url}/MutilBackendService/Predict", json=document, timeout=30)
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["error"]


def test_malformed_json_is_400(core_server):
    response = requests.post(f"{core_server.base_url}/MutilBackendService/Predict", data=b"{nope", timeout=10)
    assert response.status_code == 400 and "ModelInferRequest" in response.json()["error"]


def test_non_utf8_body_is_400(core_server):
    response = requests.post(f"{core_server.base_url}/MultiBackendService/Predict",
                             data=b'{"model_name": "chat_echo\xff\xfe"}', timeout=10)
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]


@pytest.mark.parametrize("value", ["aGVsbG8=!!", "aGVs bG8=", "a", "aGVsbG8===", "aGVsbG8=aGVs", "aGVsbG*="],
                         ids=["junk-after", "space", "one-char", "three-pads", "pad-inside", "star"])
def test_invalid_base64_is_400_naming_the_input(core_server, value):
    """protobuf's own decoder would drop what it cannot read and pass the rest on as other bytes."""
    document = {"model_name": "identity_bytes", "inputs": [
        {"name": "INPUT0", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [value]}}]}
    response = requests.post(f"{core_server.base_url}/MultiBackendService/Predict", json=document, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "input 'INPUT0': contents.bytes_contents[0] is not valid base64"
    document = {"model_name": "identity_fp32", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}],
                "raw_input_contents": [value]}
    response = requests.post(f"{core_server.base_url}/MultiBackendService/Predict", json=document, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "raw_input_contents[0] (input 'INPUT0') is not valid base64"


@pytest.mark.parametrize("value", ["aGVsbG8=", "aGVsbG8", "-_-_", "+/+/"], ids=["padded", "unpadded", "url-safe",
                                                                          "standard"])
def test_valid_base64_spellings_are_decoded(core_server, value):
    """Proto3 JSON takes standard and URL-safe base64, with or without padding."""
    document = {"model_name": "identity_bytes", "inputs": [
        {"name": "INPUT0", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [value]}}]}
    response = requests.post(f"{core_server.base_url}/MultiBackendService/Predict", json=document, timeout=10)
    assert response.status_code == 200, response.text
    raw = base64.b64decode(response.json()["raw_output_contents"][0])
    expected = base64.urlsafe_b64decode(value.replace("+", "-").replace("/", "_") + "=" * (-len(value) % 4))
    assert raw == struct.pack("<I", len(expected)) + expected
