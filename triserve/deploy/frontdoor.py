"""The front door: triserve's own HTTP, gRPC and /metrics frontends over the cluster.

It is the ingress deployment of every deployed repository (one replica, on the head
node, no CPU reserved). It runs :class:`triserve.server.Frontends` -- the very code
``triserve serve`` runs -- over :class:`~triserve.deploy.facade.ClusterCore`, so the
whole surface (KServe v2 HTTP and gRPC with bidirectional streaming, generate, OpenAI,
the seed's Predict JSON, ChatGLM's api.py, metrics) is served unchanged. Serve's own
proxies are not used: Serve's gRPC proxy has no bidirectional streaming
(``ModelStreamInfer``) and its HTTP proxy would add a second hop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from triserve.deploy.facade import ClusterCore
from triserve.options import ServerOptions
from triserve.server import Frontends

logger = logging.getLogger("triserve")


class FrontDoor:
    """The body of the ingress deployment."""

    async def __init__(self, app_name: str, handles: dict[str, DeploymentHandle],
                       options: dict[str, Any]):
        self._options = ServerOptions(**{**options, "model_repository": Path(options["model_repository"])})
        self._core = ClusterCore(app_name, handles)
        await self._core.start()
        self._frontends = Frontends(self._core, self._options,
                                    metrics_registry=lambda: self._core.metric_families)
        await self._frontends.start()
        logger.info("deployment '%s': HTTP on %s:%d, gRPC on %s, metrics on %s:%d", app_name,
                    self._options.host, self._options.http_port, self._frontends.grpc_address,
                    self._options.host, self._options.metrics_port)

    def endpoints(self) -> dict[str, Any]:
        o = self._options
        import ray

        return {"host": o.host, "node_ip": ray.util.get_node_ip_address(), "http_port": o.http_port,
                "grpc_port": o.grpc_port, "metrics_port": o.metrics_port}

    def ready(self) -> bool:
        return self._core.ready

    async def __del__(self):
        await self._frontends.stop()
        await self._core.stop()
