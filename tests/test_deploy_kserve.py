"""``triserve kserve DIR``: KServe manifests, checked against KServe's own SDK models.

KServe's Python SDK (``kserve.models``, generated from KServe's OpenAPI document) and
the Kubernetes client's models say, for each object, its fields (``attribute_map``),
their types (``openapi_types``) and which are required (the constructors refuse a
missing one). :func:`check` walks a manifest through them: an unknown field, a wrong
type or a missing required field fails the test. ``kserve`` is installed without its
server dependencies (scripts/install.sh --test), so only its models are imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).parent
CHAT_ECHO = TESTS / "model_repository" / "chat_echo"


def _kserve_models():
    """``kserve.models`` without running ``kserve/__init__`` (which starts importing its server)."""
    if "kserve.models" in sys.modules:
        return sys.modules["kserve.models"]
    found = importlib.util.find_spec("kserve")
    if found is None:
        pytest.fail("the kserve SDK is not installed: run scripts/install.sh --test")
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("kserve", None, is_package=True))
    package.__path__ = list(found.submodule_search_locations)
    sys.modules["kserve"] = package
    return importlib.import_module("kserve.models")


def _model_class(name: str):
    import kubernetes.client.models as k8s

    kserve = _kserve_models()
    for module in (kserve, k8s):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"no model class {name}")


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def check(value, type_name: str, where: str):
    """Build ``type_name`` from ``value`` strictly; AssertionError naming the bad field."""
    if type_name == "object":
        return value
    if type_name in _PRIMITIVES:
        assert isinstance(value, _PRIMITIVES[type_name]) and not (
            type_name != "bool" and isinstance(value, bool)), f"{where}: expected {type_name}, got {value!r}"
        return value
    if type_name.startswith(("list[", "List[")):
        assert isinstance(value, list), f"{where}: expected a list"
        return [check(item, type_name[5:-1], f"{where}[{i}]") for i, item in enumerate(value)]
    match = re.fullmatch(r"[dD]ict[(\[](\w+), (.+)[)\]]", type_name)
    if match:
        assert isinstance(value, dict), f"{where}: expected a mapping"
        return {k: check(v, match.group(2), f"{where}.{k}") for k, v in value.items()}
    cls = _model_class(type_name)
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = set(value) - set(by_json)
    assert not unknown, f"{where}: {type_name} has no field(s) {sorted(unknown)}"
    kwargs = {by_json[k]: check(v, cls.openapi_types[by_json[k]], f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a required field is missing or a value is not allowed
        raise AssertionError(f"{where}: {exc}") from None


def _manifests(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "triserve", "kserve", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def test_manifests_fit_kserve_schema_and_carry_the_settings():
    runtime, service = _manifests(str(CHAT_ECHO), "--name", "chatglm2-6b", "--cpu", "4",
                                  "--memory", "30", "--use-gpu", "--instances", "2",
                                  "--image", "registry.example/triserve:1")
    check(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    check(service, "V1beta1InferenceService", "InferenceService")

    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    container = runtime["spec"]["containers"][0]
    assert container["image"] == "registry.example/triserve:1"
    assert container["command"] == ["triserve"] and container["args"][0] == "serve"
    assert "--model-repository=/mnt/models" in container["args"]
    assert {"--http-port=8080", "--grpc-port=8081", "--host=0.0.0.0"} <= set(container["args"])
    assert [(p["containerPort"], p["name"]) for p in container["ports"]] == [(8080, "http1"), (8081, "h2c")]
    expected = {"cpu": "4", "memory": "30Gi", "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": expected, "limits": expected}

    predictor = service["spec"]["predictor"]
    assert service["metadata"]["name"] == "chatglm2-6b"
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 2
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
    # a model folder: the repository is its parent, and only that model is loaded
    assert predictor["model"]["args"] == ["--model-control-mode=explicit", "--load-model=chat_echo"]
    assert predictor["model"]["resources"] == container["resources"]


def test_a_whole_repository_serves_every_model_and_no_gpu_means_none(tmp_path):
    out = tmp_path / "triserve.yaml"
    result = subprocess.run([sys.executable, "-m", "triserve", "kserve", str(TESTS / "model_repository"),
                             "--cpu", "0.5", "--max-replicas", "3", "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    runtime, service = yaml.safe_load_all(out.read_text())
    check(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    check(service, "V1beta1InferenceService", "InferenceService")
    assert service["metadata"]["name"] == "model-repository"
    assert "args" not in service["spec"]["predictor"]["model"]
    assert service["spec"]["predictor"]["maxReplicas"] == 3
    assert runtime["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "0.5"}


def test_the_schema_check_rejects_what_kserve_would():
    runtime, service = _manifests(str(CHAT_ECHO))
    runtime["spec"]["containers"][0]["portz"] = []
    with pytest.raises(AssertionError, match="portz"):
        check(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    del runtime["spec"]["containers"][0]["portz"]
    del runtime["spec"]["containers"][0]["name"]  # required by Kubernetes' Container
    with pytest.raises(AssertionError, match="name"):
        check(runtime, "V1alpha1ServingRuntime", "ServingRuntime")
    service["spec"]["predictor"]["minReplicas"] = "2"
    with pytest.raises(AssertionError, match="minReplicas"):
        check(service, "V1beta1InferenceService", "InferenceService")


def test_bad_directory_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "triserve", "kserve", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "holds no model" in result.stderr
