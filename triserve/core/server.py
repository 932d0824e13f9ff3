"""``InferenceServer``: the API every frontend calls (see docs/ARCHITECTURE.md, "The core API").

Frontends hand it decoded :class:`InferRequest` objects and get
:class:`InferResponse` objects or :class:`InferError` back; it also is the
:class:`CoreClient` that backends use for BLS calls to other models.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import triserve
from triserve.core.errors import ErrorCode, InferError
from triserve.core.model import ModelVersion
from triserve.core.repository import ModelControlMode, ModelRepository, model_folders
from triserve.core.types import InferRequest, InferResponse

logger = logging.getLogger("triserve")

# The KServe/Triton protocol extensions the frontends implement.
EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "generate",
]


class InferenceServer:
    def __init__(self, repository: Path, model_control_mode: str = "none",
                 load_models: Iterable[str] = (), drain_timeout: float = 10.0,
                 strict_readiness: bool = True):
        self.repository = Path(repository)
        self.model_control_mode = ModelControlMode(model_control_mode)
        self._startup_models = list(load_models)
        self._models = ModelRepository(self.repository, self, drain_timeout)
        self._strict_readiness = strict_readiness
        self._started = False
        self._stopping = False

    @property
    def live(self) -> bool:
        return not self._stopping

    @property
    def ready(self) -> bool:
        """Triton's readiness: every model loaded at start was tried and, with strict readiness
        (the default), none of them is UNAVAILABLE. A failed model never blocks the others."""
        if not self._started or self._stopping:
            return False
        return not self._strict_readiness or all(
            row["state"] != "UNAVAILABLE" for row in self._models.index())

    def metadata(self) -> dict[str, Any]:
        return {"name": "triserve", "version": triserve.__version__, "extensions": EXTENSIONS}

    async def start(self) -> None:
        """Load the startup models concurrently; failures are logged and leave those models UNAVAILABLE."""
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a directory")
        if self.model_control_mode is ModelControlMode.NONE or "*" in self._startup_models:
            names = model_folders(self.repository)
        else:
            names = self._startup_models
        results = await asyncio.gather(*(self._models.load(name) for name in names),
                                       return_exceptions=True)
        failed = [name for name, result in zip(names, results, strict=True)
                  if isinstance(result, BaseException)]
        loaded = len(names) - len(failed)
        logger.info("%d of %d model(s) loaded%s", loaded, len(names),
                    f"; failed: {', '.join(failed)}" if failed else "")
        self._started = True

    def begin_shutdown(self) -> None:
        """Turn liveness and readiness false, so clients and load balancers stop sending
        requests here while the frontends let running ones finish."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop accepting requests, let running ones finish briefly, unload every model."""
        self.begin_shutdown()
        await self._models.unload_all()

    def get_model(self, name: str, version: str = "") -> ModelVersion:
        return self._models.get(name, version)

    def model_names(self) -> list[str]:
        return sorted({model.name for model in self._models.ready_models()})

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self._models.index(ready_only)

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        self._require_explicit_mode("load")
        await self._models.load(name, config_json)

    async def unload_model(self, name: str) -> None:
        self._require_explicit_mode("unload")
        await self._models.unload(name)

    async def infer(self, request: InferRequest) -> InferResponse:
        """One request, one response; raises ``InferError`` (also for an error response)."""
        model = self.get_model(request.model_name, request.model_version)
        if model.decoupled and not model.backend.unary_when_decoupled:
            raise InferError(
                ErrorCode.UNSUPPORTED,
                f"model '{model.name}' is decoupled: use the streaming API "
                "(gRPC ModelStreamInfer or /generate_stream)",
            )
        answer: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()

        def deliver(response: InferResponse) -> None:
            if answer.done():
                return
            if response.final:
                answer.set_result(response)
            else:
                answer.set_exception(InferError.invalid(
                    f"model '{model.name}' sent a streamed response to a unary request: unset "
                    "'stream' or use a streaming API (gRPC ModelStreamInfer, /generate_stream)"
                ))
                asyncio.get_running_loop().call_soon(job.cancel)

        job = model.submit(request, deliver)
        try:
            response = await answer
        finally:
            if not job.done:
                job.cancel()
        if response.error is not None:
            raise response.error
        return response

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Every response of a request, until the final one; errors arrive as ``response.error``.

        An invalid request raises ``InferError`` before the first response.
        Closing the iterator early cancels the request in the backend.
        """
        model = self.get_model(request.model_name, request.model_version)
        responses: asyncio.Queue[InferResponse] = asyncio.Queue()
        job = model.submit(request, responses.put_nowait)
        try:
            while True:
                response = await responses.get()
                yield response
                if response.final:
                    return
        finally:
            if not job.done:
                job.cancel()

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's ``model_stats`` entries: one model version, all versions of a model, or all."""
        if version:
            models = [self.get_model(name, version)]
        elif name:
            self.get_model(name)  # NOT_FOUND / UNAVAILABLE for a model that is not ready
            models = [m for m in self._models.ready_models() if m.name == name]
        else:
            models = self._models.ready_models()
        return [model.statistics.to_json() for model in sorted(models, key=lambda m: (m.name, m.version))]

    def _require_explicit_mode(self, action: str) -> None:
        if self.model_control_mode is not ModelControlMode.EXPLICIT:
            raise InferError(
                ErrorCode.UNSUPPORTED,
                f"explicit model {action} is not allowed: start triserve with "
                "--model-control-mode explicit to load and unload models at runtime",
            )
