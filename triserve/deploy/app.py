"""A repository as a Serve application: one deployment per model, and the front door."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ray import serve
from ray.serve import Application

import triserve
from triserve.deploy.frontdoor import FrontDoor
from triserve.deploy.replica import ModelReplica
from triserve.deploy.spec import Autoscaling, DeploySpec

# Serve's replica health check; a replica that fails it (or dies) is replaced.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Requests one replica takes at once: more than the LLM engine's slots, so its batcher fills.
MAX_ONGOING_REQUESTS = 64
CONSTRUCTOR_RETRIES = 3


def spec_to_dict(spec: DeploySpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["repository"] = str(spec.repository)
    return data


def spec_from_dict(data: dict[str, Any]) -> DeploySpec:
    data = dict(data)
    if data.get("autoscaling"):
        data["autoscaling"] = Autoscaling(**data["autoscaling"])
    data["models"] = tuple(data["models"])
    from pathlib import Path

    data["repository"] = Path(data["repository"])
    return DeploySpec(**data)


class Ingress(FrontDoor):
    """The front door, knowing the spec it was deployed with (for ``scale`` and ``status``)."""

    async def __init__(self, spec: dict[str, Any], handles: dict, options: dict[str, Any]):
        self._spec = spec
        await super().__init__(spec["name"], handles, options)

    def spec(self) -> dict[str, Any]:
        return self._spec


def _version(spec: DeploySpec, deployment: str) -> str:
    """A deployment's code version: what its replicas run (triserve, the spec but its replica
    counts). Serve restarts replicas when it changes; with it unchanged, a new num_replicas or
    autoscaling_config is applied in place. ``serve.run`` would otherwise pick a random
    version each call (Serve removed the public ``version`` option; ``_internal`` keeps it)."""
    unscaled = spec_to_dict(dataclasses.replace(spec, instances=1, autoscaling=None))
    text = json.dumps([triserve.__version__, deployment, unscaled], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(spec: DeploySpec) -> Application:
    """The Serve application of ``spec``: a deployment per model, the front door as ingress."""
    handles = {}
    for model in spec.models:
        deployment = serve.deployment(ModelReplica, name=model).options(
            version=_version(spec, model), _internal=True,
            ray_actor_options=spec.actor_options(),
            max_ongoing_requests=MAX_ONGOING_REQUESTS,
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
            graceful_shutdown_timeout_s=10,
            # a model that cannot load fails the deployment after a few tries, with its error
            max_constructor_retry_count=CONSTRUCTOR_RETRIES,
            **spec.replicas(),
        )
        handles[model] = deployment.bind(str(spec.repository), model, spec.models)
    options = {"model_repository": str(spec.repository), "host": spec.host,
               "http_port": spec.http_port, "grpc_port": spec.grpc_port,
               "metrics_port": spec.metrics_port, "chatglm_model": spec.chatglm_model}
    front = serve.deployment(Ingress, name="frontdoor").options(
        version=_version(spec, "frontdoor"), _internal=True,
        num_replicas=1,
        # on the head node (the endpoint clients are given), reserving no CPU of the models'
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        max_ongoing_requests=100_000,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    )
    # the front door is given the spec without its replica counts, so that scaling (a new
    # num_replicas or autoscaling_config of the model deployments) leaves it running
    unscaled = dataclasses.replace(spec, instances=1, autoscaling=None)
    return front.bind(spec_to_dict(unscaled), handles, options)
