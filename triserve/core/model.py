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

from triserve.core.backend import (Backend, BackendNotInstalled, CoreClient, Job, Lifecycle,
                                   ModelContext, backend_names, get_backend_class)
from triserve.core import config as model_config
from triserve.core import datatypes, metrics
from triserve.core.errors import ErrorCode, InferError, QueueFullError
from triserve.core.reshape import Reshape
from triserve.core.scheduler import TIMEOUT_EXPIRED, Scheduler
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
    except BackendNotInstalled as exc:
        raise model_config.ConfigError(str(exc)) from None
    except KeyError:
        raise model_config.ConfigError(
            f"backend '{config.backend}' is not supported; use one of {supported}"
        ) from None


def _failure_reason(error: InferError) -> str:
    """The ``reason`` label of nv_inference_request_failure for a failed response."""
    if error.code is ErrorCode.CANCELLED:
        return "CANCELED"
    if error.message == TIMEOUT_EXPIRED or isinstance(error, QueueFullError):
        return "REJECTED"  # a queue refused it, as Triton counts it
    return "BACKEND"


class ModelVersion:
    """A model version: load/unload its backend, accept requests, report metadata and stats."""

    def __init__(self, version: int, config: model_config_pb2.ModelConfig,
                 backend_class: type[Backend], model_dir: Path, repository: Path,
                 core: CoreClient, ready_versions: Callable[[], list[int]],
                 lifecycle: Lifecycle = Lifecycle()):
        self.name = config.name
        self.version = version
        self._version_text = str(version)
        self.config = config
        self.decoupled = config.model_transaction_policy.decoupled
        self._loaded = False
        self.statistics = ModelStatistics(self.name, version)
        try:
            lifecycle = lifecycle.for_model(config)
        except ValueError as exc:
            raise model_config.ConfigError(str(exc)) from None
        self.backend = backend_class(ModelContext(
            name=self.name, version=version, config=config, model_dir=model_dir,
            repository=repository, core=core,
            logger=logging.getLogger(f"triserve.model.{self.name}"), lifecycle=lifecycle,
        ))
        self._ready_versions = ready_versions
        self._validator = RequestValidator(config, backend_class.numeric_for_string_inputs)
        self._reshape = Reshape(config)
        self._scheduler = Scheduler(self.backend, config, self.statistics)
        self._active: set[Job] = set()
        self._idle = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Loaded, not unloading, and the backend can serve (an instance process is alive)."""
        return self._loaded and self.backend.healthy

    def not_ready_reason(self) -> str:
        """Why :attr:`ready` is false, for the repository index and the error of a refused request."""
        if not self._loaded:
            return "unloading"
        failure = self.backend.failure
        if failure:
            return failure
        return "no instance is running; it is being restarted"

    @property
    def active_requests(self) -> int:
        return len(self._active)

    async def load(self) -> None:
        started = time.monotonic()
        await self.backend.load()
        self._loaded = True
        metrics.track_model(self.statistics)
        logger.info("loaded model '%s' version %d in %.1f s", self.name, self.version,
                    time.monotonic() - started)

    async def unload(self, drain_timeout: float) -> None:
        """Stop taking requests, let active ones finish for up to ``drain_timeout`` s, then unload."""
        self._loaded = False
        await self.drain(drain_timeout, InferError.unavailable(
            f"model '{self.name}' version {self.version} was unloaded"))
        metrics.untrack_model(self.statistics)
        await self.backend.unload()
        logger.info("unloaded model '%s' version %d", self.name, self.version)

    async def drain(self, timeout: float, error: InferError) -> None:
        """Wait up to ``timeout`` s for the active requests to finish, then end the rest with ``error``
        (cancelled in the backend; a stream gets ``error`` as its final response)."""
        if self._active:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                logger.warning("model '%s' version %d: %d request(s) still running after %g s; "
                               "ending them", self.name, self.version, len(self._active), timeout)
        self._scheduler.fail_queued(error)
        for job in list(self._active):
            job.cancel()
            job.fail(error)

    def submit(self, request: InferRequest, sink: ResponseSink) -> Job:
        """Validate and queue a request; responses go to ``sink``, the last with ``final=True``.

        Raises ``InferError`` if the request does not fit the model or the
        model is unloading.
        """
        if not self._loaded or not self.backend.healthy:
            raise InferError.unavailable(
                f"model '{self.name}' version {self.version} is not ready: {self.not_ready_reason()}"
            )
        received = time.monotonic_ns()
        try:
            batch_size = self._validator.validate(request)
        except InferError:
            self.statistics.record_failure("OTHER", time.monotonic_ns() - received)
            raise
        # "" (latest) resolved here, so responses name the version that ran
        request.model_version = self._version_text
        reshape = self._reshape
        if reshape.inputs:
            try:
                reshape.reshape_inputs(request)
            except InferError:
                self.statistics.record_failure("OTHER", time.monotonic_ns() - received)
                raise
        statistics = self.statistics
        active = self._active
        wanted = {output.name for output in request.outputs}

        def deliver(response: InferResponse) -> None:
            if wanted and response.outputs:
                # Triton returns only the outputs a request names, whatever the backend produced
                response.outputs = [tensor for tensor in response.outputs if tensor.name in wanted]
            if reshape.outputs and response.outputs:
                try:
                    reshape.reshape_outputs(response)
                except InferError as error:
                    response.outputs, response.error = [], error
            if response.final:
                duration = time.monotonic_ns() - job.enqueue_ns
                if response.error is None:
                    statistics.record_success(duration)
                else:
                    statistics.record_failure(_failure_reason(response.error), duration)
                active.discard(job)
                if not active:
                    self._idle.set()
            sink(response)

        job = Job(request, deliver, asyncio.get_running_loop())
        active.add(job)  # before submit: a batch may start, and even end, within it
        try:
            self._scheduler.submit(job, batch_size)  # raises UNAVAILABLE if the queue is full
        except BaseException:
            active.discard(job)
            if not active:
                self._idle.set()
            raise
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
