"""The seed's SDK: ``TritonModel(name).deploy(...)`` returns a :class:`Predictor`."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from triserve.core import chat_contract as chat
from triserve.deploy import cluster
from triserve.deploy.spec import Autoscaling, DeployError, DeploySpec, resolve_models

logger = logging.getLogger("triserve")

PROTOCOLS = ("http", "grpc")


@dataclasses.dataclass
class Predictor:
    """A deployment's endpoints, and the seed's chat call against them."""

    name: str
    protocol: str
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    models: tuple[str, ...]
    chat_model: str | None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def predict_url(self) -> str:
        """The seed's JSON Predict URL (its LangChain class posts here)."""
        return f"{self.http_url}/MultiBackendService/Predict"

    @property
    def openai_url(self) -> str:
        return f"{self.http_url}/v1"

    @property
    def url(self) -> str:
        return self.http_url if self.protocol == "http" else self.grpc_url

    def predict(self, prompt: str, history: Sequence[Sequence[str]] | Sequence[str] = (),
                temperature: float = 0.01, max_token: int = 2048, history_len: int = 10,
                model: str | None = None, timeout: float = 120.0) -> tuple[str, list[list[str]]]:
        """One chat turn in the seed's contract; returns (response, history as [[q, a], ...])."""
        model = model or self.chat_model
        if model is None:
            raise DeployError(f"deployment '{self.name}' has no chat model; name one with model=")
        flat = [str(item) for item in np.asarray(list(history), dtype=object).reshape(-1)]
        values = {chat.PROMPT: [prompt], chat.HISTORY: flat, chat.TEMPERATURE: [str(temperature)],
                  chat.MAX_TOKEN: [str(max_token)], chat.HISTORY_LEN: [str(history_len)]}
        if self.protocol == "grpc":
            import tritonclient.grpc as client
            with client.InferenceServerClient(self.grpc_url) as triton:
                result = triton.infer(model, self._inputs(client, values),
                                      outputs=[client.InferRequestedOutput(n) for n in (chat.RESPONSE, chat.HISTORY)],
                                      client_timeout=timeout)
        else:
            import tritonclient.http as client
            with client.InferenceServerClient(f"{self.host}:{self.http_port}",
                                              network_timeout=timeout) as triton:
                result = triton.infer(model, self._inputs(client, values),
                                      outputs=[client.InferRequestedOutput(n) for n in (chat.RESPONSE, chat.HISTORY)])
        response = result.as_numpy(chat.RESPONSE).reshape(-1)[0].decode("utf-8")
        pairs = [item.decode("utf-8") for item in result.as_numpy(chat.HISTORY).reshape(-1)]
        return response, [pairs[i:i + 2] for i in range(0, len(pairs), 2)]

    @staticmethod
    def _inputs(client, values: dict[str, list[str]]) -> list:
        inputs = []
        for name, items in values.items():
            tensor = client.InferInput(name, [len(items)], "BYTES")
            tensor.set_data_from_numpy(np.array([s.encode("utf-8") for s in items], dtype=np.object_))
            inputs.append(tensor)
        return inputs


class TritonModel:
    """A named deployment of a model folder or repository on a Ray Serve cluster."""

    def __init__(self, name: str):
        self.name = name

    def deploy(self, path: str | Path, protocol: str = "http", endpoint: str | None = None,
               cpu: float = 1, memory: float = 0, use_gpu: bool = False, override: bool = False,
               instances: int = 1, autoscaling: Autoscaling | dict | None = None,
               host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
               metrics_port: int = 8002, chatglm_model: str | None = None,
               timeout: float = 900) -> Predictor:
        """Deploy ``path`` as ``self.name``; return once every model has a live replica.

        ``endpoint``: the Ray cluster address (None: the local cluster, started if none runs).
        ``cpu`` cores and ``memory`` GB (0: no reservation) per instance; ``use_gpu``: one GPU each.
        ``instances``: replicas of every model (or ``autoscaling``: min/max replicas and
        target requests in flight per replica). ``override``: replace a deployment of this name
        (False: refuse). ``protocol`` picks what the predictor speaks; both are served.
        """
        if protocol not in PROTOCOLS:
            raise DeployError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if isinstance(autoscaling, dict):
            autoscaling = Autoscaling(**autoscaling)
        repository, models = resolve_models(Path(path))
        spec = DeploySpec(name=self.name, repository=repository, models=models, cpu=float(cpu),
                          memory=float(memory), use_gpu=use_gpu, instances=instances,
                          autoscaling=autoscaling, host=host, http_port=http_port,
                          grpc_port=grpc_port, metrics_port=metrics_port, chatglm_model=chatglm_model)
        cluster.connect(endpoint)
        from ray import serve

        existing = _existing_spec(self.name)
        if existing is not None:
            if not override:
                raise DeployError(f"a deployment named '{self.name}' exists already: pass "
                                  "override=True (--override) to replace it, or undeploy it first")
            same_but_scale = dataclasses.replace(existing, instances=spec.instances,
                                                 autoscaling=spec.autoscaling) == spec
            if not same_but_scale:
                logger.info("replacing deployment '%s'", self.name)
                serve.delete(self.name)
        logger.info("deploying '%s': %d model(s) from %s, %s", self.name, len(models), repository,
                    f"autoscaling {spec.autoscaling}" if spec.autoscaling else f"{instances} instance(s) each")
        _run(spec)
        _wait_ready(self.name, timeout)
        return self.predictor(protocol)

    def scale(self, instances: int | None = None, autoscaling: Autoscaling | dict | None = None,
              endpoint: str | None = None, timeout: float = 900) -> Predictor:
        """Change the replicas of every model of a live deployment, in place (no restart)."""
        if instances is None and autoscaling is None:
            raise DeployError("scale needs instances or autoscaling")
        cluster.connect(endpoint, start=False)
        spec = _existing_spec(self.name)
        if spec is None:
            raise DeployError(f"no deployment named '{self.name}'")
        if isinstance(autoscaling, dict):
            autoscaling = Autoscaling(**autoscaling)
        spec = dataclasses.replace(spec, instances=instances or 1, autoscaling=autoscaling)
        _run(spec, wait=False)  # a replica that cannot be placed must not hang the caller
        _wait_ready(self.name, timeout)
        return self.predictor()

    def predictor(self, protocol: str = "http", endpoint: str | None = None) -> Predictor:
        """The predictor of an existing deployment."""
        cluster.connect(endpoint, start=False)
        spec = _existing_spec(self.name)
        if spec is None:
            raise DeployError(f"no deployment named '{self.name}'")
        from ray import serve

        views = serve.get_app_handle(self.name).endpoints.remote().result(timeout_s=60)
        chat_model = spec.chatglm_model or _first_chat_model(self.name, spec.models)
        return Predictor(name=self.name, protocol=protocol, host=_client_host(views["host"], views.get("node_ip")),
                         http_port=views["http_port"], grpc_port=views["grpc_port"],
                         metrics_port=views["metrics_port"], models=spec.models, chat_model=chat_model)

    def undeploy(self, endpoint: str | None = None) -> None:
        undeploy(self.name, endpoint)

    def status(self, endpoint: str | None = None) -> dict[str, Any]:
        return status(endpoint).get(self.name) or {"status": "NOT_DEPLOYED"}


