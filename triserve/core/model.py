"""``ModelVersion``: one loaded version of a model, and the only way requests reach its backend.

It ties together what the core knows about a version: its config, its backend
instance, the request validator, the scheduler and the statistics. Every
request goes through :meth:`ModelVersion.submit`, which validates it, wraps the
caller's sink so that statistics and the count of active requests are kept,
and queues it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from tritonclient.grpc import model_config_pb2

from triserve.core.backend import (Backend, CoreClient, Job, ModelContext, backend_names,
                                   get_backend_class)
from triserve.core import config as model_config
from triserve.core import datatypes, metrics
from triserve.core.errors import ErrorCode, InferError
from triserve.core.scheduler import Scheduler
from triserve.core.statistics import ModelStatistics
from triserve.core.types import InferRequest, InferResponse
from triserve.core.validation import RequestValidator

logger = logging.getLogger("triserve")

ResponseSink = Callable[[InferResponse], None]


def backend_class_for(config: model_config_pb2.ModelConfig) -> type[Backend]:
    """The Backend class a config asks for; ``ConfigError`` naming what is unsupported."""
    supported = ", ".join(f'"{name}"' for name in backend_names())
    if not config.backend:
        if config.platform:
            raise model_config.ConfigError(
                f"platform '{config.platform}' is not supported by triserve; "
                f"set backend to one of {supported}"
            )
        raise model_config.ConfigError(f"the config sets no backend; set backend to one of {supported}")
    try:
        return get_backend_class(config.backend)
    except KeyError:
        raise model_config.ConfigError(
            f"backend '{config.backend}' is not supported; use one of {supported}"
        ) from None


class ModelVersion:
    """A model version: load/unload its backend, accept requests, report metadata and stats."""

    def __init__(self, version: int, config: model_config_pb2.ModelConfig,
                 backend_class: type[Backend], model_dir: Path, repository: Path,
                 core: CoreClient, ready_versions: Callable[[], list[int]]):
        self.name = config.name
        self.version = version
        self._version_text = str(version)
        self.config = config
        self.decoupled = config.model_transaction_policy.decoupled
        self.ready = False
        self.statistics = ModelStatistics(self.name, version)
        self.backend = backend_class(ModelContext(
            name=self.name, version=version, config=config, model_dir=model_dir,
            repository=repository, core=core,
            logger=logging.getLogger(f"triserve.model.{self.name}"),
        ))
        self._ready_versions = ready_versions
        self._validator = RequestValidator(config, backend_class.numeric_for_string_inputs)
        self._scheduler = Scheduler(self.backend, config, self.statistics)
        self._active: set[Job] = set()
        self._idle = asyncio.Event()

    async def load(self) -> None:
        started = time.monotonic()
        await self.backend.load()
        self.ready = True
        metrics.track_model(self.statistics)
        logger.info("loaded model '%s' version %d in %.1f s", self.name, self.version,
                    time.monotonic() - started)

    async def unload(self, drain_timeout: float) -> None:
        """Stop taking requests, let active ones finish for up to ``drain_timeout`` s, then unload."""
        self.ready = False
        if self._active:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except asyncio.TimeoutError:
                logger.warning("model '%s' version %d: %d request(s) still running after %.0f s; "
                               "ending them", self.name, self.version, len(self._active), drain_timeout)
        gone = InferError.unavailable(f"model '{self.name}' version {self.version} was unloaded")
        self._scheduler.fail_queued(gone)
        for job in list(self._active):
            job.cancel()
            job.fail(gone)
        metrics.untrack_model(self.statistics)
        await self.backend.unload()
        logger.info("unloaded model '%s' version %d", self.name, self.version)

    def submit(self, request: InferRequest, sink: ResponseSink) -> Job:
        """Validate and queue a request; responses go to ``sink``, the last with ``final=True``.

        Raises ``InferError`` if the request does not fit the model or the
        model is unloading.
        """
        if not self.ready:
            raise InferError.unavailable(
                f"model '{self.name}' version {self.version} is not ready (it is being unloaded)"
            )
        received = time.monotonic_ns()
        try:
            batch_size = self._validator.validate(request)
        except InferError:
            self.statistics.record_failure("OTHER", time.monotonic_ns() - received)
            raise
        # "" (latest) resolved here, so responses name the version that ran
        request.model_version = self._version_text
        statistics = self.statistics
        active = self._active
        wanted = {output.name for output in request.outputs}

        def deliver(response: InferResponse) -> None:
            if wanted and response.outputs:
                # Triton returns only the outputs a request names, whatever the backend produced
                response.outputs = [tensor for tensor in response.outputs if tensor.name in wanted]
            if response.final:
                duration = time.monotonic_ns() - job.enqueue_ns
                if response.error is None:
                    statistics.record_success(duration)
                else:
                    cancelled = response.error.code is ErrorCode.CANCELLED
                    statistics.record_failure("CANCELED" if cancelled else "BACKEND", duration)
                active.discard(job)
                if not active:
                    self._idle.set()
            sink(response)

        job = Job(request, deliver, asyncio.get_running_loop())
        active.add(job)
        self._scheduler.submit(job, batch_size)
        return job

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata; with batching, shapes start with the -1 batch dimension."""
        batch_dim = [-1] if self.config.max_batch_size > 0 else []

        def tensors(entries) -> list[dict[str, Any]]:
            return [
                {
                    "name": tensor.name,
                    "datatype": datatypes.CONFIG_TO_KSERVE[
                        model_config_pb2.DataType.Name(tensor.data_type)],
                    "shape": batch_dim + list(tensor.dims),
                }
                for tensor in entries
            ]

        return {
            "name": self.name,
            "versions": [str(v) for v in self._ready_versions()],
            "platform": self.config.platform or self.config.backend,
            "inputs": tensors(self.config.input),
            "outputs": tensors(self.config.output),
        }

    def config_json(self) -> dict[str, Any]:
        """The config as Triton's ``/config`` endpoint shows it."""
        return model_config.config_to_json(self.config)
