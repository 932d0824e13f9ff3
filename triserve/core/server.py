"""``InferenceServer``: the API every frontend calls (see docs/ARCHITECTURE.md, "The core API").

Frontends hand it decoded :class:`InferRequest` objects and get
:class:`InferResponse` objects or :class:`InferError` back; it also is the
:class:`CoreClient` that backends use for BLS calls to other models.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import triserve
from triserve.core.backend import CoreClient, Lifecycle
from triserve.core.errors import ErrorCode, InferError
from triserve.core.flow import ResponseBuffer
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


class _InternalClient:
    """The core as backends see it (BLS): requests of requests already running are still
    taken while the server drains at shutdown. A model this server has not loaded goes to
    ``peers`` when there are any (the other models of a cluster deployment)."""

    def __init__(self, server: "InferenceServer", peers: CoreClient | None = None):
        self._server = server
        self._peers = peers

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        if self._peers is not None and request.model_name not in self._server.model_names():
            return self._peers.stream(request)
        return self._server._stream(request)


class InferenceServer:
    def __init__(self, repository: Path, model_control_mode: str = "none",
                 load_models: Iterable[str] = (), drain_timeout: float = 30.0,
                 strict_readiness: bool = True, lifecycle: Lifecycle = Lifecycle(),
                 allowed_roots: Iterable[Path] = (), stream_stall_timeout: float = 60.0,
                 peers: CoreClient | None = None):
        self.repository = Path(repository)
        self.model_control_mode = ModelControlMode(model_control_mode)
        self._startup_models = list(load_models)
        self.drain_timeout = drain_timeout
        self._models = ModelRepository(self.repository, _InternalClient(self, peers), drain_timeout,
                                       lifecycle, tuple(Path(root) for root in allowed_roots))
        self._strict_readiness = strict_readiness
        self.stream_stall_timeout = stream_stall_timeout
        self._started = False
        self._stopping = False

    @property
    def live(self) -> bool:
        return not self._stopping

    @property
    def ready(self) -> bool:
        """Triton's readiness: every model loaded at start was tried and, with strict readiness
        (the default), every model asked to load serves (a model explicitly unloaded does not
        count; one whose instances are all restarting does). A failed model never blocks the others."""
        if not self._started or self._stopping:
            return False
        return not self._strict_readiness or self._models.all_ready()

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
        """Turn readiness false and refuse new requests (UNAVAILABLE), so clients and load
        balancers go elsewhere while running requests finish (:meth:`drain`)."""
        self._stopping = True

    @property
    def active_requests(self) -> int:
        return sum(model.active_requests for model in self._models.loaded_models())

    async def drain(self, timeout: float | None = None) -> None:
        """Let running requests finish for up to ``timeout`` s (``drain_timeout``), then end the
        rest with UNAVAILABLE: a stream gets that error as its final response, not a cut."""
        timeout = self.drain_timeout if timeout is None else timeout
        error = InferError.unavailable(
            f"the server is shutting down: the request did not finish within the drain timeout "
            f"of {timeout:g} s")
        await asyncio.gather(*(model.drain(timeout, error) for model in self._models.loaded_models()))

    async def stop(self) -> None:
        """Stop accepting requests, let running ones finish briefly, unload every model."""
        self.begin_shutdown()
        await self._models.unload_all()

    def get_model(self, name: str, version: str = "") -> ModelVersion:
        return self._models.get(name, version)

    def model_names(self) -> list[str]:
        """The loaded models (a model restarting its instances is listed; it serves again soon)."""
        return sorted({model.name for model in self._models.loaded_models()})

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self._models.index(ready_only)

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        self._require_explicit_mode("load")
        await self._models.load(name, config_json)

    async def unload_model(self, name: str) -> None:
        self._require_explicit_mode("unload")
        await self._models.unload(name)

    def _accepting(self) -> None:
        if self._stopping:
            raise InferError.unavailable("the server is shutting down and takes no new requests")

    def start_infer(self, request: InferRequest,
                    on_answer: Callable[[InferResponse | Exception], None]) -> Callable[[], None]:
        """:meth:`infer` without a task: ``on_answer`` gets the final response, or the error as an
        ``InferError`` (an error response included), once, on the event loop, unless the returned
        function (cancel) is called first. Raises ``InferError`` for a request refused at once."""
        self._accepting()
        model = self.get_model(request.model_name, request.model_version)
        if model.decoupled and not model.backend.unary_when_decoupled:
            raise InferError(
                ErrorCode.UNSUPPORTED,
                f"model '{model.name}' is decoupled: use the streaming API "
                "(gRPC ModelStreamInfer or /generate_stream)",
            )
        answered = False

        def deliver(response: InferResponse) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            if not response.final:
                asyncio.get_running_loop().call_soon(job.cancel)
                on_answer(InferError.invalid(
                    f"model '{model.name}' sent a streamed response to a unary request: unset "
                    "'stream' or use a streaming API (gRPC ModelStreamInfer, /generate_stream)"))
            else:
                on_answer(response if response.error is None else response.error)

        def cancel() -> None:
            nonlocal answered
            answered = True
            if not job.done:
                job.cancel()

        job = model.submit(request, deliver)
        return cancel

    async def infer(self, request: InferRequest) -> InferResponse:
        """One request, one response; raises ``InferError`` (also for an error response)."""
        answer: asyncio.Future[InferResponse | Exception] = asyncio.get_running_loop().create_future()

        def settle(result: InferResponse | Exception) -> None:
            if not answer.done():  # cancelled with its caller, the answer is not wanted
                answer.set_result(result)

        cancel = self.start_infer(request, settle)
        try:
            result = await answer
        finally:
            cancel()  # a cancelled caller cancels the job; after the answer it changes nothing
        if isinstance(result, Exception):
            raise result
        return result

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Every response of a request, until the final one; errors arrive as ``response.error``.

        An invalid request raises ``InferError`` before the first response.
        Closing the iterator early cancels the request in the backend.
        """
        return self._stream(request, accepting=True)

    async def _stream(self, request: InferRequest, accepting: bool = False) -> AsyncIterator[InferResponse]:
        if accepting:
            self._accepting()
        model = self.get_model(request.model_name, request.model_version)
        responses = ResponseBuffer(self.stream_stall_timeout)  # bounded: a reader that stops pauses the model
        job = responses.job = model.submit(request, responses.put)
        try:
            while True:
                response = await responses.get()
                yield response
                if response.final:
                    return
        finally:
            responses.close()
            if not job.done:
                job.cancel()

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's ``model_stats`` entries: one model version, all versions of a model, or all."""
        if version:
            models = [self.get_model(name, version)]
        elif name:
            self.get_model(name)  # NOT_FOUND / UNAVAILABLE for a model that is not ready
            models = [m for m in self._models.loaded_models() if m.name == name]
        else:
            models = self._models.loaded_models()
        return [model.statistics.to_json() for model in sorted(models, key=lambda m: (m.name, m.version))]

    def _require_explicit_mode(self, action: str) -> None:
        if self.model_control_mode is not ModelControlMode.EXPLICIT:
            raise InferError(
                ErrorCode.UNSUPPORTED,
                f"explicit model {action} is not allowed: start triserve with "
                "--model-control-mode explicit to load and unload models at runtime",
            )
