"""What to deploy: the models of a path, and each instance's resources (no Ray here).

``path`` is a model folder (it holds ``config.pbtxt``) or a whole repository (its
sub-folders holding ``config.pbtxt`` are the models), as the seed's ``deploy(path=...)``
and ``triserve serve --model-repository`` take them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from triserve.core.repository import model_folders

# Serve application and deployment names: what Ray Serve and KServe (a DNS label) both accept.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class DeployError(RuntimeError):
    """A deployment cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Autoscaling:
    """Serve's autoscaling_config: replicas follow the requests in flight per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0

    def to_serve(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}


@dataclass(frozen=True)
class DeploySpec:
    """One deployment (a Serve application): its models and what each instance gets."""

    name: str
    repository: Path
    models: tuple[str, ...]
    cpu: float = 1.0
    memory: float = 0.0  # GB per instance; 0: no reservation
    use_gpu: bool = False
    instances: int = 1
    autoscaling: Autoscaling | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    chatglm_model: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise DeployError(f"deployment name {self.name!r} is not allowed: use lower-case letters, "
                              "digits, '-' and '.', starting and ending with a letter or digit")
        if self.cpu <= 0:
            raise DeployError(f"cpu must be more than 0 (cores per instance), got {self.cpu}")
        if self.memory < 0:
            raise DeployError(f"memory must be 0 or more (GB per instance), got {self.memory}")
        if self.instances < 1 and self.autoscaling is None:
            raise DeployError(f"instances must be 1 or more, got {self.instances}")
        if self.autoscaling is not None and not (
                0 <= self.autoscaling.min_replicas <= self.autoscaling.max_replicas
                and self.autoscaling.max_replicas >= 1):
            raise DeployError("autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1")

    def actor_options(self) -> dict:
        """Ray resources one instance (a Serve replica) reserves."""
        options: dict = {"num_cpus": self.cpu, "num_gpus": 1 if self.use_gpu else 0}
        if self.memory:
            options["memory"] = int(self.memory * 1024 ** 3)
        return options

    def replicas(self) -> dict:
        """Serve's num_replicas, or its autoscaling_config."""
        if self.autoscaling is not None:
            return {"autoscaling_config": self.autoscaling.to_serve()}
        return {"num_replicas": self.instances}


def resolve_models(path: Path) -> tuple[Path, tuple[str, ...]]:
    """(repository, models) for a model folder or a whole repository; ``DeployError`` otherwise."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DeployError(f"{path} is not a directory: give a model folder or a model repository")
    if (path / "config.pbtxt").is_file():
        return path.parent, (path.name,)
    models = tuple(model_folders(path))
    if not models:
        raise DeployError(f"{path} holds no model: a model folder has a config.pbtxt, "
                          "a repository has model folders")
    return path, models
