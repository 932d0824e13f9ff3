"""The gRPC frontend against a real server, with the official tritonclient and raw service_pb2 stubs.

Every test talks to the session's ``core_server`` (tests/model_repository) on 127.0.0.1.
"""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from conftest import TEST_REPOSITORY
from serverproc import ServerProcess

IDENTITY_DATA = {
    "BOOL": np.array([True, False, True]),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-32768, 1, 32767], dtype=np.int16),
    "INT32": np.array([-(2**31), 2, 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 3, 2**63 - 1], dtype=np.int64),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 2, 65535], dtype=np.uint16),
    "UINT32": np.array([0, 3, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 4, 2**64 - 1], dtype=np.uint64),
    "FP16": np.array([-1.5, 0.0, 65504.0], dtype=np.float16),
    "FP32": np.array([-1.25, 3.0e38, 1e-30], dtype=np.float32),
    "FP64": np.array([-2.5, 1e300, 5e-324], dtype=np.float64),
    "BYTES": np.array(["你好".encode(), b"", b"a\x00b"], dtype=np.object_),
}

# Which typed ``InferTensorContents`` field carries each datatype (FP16 has none).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def client(core_server):
    with grpcclient.InferenceServerClient(core_server.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="module")
def channel(core_server):
    with grpc.insecure_channel(core_server.grpc_url) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def model_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def tensor_input(name: str, array: np.ndarray, datatype: str | None = None) -> grpcclient.InferInput:
    if datatype is None:
        datatype = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def text_input(name: str, text: str) -> grpcclient.InferInput:
    return tensor_input(name, np.array([text.encode()], dtype=np.object_))


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def stream(core_server, *requests: dict) -> list[tuple[grpcclient.InferResult | None, Exception | None]]:
    """Send ``async_stream_infer`` requests on one stream; every (result, error) the stream delivered."""
    received: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(core_server.grpc_url) as triton:
        triton.start_stream(callback=lambda result, error: received.put((result, error)))
        for request in requests:
            triton.async_stream_infer(**request)
        triton.stop_stream()  # half-closes, then waits until the server has answered everything
    return list(received.queue)


def final_flag(result: grpcclient.InferResult) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


# --- server and model information ------------------------------------------------


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("identity_fp32")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "triserve"
    assert metadata["version"]
    assert metadata["extensions"]


def test_model_metadata(client):
    metadata = client.get_model_metadata("chat_echo")
    assert metadata.name == "chat_echo"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs][:2] == [
        ("prompt", "BYTES", [-1]), ("history", "BYTES", [-1])]
    assert {t.name for t in metadata.outputs} == {"response", "history"}
    assert "1" in metadata.versions


def test_model_config(client):
    config = client.get_model_config("stream_words").config
    assert config.name == "stream_words"
    assert config.backend == "python"
    assert config.model_transaction_policy.decoupled
    assert config.input[0].name == "prompt"
    assert list(config.input[0].dims) == [-1]


def test_unknown_model_is_not_found(client):
    for call in (
        lambda: client.get_model_metadata("no_such_model"),
        lambda: client.get_model_config("no_such_model"),
        lambda: client.infer("no_such_model", [text_input("INPUT0", "x")]),
    ):
        error = grpc_error(call)
        assert error.status() == "StatusCode.NOT_FOUND"
        assert "no_such_model" in error.message()


def test_grpc_health_check(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_repository_index(client):
    index = client.get_model_repository_index().models
    states = {model.name: model.state for model in index}
    assert states["identity_fp32"] == "READY"
    assert states["stream_words"] == "READY"


def test_shared_memory_is_unimplemented_with_a_reason(client):
    error = grpc_error(client.get_system_shared_memory_status)
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "shared memory" in error.message()


# --- inference ---------------------------------------------------------------------


@pytest.mark.parametrize("datatype", IDENTITY_DATA)
def test_every_datatype_round_trips(client, datatype):
    data = IDENTITY_DATA[datatype]
    result = client.infer(model_name(datatype), [tensor_input("INPUT0", data, datatype)], request_id="rt-1")
    output = result.as_numpy("OUTPUT0")
    assert result.get_response().id == "rt-1"
    assert result.get_output("OUTPUT0").datatype == datatype
    assert output.shape == data.shape
    assert output.dtype == data.dtype
    assert output.tolist() == data.tolist()


@pytest.mark.parametrize("datatype", CONTENTS_FIELD)
def test_typed_contents_with_inferred_dimension(stub, datatype):
    """Data in ``contents`` instead of raw bytes; shape ``[-1]`` takes the element count."""
    data = IDENTITY_DATA[datatype]
    request = service_pb2.ModelInferRequest(model_name=model_name(datatype))
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[-1])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.tolist())
    result = grpcclient.InferResult(stub.ModelInfer(request))
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()
    assert list(result.get_output("OUTPUT0").shape) == [3]


