"""One Serve replica = one triserve instance of one model.

Each replica runs triserve's own core (:class:`InferenceServer`, explicit mode,
restricted to its one model), so scheduling, dynamic batching, the Python backend's
instance processes and the LLM engine are exactly what ``triserve serve`` runs.
Serve routes requests to replicas and restarts the ones that die; the front door
(:mod:`triserve.deploy.frontdoor`) calls these methods through deployment handles.
A Python model's BLS request to another model of the deployment goes through that
model's deployment handle (:class:`~triserve.deploy.facade.PeerModels`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from triserve.core.errors import InferError
from triserve.core.metrics import metrics_registry
from triserve.core.server import InferenceServer
from triserve.core.types import InferRequest, InferResponse
from triserve.deploy.facade import PeerModels

logger = logging.getLogger("triserve")


class ModelReplica:
    """The body of every model deployment (wrapped by ``serve.deployment`` in :mod:`app`)."""

    async def __init__(self, repository: str, model: str, models: tuple[str, ...] = ()):
        self._model = model
        app_name = serve.get_replica_context().app_name
        # BLS calls to the deployment's other models go to their deployments
        peers = PeerModels(app_name, [m for m in models if m != model])
        self._core = InferenceServer(Path(repository), "explicit", [model], peers=peers)
        await self._core.start()
        if model not in self._core.model_names():
            reasons = [row.get("reason", "") for row in self._core.repository_index()
                       if row["name"] == model]
            await self._core.stop()
            # Serve retries the constructor, then marks the deployment unhealthy with this message.
            raise RuntimeError(f"model '{model}' failed to load: {'; '.join(r for r in reasons if r)}")

    def describe(self) -> list[dict[str, Any]]:
        """Every loaded version: what the front door shows as metadata and config."""
        views = []
        for version in self._versions():
            model = self._core.get_model(self._model, str(version))
            views.append({"name": model.name, "version": model.version,
                          "config": model.config.SerializeToString(), "decoupled": model.decoupled,
                          "metadata": model.metadata(), "config_json": model.config_json()})
        return views

    def _versions(self) -> list[int]:
        return sorted(int(row["version"]) for row in self._core.repository_index(ready_only=True)
                      if row["name"] == self._model)

    async def infer(self, request: InferRequest) -> InferResponse:
        return await self._core.infer(request)

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        # Closing this generator (the front door's client went away) cancels the request.
        async for response in self._core.stream(request):
            yield response

    def figures(self) -> dict[str, Any]:
        """This replica's statistics and ``nv_*`` / ``triserve_llm_*`` metric families
        (prometheus_client Metric objects); the front door sums them over every replica."""
        try:
            statistics = self._core.statistics(self._model)
        except InferError:  # not ready (restarting its instances): nothing to count now
            statistics = []
        return {"replica": serve.get_replica_context().replica_tag, "statistics": statistics,
                "families": list(metrics_registry().collect())}

    def check_health(self) -> None:
        """Serve's health check: a replica whose model cannot serve is replaced."""
        if not self._core.ready:
            rows = [row for row in self._core.repository_index() if row["name"] == self._model]
            raise InferError.unavailable(f"model '{self._model}' is not ready: {rows}")

    async def __del__(self):
        await self._core.stop()
