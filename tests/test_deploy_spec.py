"""What ``triserve deploy`` checks before it touches a cluster, and that Ray stays optional."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from triserve.deploy.spec import DeployError, DeploySpec, resolve_models

TESTS = Path(__file__).parent


def test_a_model_folder_or_a_repository():
    assert resolve_models(TESTS / "model_repository" / "chat_echo") == (
        (TESTS / "model_repository").resolve(), ("chat_echo",))
    repository, models = resolve_models(TESTS / "model_repository")
    assert repository == (TESTS / "model_repository").resolve() and "chat_echo" in models


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="Chat_GLM"), "name 'Chat_GLM' is not allowed"),
    (dict(cpu=0), "cpu must be more than 0"),
    (dict(memory=-1), "memory must be 0 or more"),
    (dict(instances=0), "instances must be 1 or more"),
])
def test_bad_settings_are_refused_with_the_reason(kwargs, words):
    settings = {"name": "chat", "repository": Path("/tmp"), "models": ("m",), **kwargs}
    with pytest.raises(DeployError, match=words):
        DeploySpec(**settings)


def test_resources_per_instance():
    spec = DeploySpec(name="chatglm2-6b", repository=Path("/tmp"), models=("m",), cpu=4, memory=30,
                      use_gpu=True, instances=2)
    assert spec.actor_options() == {"num_cpus": 4, "num_gpus": 1, "memory": 30 * 1024 ** 3}
    assert spec.replicas() == {"num_replicas": 2}


def test_autoscaling_replaces_instances():
    from triserve.deploy.spec import Autoscaling

    spec = DeploySpec(name="chat", repository=Path("/tmp"), models=("m",),
                      autoscaling=Autoscaling(min_replicas=1, max_replicas=3, target_ongoing_requests=4))
    config = spec.replicas()["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"]) == (1, 3, 4)
    with pytest.raises(DeployError, match="min_replicas <= max_replicas"):
        DeploySpec(name="chat", repository=Path("/tmp"), models=("m",),
                   autoscaling=Autoscaling(min_replicas=3, max_replicas=1))


def test_sdk_refuses_bad_protocol_and_empty_path_before_reaching_ray(tmp_path):
    from triserve.deploy import TritonModel

    with pytest.raises(DeployError, match="protocol must be one of http, grpc"):
        TritonModel("x").deploy(TESTS / "model_repository" / "chat_echo", protocol="jsf")
    with pytest.raises(DeployError, match="holds no model"):
        TritonModel("x").deploy(tmp_path)


def test_ray_is_imported_only_by_deploy_commands_that_need_it():
    code = ("import sys, triserve.cli, triserve.server, triserve.deploy, triserve.deploy.kserve, "
            "triserve.deploy.commands, triserve.deploy.spec; "
            "triserve.cli.build_parser(); assert 'ray' not in sys.modules, 'ray was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_record_of_a_dead_triserve_cluster_is_forgotten(tmp_path):
    # triserve records the local Ray cluster it started (token auth on); once no cluster answers
    # (a reboot, `ray stop`) the record must go, or a cluster started later at its port would be
    # taken for triserve's own. TMPDIR isolates Ray's records from the machine's.
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "triserve_cluster"
    record.write_text("127.0.0.1:1")  # nothing listens on port 1
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    code = ("from triserve.deploy import cluster\n"
            "try:\n    cluster.connect(start=False)\n"
            "except cluster.DeployError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert "no local Ray cluster is running" in result.stdout, result.stderr
    assert not record.exists()