def test_tensor_larger_than_grpc_default_limit(client):
    data = np.arange(2_000_000, dtype=np.float32)  # 8 MB, twice gRPC's default 4 MB message limit
    result = client.infer("identity_fp32", [tensor_input("INPUT0", data)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_seed_client_raw_request(stub):
    """The seed's hand-built request: BYTES contents, history with shape [-1], named outputs."""
    history = ["你知道鸡兔同笼问题么", "鸡兔同笼问题是一个经典的数学问题。"]
    request = service_pb2.ModelInferRequest(model_name="chat_echo")
    for name, shape, values in (
        ("prompt", [1], ["请给出一个具体示例"]),
        ("history", [-1], history),
        ("temperature", [1], ["0.01"]),
        ("max_token", [1], ["16000"]),
        ("history_len", [1], ["10"]),
    ):
        tensor = service_pb2.ModelInferRequest().InferInputTensor()
        tensor.name = name
        tensor.datatype = "BYTES"
        tensor.shape.extend(shape)
        tensor.contents.bytes_contents.extend(value.encode("utf8") for value in values)
        request.inputs.extend([tensor])
    for name in ("response", "history"):
        output = service_pb2.ModelInferRequest().InferRequestedOutputTensor()
        output.name = name
        request.outputs.extend([output])

    response = stub.ModelInfer(request)

    assert [output.name for output in response.outputs] == ["response", "history"]
    reply = deserialize_bytes_tensor(response.raw_output_contents[0])
    expected_reply = "echo: 请给出一个具体示例 (temperature=0.01, max_token=16000)"
    assert [item.decode() for item in reply] == [expected_reply]
    assert list(response.outputs[1].shape) == [2, 2]
    new_history = [item.decode() for item in deserialize_bytes_tensor(response.raw_output_contents[1])]
    assert new_history == history + ["请给出一个具体示例", reply[0].decode()]


# --- bad requests ------------------------------------------------------------------


def raw_infer_error(stub, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    return caught.value


def fp32_request(**tensor_fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", **tensor_fields)
    return request


@pytest.mark.parametrize(
    "request_, expected",
    [
        (fp32_request(datatype="FP32", shape=[3], contents={"fp32_contents": [1, 2]}),
         "input 'INPUT0' has shape [3] (3 elements) but 2 elements"),
        (fp32_request(datatype="FP32", shape=[2], contents={"int_contents": [1, 2]}),
         "input 'INPUT0' has datatype FP32"),
        (fp32_request(datatype="FLOAT", shape=[1], contents={"fp32_contents": [1]}),
         "input 'INPUT0' has unknown datatype 'FLOAT'"),
        (service_pb2.ModelInferRequest(
            model_name="identity_fp32", raw_input_contents=[b"\0" * 4],
            inputs=[{"name": "INPUT0", "datatype": "FP32", "shape": [1],
                     "contents": {"fp32_contents": [1]}}]),
         "input 'INPUT0' has data in both 'contents' and raw_input_contents"),
        (service_pb2.ModelInferRequest(
            model_name="identity_fp32", raw_input_contents=[b"\0" * 6],
            inputs=[{"name": "INPUT0", "datatype": "FP32", "shape": [-1]}]),
         "input 'INPUT0': raw data of 6 bytes"),
        (fp32_request(datatype="FP32", shape=[2, -1, -1], contents={"fp32_contents": [1, 2]}),
         "input 'INPUT0' has invalid shape"),
    ],
    ids=["count-vs-shape", "wrong-contents-field", "unknown-datatype", "contents-and-raw", "raw-size",
         "two-wildcards"],
)
def test_bad_input_is_invalid_argument_naming_it(stub, client, request_, expected):
    error = raw_infer_error(stub, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    assert client.infer("identity_fp32", [tensor_input("INPUT0", np.ones(2, np.float32))])


def test_input_the_model_does_not_have_is_invalid_argument(client):
    error = grpc_error(lambda: client.infer("identity_fp32", [tensor_input("WRONG", np.ones(2, np.float32))]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "WRONG" in error.message()


def test_unary_infer_on_decoupled_model_points_to_streaming(client):
    error = grpc_error(lambda: client.infer("stream_words", [text_input("prompt", "a b")]))
    assert error.status() == "StatusCode.UNIMPLEMENTED"  # Triton: UNSUPPORTED -> UNIMPLEMENTED
    assert "stream" in error.message()


def test_model_errors_reach_the_client_and_the_server_keeps_serving(client):
    data = np.ones(2, np.float32)
    raised = grpc_error(lambda: client.infer("raises", [tensor_input("INPUT0", data)]))
    assert "raises: this model always fails in execute" in raised.message()
    rejected = grpc_error(lambda: client.infer("error_response", [tensor_input("INPUT0", data)]))
    assert rejected.status() == "StatusCode.INVALID_ARGUMENT"
    assert "error_response: INPUT0 was rejected" in rejected.message()
    again = grpc_error(lambda: client.infer("raises", [tensor_input("INPUT0", data)]))
    assert "raises: this model always fails in execute" in again.message()
    result = client.infer("identity_fp32", [tensor_input("INPUT0", data)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_statistics_count_known_requests(client):
    def success_count() -> int:
        (stats,) = client.get_inference_statistics("identity_int16").model_stats
        return stats.inference_stats.success.count

    before = success_count()
    for _ in range(3):
        client.infer("identity_int16", [tensor_input("INPUT0", np.arange(4, dtype=np.int16))])
    (stats,) = client.get_inference_statistics("identity_int16").model_stats
    assert stats.name == "identity_int16"
    assert stats.version == "1"
    assert success_count() == before + 3
    assert stats.inference_count >= 3
    assert stats.last_inference > 0


# --- streaming -------------------------------------------------------------------


def test_stream_decoupled_without_empty_final_response(core_server):
    replies = stream(core_server, dict(
        model_name="stream_words", inputs=[text_input("prompt", "one two three")], request_id="w1"))
    assert [error for _, error in replies] == [None] * 3
    assert [result.as_numpy("word").tolist() for result, _ in replies] == [[b"one"], [b"two"], [b"three"]]
    assert {result.get_response().id for result, _ in replies} == {"w1"}
    assert [final_flag(result) for result, _ in replies] == [False, False, False]


def test_stream_decoupled_with_empty_final_response(core_server):
    replies = stream(core_server, dict(model_name="stream_words", inputs=[text_input("prompt", "one two")],
                                       request_id="w2", enable_empty_final_response=True))
    results = [result for result, error in replies if error is None]
    assert len(results) == len(replies) == 3
    assert [final_flag(result) for result in results] == [False, False, True]
    assert results[-1].get_response().outputs == []
    assert results[-1].get_response().id == "w2"
    assert [result.as_numpy("word").tolist() for result in results[:2]] == [[b"one"], [b"two"]]


def test_stream_many_requests_in_flight_interleave_by_id(core_server):
    requests = [dict(model_name="stream_words", inputs=[text_input("prompt", f"{n} {n} {n}")],
                     request_id=f"s{n}") for n in range(4)]
    requests += [dict(model_name="identity_fp32", inputs=[tensor_input("INPUT0", np.full(2, n, np.float32))],
                      request_id=f"p{n}") for n in range(4)]
    replies = stream(core_server, *requests)
    assert all(error is None for _, error in replies)
    by_id: dict[str, list] = {}
    for result, _ in replies:
        by_id.setdefault(result.get_response().id, []).append(result)
    for n in range(4):
        assert [r.as_numpy("word").tolist() for r in by_id[f"s{n}"]] == [[str(n).encode()]] * 3
        (plain,) = by_id[f"p{n}"]
        assert plain.as_numpy("OUTPUT0").tolist() == [n, n]
        assert final_flag(plain)


def test_stream_errors_do_not_end_the_stream(core_server):
    data = np.ones(2, np.float32)
    replies = stream(
        core_server,
        dict(model_name="raises", inputs=[tensor_input("INPUT0", data)], request_id="bad-model"),
        dict(model_name="no_such_model", inputs=[tensor_input("INPUT0", data)], request_id="bad-name"),
        dict(model_name="identity_fp32", inputs=[tensor_input("WRONG", data)], request_id="bad-input"),
        dict(model_name="identity_fp32", inputs=[tensor_input("INPUT0", data)], request_id="good"),
    )
    errors = sorted(str(error) for _, error in replies if error is not None)
    assert len(errors) == 3
    assert any("raises: this model always fails in execute" in error for error in errors)
    assert any("no_such_model" in error for error in errors)
    assert any("WRONG" in error for error in errors)
    (good,) = [result for result, error in replies if error is None]
    assert good.get_response().id == "good"
    assert good.as_numpy("OUTPUT0").tolist() == [1.0, 1.0]


def words_sent(core_server) -> int:
    """How many words slow_stream's instance has streamed so far (its ``__count__`` prompt)."""
    ((result, error),) = stream(core_server, dict(model_name="slow_stream",
                                                  inputs=[text_input("prompt", "__count__")]))
    assert error is None
    return int(result.as_numpy("word")[0])


def test_cancelled_stream_stops_the_model_and_leaves_the_server_serving(core_server):
    before = words_sent(core_server)
    received: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(core_server.grpc_url) as triton:
        triton.start_stream(callback=lambda result, error: received.put((result, error)))
        triton.async_stream_infer("slow_stream", [text_input("prompt", "word " * 1000)], request_id="long")
        first, error = received.get(timeout=30)
        assert error is None and first.get_response().id == "long"
        triton.stop_stream(cancel_requests=True)
    # the one instance answers the count only once the cancelled execute returned:
    # it stopped early (1000 words take 10 s at the model's 0.01 s per word)
    sent = words_sent(core_server) - before
    assert 1 <= sent < 1000
    replies = stream(core_server, dict(model_name="slow_stream", inputs=[text_input("prompt", "still here")],
                                       request_id="after"))
    assert [result.as_numpy("word").tolist() for result, _ in replies] == [[b"still"], [b"here"]]


# --- model control -----------------------------------------------------------------


def test_model_control_needs_explicit_mode(client):
    error = grpc_error(lambda: client.load_model("identity_fp32"))
    assert "--model-control-mode explicit" in error.message()


@pytest.fixture(scope="module")
def explicit_server():
    args = ["--model-control-mode", "explicit", "--load-model", "identity_fp32"]
    with ServerProcess(TEST_REPOSITORY, args=args) as server:
        yield server


def test_load_with_config_and_unload(explicit_server):
    config = {
        "backend": "python",
        "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_INT8", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_INT8", "dims": [-1]}],
    }
    with grpcclient.InferenceServerClient(explicit_server.grpc_url) as triton:
        assert not triton.is_model_ready("identity_int8")
        triton.load_model("identity_int8", config=json.dumps(config))
        assert triton.is_model_ready("identity_int8")
        assert triton.get_model_config("identity_int8").config.max_batch_size == 4
        data = np.array([[1, -2]], dtype=np.int8)
        result = triton.infer("identity_int8", [tensor_input("INPUT0", data)])
        assert result.as_numpy("OUTPUT0").tolist() == [[1, -2]]

        triton.unload_model("identity_int8")
        assert not triton.is_model_ready("identity_int8")
        states = {m.name: m.state for m in triton.get_model_repository_index().models}
        assert states["identity_int8"] == "UNAVAILABLE"
        assert states["identity_fp32"] == "READY"


def test_load_rejects_what_it_cannot_honour(explicit_server):
    with grpcclient.InferenceServerClient(explicit_server.grpc_url) as triton:
        error = grpc_error(lambda: triton.load_model("identity_int8", files={"file:1/model.py": b"x"}))
        assert error.status() == "StatusCode.UNIMPLEMENTED"
        assert "file:1/model.py" in error.message()
    request = service_pb2.RepositoryModelLoadRequest(model_name="identity_int8")
    request.parameters["colour"].string_param = "blue"
    with grpc.insecure_channel(explicit_server.grpc_url) as opened, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(opened).RepositoryModelLoad(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "colour" in caught.value.details()
