"""KServe manifests for a repository: a ``ServingRuntime`` and an ``InferenceService``.

The runtime runs ``triserve serve`` in triserve's container image on port 8080 (HTTP,
KServe v2 and the rest of triserve's HTTP surface) and 8081 (gRPC, ``grpc-v2``), with
Prometheus metrics on 8082. KServe downloads the repository from ``storageUri`` into
``/mnt/models``. The InferenceService asks for RawDeployment mode, because a Knative
(serverless) service exposes one port only and triserve serves two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import triserve
from triserve.deploy.spec import DeployError, resolve_models

HTTP_PORT = 8080
GRPC_PORT = 8081
METRICS_PORT = 8082
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri
RUNTIME_NAME = "triserve"
MODEL_FORMAT = "triserve"
DEFAULT_IMAGE = f"triserve:{triserve.__version__}"


@dataclass(frozen=True)
class KServeSpec:
    name: str
    models: tuple[str, ...]
    single_model: str | None  # DIR was one model folder: only it is loaded
    storage_uri: str
    image: str = DEFAULT_IMAGE
    cpu: float = 1
    memory: float = 0  # GB
    gpu: bool = False
    instances: int = 1
    max_replicas: int | None = None

    @classmethod
    def from_path(cls, path: Path, name: str, storage_uri: str | None = None,
                  image: str | None = None, **resources: Any) -> "KServeSpec":
        repository, models = resolve_models(Path(path))
        single = models[0] if (Path(path).resolve() / "config.pbtxt").is_file() else None
        spec = cls(name=name, models=models, single_model=single,
                   storage_uri=storage_uri or f"pvc://triserve-models/{name}",
                   image=image or DEFAULT_IMAGE,
                   **{k: v for k, v in resources.items() if v is not None})
        if spec.instances < 1 or (spec.max_replicas is not None and spec.max_replicas < spec.instances):
            raise DeployError("instances must be >= 1 and max-replicas >= instances")
        return spec

    def resources(self) -> dict[str, dict[str, str]]:
        amounts = {"cpu": _quantity(self.cpu)}
        if self.memory:
            amounts["memory"] = f"{_quantity(self.memory)}Gi"
        if self.gpu:
            amounts["nvidia.com/gpu"] = "1"
        return {"requests": dict(amounts), "limits": dict(amounts)}


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def serving_runtime(spec: KServeSpec) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": RUNTIME_NAME, "labels": {"app.kubernetes.io/name": "triserve"}},
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "annotations": {"prometheus.kserve.io/port": str(METRICS_PORT),
                            "prometheus.kserve.io/path": "/metrics"},
            "containers": [{
                "name": "kserve-container",
                "image": spec.image,
                "command": ["triserve"],
                "args": ["serve", f"--model-repository={MODEL_DIR}", "--host=0.0.0.0",
                         f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}",
                         f"--metrics-port={METRICS_PORT}"],
                "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"},
                          {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                                   "periodSeconds": 5, "failureThreshold": 3},
                "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
                                  "periodSeconds": 10, "failureThreshold": 6},
                "resources": spec.resources(),
            }],
        },
    }


def inference_service(spec: KServeSpec) -> dict[str, Any]:
    model: dict[str, Any] = {
        "modelFormat": {"name": MODEL_FORMAT},
        "runtime": RUNTIME_NAME,
        "protocolVersion": "v2",
        "storageUri": spec.storage_uri,
        "resources": spec.resources(),
    }
    if spec.single_model is not None:
        # storageUri holds the repository; of it, serve only the model folder that was given
        model["args"] = ["--model-control-mode=explicit", f"--load-model={spec.single_model}"]
    predictor: dict[str, Any] = {"minReplicas": spec.instances,
                                 "maxReplicas": spec.max_replicas or spec.instances,
                                 "model": model}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": spec.name, "annotations": {
            "serving.kserve.io/deploymentMode": "RawDeployment",
            "serving.kserve.io/enable-prometheus-scraping": "true"}},
        "spec": {"predictor": predictor},
    }


def manifests(spec: KServeSpec) -> list[dict[str, Any]]:
    return [serving_runtime(spec), inference_service(spec)]


def manifests_yaml(spec: KServeSpec) -> str:
    header = (f"# KServe manifests for '{spec.name}' (models: {', '.join(spec.models)}), "
              f"written by triserve {triserve.__version__}.\n"
              f"# Put the model repository at {spec.storage_uri}; apply with kubectl apply -f.\n")
    return header + yaml.safe_dump_all(manifests(spec), sort_keys=False)