def _run(spec: DeploySpec, wait: bool = True) -> None:
    """Hand the spec's application to Serve; ``wait``: until it runs (a failure is a
    ``DeployError`` naming its cause), else the caller waits, bounded."""
    from ray import serve

    from triserve.deploy import app

    target = serve.RunTarget(app.build(spec), name=spec.name, route_prefix=None)
    try:
        serve.run_many([target], wait_for_applications_running=wait)
    except RuntimeError as exc:  # Serve's "Deploying application x failed: ..."
        app_status = serve.status().applications.get(spec.name)
        detail = _messages(app_status) if app_status is not None else ""
        raise DeployError(f"deployment '{spec.name}' failed: {_load_error(detail) or exc}") from None


def _load_error(text: str) -> str:
    """The replica's own "model 'm' failed to load: ..." line out of Serve's traceback text."""
    found = re.findall(r"model '[^']+' failed to load: [^\n]*", text)
    return found[-1] if found else text.strip().splitlines()[-1] if text.strip() else ""


def _client_host(host: str, node_ip: str | None) -> str:
    """Where clients reach the front door: its address, or its node's when it listens on all."""
    if host in ("0.0.0.0", "::", ""):
        return node_ip or "127.0.0.1"
    return host


def _existing_spec(name: str) -> DeploySpec | None:
    from ray import serve

    from triserve.deploy import app

    if name not in serve.status().applications:
        return None
    try:
        return app.spec_from_dict(serve.get_app_handle(name).spec.remote().result(timeout_s=60))
    except Exception as exc:  # a broken earlier deployment: it can still be replaced
        logger.warning("deployment '%s' exists but does not answer (%s)", name, exc)
        return DeploySpec(name=name, repository=Path("/"), models=())


def _first_chat_model(name: str, models: Sequence[str]) -> str | None:
    from ray import serve

    for model in models:
        views = serve.get_deployment_handle(model, app_name=name).describe.remote().result(timeout_s=60)
        if views and chat.is_chat_model(views[-1]["metadata"]):
            return model
    return None


def _wait_ready(name: str, timeout: float) -> None:
    """Until the front door says every model has a live replica; a failed deployment raises."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        app_status = serve.status().applications.get(name)
        if app_status is not None and str(app_status.status).endswith("DEPLOY_FAILED"):
            raise DeployError(f"deployment '{name}' failed: "
                              f"{_load_error(_messages(app_status)) or app_status.message}")
        if app_status is not None and str(app_status.status).endswith("RUNNING"):
            if serve.get_app_handle(name).ready.remote().result(timeout_s=60):
                return
        if time.monotonic() > deadline:
            detail = _messages(app_status) if app_status is not None else ""
            raise DeployError(f"deployment '{name}' was not ready after {timeout:.0f} s"
                              + (f": {detail}" if detail else ""))
        time.sleep(0.5)


def _messages(app_status) -> str:
    return "; ".join(f"{n}: {d.message}" for n, d in app_status.deployments.items() if d.message)


def status(endpoint: str | None = None) -> dict[str, Any]:
    """Every deployment: its status and, per model, replicas by state."""
    cluster.connect(endpoint, start=False)
    from ray import serve

    out: dict[str, Any] = {}
    for name, app_status in serve.status().applications.items():
        out[name] = {
            "status": str(app_status.status).rsplit(".", 1)[-1],
            "message": app_status.message,
            "models": {
                deployment: {"status": str(d.status).rsplit(".", 1)[-1],
                             "replicas": {str(state).rsplit(".", 1)[-1]: n
                                          for state, n in d.replica_states.items()},
                             "message": d.message}
                for deployment, d in app_status.deployments.items() if deployment != "frontdoor"},
        }
    return out


def undeploy(name: str, endpoint: str | None = None) -> None:
    """Delete a deployment: every replica and its instance processes stop."""
    cluster.connect(endpoint, start=False)
    from ray import serve

    if name not in serve.status().applications:
        raise DeployError(f"no deployment named '{name}'")
    serve.delete(name)
