"""The model repository against a real server: failures stay with their model,
version policies pick versions, and explicit model control loads and unloads.

Each server serves a small repository built in a temporary folder from the
identity model of tests/model_repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import TEST_REPOSITORY
from serverproc import ServerProcess, free_port
from tritonclient.utils import InferenceServerException

from triserve.options import ServerOptions
from triserve.server import StartupError, serve

IDENTITY_MODEL = TEST_REPOSITORY / "identity_fp32" / "1" / "model.py"

IDENTITY_CONFIG = """\
backend: "python" // the Python backend
{extra}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

BROKEN_CONFIG = """\
backend: "python" // fine so far
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
max_batch_sise: 4 // a typo
"""


def add_model(root, name: str, versions=(1,), extra: str = "", config: str | None = None) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "config.pbtxt").write_text(config or IDENTITY_CONFIG.format(extra=extra))
    for version in versions:
        (folder / str(version)).mkdir()
        shutil.copy(IDENTITY_MODEL, folder / str(version) / "model.py")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    add_model(root, "identity")
    add_model(root, "latest_two", versions=(1, 2, 3),
              extra="version_policy: { latest: { num_versions: 2 } }")
    add_model(root, "specific", versions=(1, 2, 3),
              extra="version_policy: { specific: { versions: [ 1, 3 ] } }")
    add_model(root, "broken_syntax", config=BROKEN_CONFIG)
    add_model(root, "onnx_model", config='platform: "onnxruntime_onnx"\n')
    add_model(root, "no_versions", versions=())
    return root


@pytest.fixture(scope="module")
def server(repository):
    # broken models stay UNAVAILABLE: without strict readiness the server turns ready anyway
    with ServerProcess(repository, args=["--strict-readiness", "false"]) as process:
        yield process


@pytest.fixture(scope="module")
def explicit_server(repository):
    args = ["--model-control-mode", "explicit", "--load-model", "identity"]
    with ServerProcess(repository, args=args) as process:
        yield process


def infer(process: ServerProcess, model: str, version: str = "") -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(process.http_url)
    data = np.array([1.5, -2.0], dtype=np.float32)
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor], model_version=version)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    return result


def index_rows(process: ServerProcess) -> dict[tuple[str, str], dict[str, str]]:
    client = httpclient.InferenceServerClient(process.http_url)
    return {(row["name"], row.get("version", "")): row for row in client.get_model_repository_index()}


def test_broken_models_fail_alone(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_ready()
    assert client.is_model_ready("identity")
    infer(server, "identity")
    for name in ("broken_syntax", "onnx_model", "no_versions"):
        assert not client.is_model_ready(name)

    rows = index_rows(server)
    broken = rows[("broken_syntax", "")]
    assert broken["state"] == "UNAVAILABLE"
    assert "broken_syntax/config.pbtxt:3:1: " in broken["reason"]
    assert "max_batch_sise" in broken["reason"]
    assert "platform 'onnxruntime_onnx' is not supported" in rows[("onnx_model", "")]["reason"]
    assert "no version folders" in rows[("no_versions", "")]["reason"]
    assert "failed to load model 'broken_syntax'" in server.log()


def test_strict_readiness_keeps_the_server_not_ready_while_a_model_failed(repository):
    # Triton's default: live, the good models serve, but /v2/health/ready says not ready
    process = ServerProcess(repository)
    try:
        process.start(until="live")
        client = httpclient.InferenceServerClient(process.http_url)
        deadline = time.monotonic() + 60
        while "model(s) loaded" not in process.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("identity")
        assert not client.is_server_ready()
    finally:
        process.stop()


def test_request_to_a_failed_model_says_why(server):
    with pytest.raises(InferenceServerException) as error:
        infer(server, "broken_syntax")
    assert "Request for unknown model: 'broken_syntax' has no available versions" in error.value.message()
    assert "max_batch_sise" in error.value.message()


def test_latest_policy_serves_the_newest_versions(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.get_model_metadata("latest_two")["versions"] == ["2", "3"]
    assert infer(server, "latest_two").get_response()["model_version"] == "3"
    assert infer(server, "latest_two", "2").get_response()["model_version"] == "2"
    with pytest.raises(InferenceServerException, match="'latest_two' version 1 is not found"):
        infer(server, "latest_two", "1")
    rows = index_rows(server)
    assert rows[("latest_two", "2")]["state"] == rows[("latest_two", "3")]["state"] == "READY"
    assert ("latest_two", "1") not in rows


def test_specific_policy_serves_the_listed_versions(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.get_model_metadata("specific")["versions"] == ["1", "3"]
    assert client.is_model_ready("specific", "1")
    assert not client.is_model_ready("specific", "2")


def test_model_control_is_refused_in_mode_none(server):
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="--model-control-mode explicit"):
        client.load_model("broken_syntax")


def test_explicit_mode_loads_only_named_models(explicit_server):
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    assert client.is_server_ready()
    assert client.is_model_ready("identity")
    assert not client.is_model_ready("latest_two")
    rows = index_rows(explicit_server)
    assert rows[("identity", "1")]["state"] == "READY"
    assert rows[("broken_syntax", "")]["state"] == ""  # present, never loaded


def test_explicit_load_and_unload(explicit_server):
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    client.load_model("identity")  # a reload keeps the model serving
    infer(explicit_server, "identity")
    client.load_model("latest_two")
    assert client.get_model_metadata("latest_two")["versions"] == ["2", "3"]
    infer(explicit_server, "latest_two")

    client.unload_model("latest_two")
    assert not client.is_model_ready("latest_two")
    assert index_rows(explicit_server)[("latest_two", "")]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="has no available versions"):
        infer(explicit_server, "latest_two")


def test_explicit_load_with_a_config_override(explicit_server):
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    override = {
        "backend": "python",
        "version_policy": {"all": {}},
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
    }
    client.load_model("specific", config=json.dumps(override))
    assert client.get_model_metadata("specific")["versions"] == ["1", "2", "3"]
    infer(explicit_server, "specific", "2")


def test_explicit_load_of_a_broken_model_reports_the_reason(explicit_server, repository):
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    with pytest.raises(InferenceServerException) as error:
        client.load_model("broken_syntax")
    assert "config.pbtxt:3:1:" in error.value.message()
    assert str(repository) not in error.value.message()  # no server paths in errors
    with pytest.raises(InferenceServerException, match="no model folder 'missing'") as error:
        client.load_model("missing")
    assert str(repository) not in error.value.message()
    assert client.is_model_ready("identity")  # the others keep serving


def test_explicit_load_refuses_names_outside_the_repository(explicit_server, repository, tmp_path):
    add_model(tmp_path, "escaped")  # a loadable model, but not in the repository
    escaped = tmp_path / "escaped"
    client = grpcclient.InferenceServerClient(explicit_server.grpc_url)
    for name in (os.path.relpath(escaped, repository), str(escaped), "identity/1"):
        with pytest.raises(InferenceServerException) as error:
            client.load_model(name)
        assert error.value.status() == "StatusCode.NOT_FOUND"
        assert f"no model folder '{name}'" in error.value.message()
    assert client.is_model_ready("identity")


def test_failed_reload_keeps_serving_and_shows_why(explicit_server):
    client = httpclient.InferenceServerClient(explicit_server.http_url)
    with pytest.raises(InferenceServerException):
        client.load_model("identity", config="{not json")
    infer(explicit_server, "identity")
    row = index_rows(explicit_server)[("identity", "1")]
    assert row["state"] == "READY"
    assert row["reason"].startswith("reload failed: ")
    client.load_model("identity")  # a good reload clears the reason
    assert index_rows(explicit_server)[("identity", "1")]["reason"] == ""


def test_sigterm_stops_gracefully_and_ends_model_processes(tmp_path):
    add_model(tmp_path, "identity")
    with ServerProcess(tmp_path) as process:
        proc = process.proc
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "the identity model runs in its own process"
    # leaving the block sent SIGTERM and waited for the exit
    assert proc.returncode == 0
    log = process.log()
    assert "unloaded model 'identity' version 1" in log and "triserve stopped" in log
    assert not [child for child in children if Path(f"/proc/{child}").exists()]


def test_a_failed_start_stops_the_server_with_the_reason(tmp_path):
    # serve() itself: the CLI refuses a missing repository before it gets this far
    options = ServerOptions(model_repository=tmp_path / "gone", host="127.0.0.1", http_port=free_port(),
                            grpc_port=free_port(), metrics_port=free_port())
    with pytest.raises(StartupError, match=f"model repository {tmp_path / 'gone'} is not a directory"):
        asyncio.run(asyncio.wait_for(serve(options), 30))
