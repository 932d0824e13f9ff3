"""``ClusterCore``: triserve's core API over Ray Serve deployment handles.

The front door runs triserve's unchanged frontends over this facade
(:class:`triserve.core.api.Core`). It routes each request by model name to that
model's deployment; Serve picks the replica. What a frontend reads synchronously
(readiness, statistics, metrics) comes from a snapshot a background task refreshes
every ``POLL_S`` seconds, so no frontend call blocks on the cluster. Statistics and
metrics are the sum over every live replica: each round asks all replicas of each
model at once (``DeploymentHandle.broadcast``).

Faults: a unary request whose replica died (or became unreachable) is sent again
to a live replica until ``RETRY_S`` has passed; a stream is retried the same way
until its first response, and a stream cut later ends with an UNAVAILABLE error
response naming what happened (its text so far was already sent: it is not replayed).

:class:`PeerModels` is the same routing for a replica's own BLS calls to the other
models of its deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterable

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from tritonclient.grpc import model_config_pb2

import triserve
from triserve.core.api import start_in_task
from triserve.core.errors import ErrorCode, InferError
from triserve.core.metrics import merge_families
from triserve.core.server import EXTENSIONS
from triserve.core.statistics import merge_statistics
from triserve.core.types import InferRequest, InferResponse

logger = logging.getLogger("triserve")

POLL_S = 0.5  # how often readiness, statistics and metrics are refreshed
RETRY_S = 60.0  # how long a request whose replica died is retried on others
FIGURES_TIMEOUT_S = 5.0  # a model whose replicas do not all report in time keeps its last figures
FIGURES_STALE_S = 15.0  # a replica not heard from for this long no longer counts
_REPLICA_GONE = (RayActorError, ActorUnavailableError)


class RemoteModel:
    """A model version served by a deployment (:class:`triserve.core.api.ModelView`)."""

    def __init__(self, view: dict[str, Any], core: "ClusterCore"):
        self.name: str = view["name"]
        self.version: int = view["version"]
        self.config = model_config_pb2.ModelConfig.FromString(view["config"])
        self.decoupled: bool = view["decoupled"]
        self._metadata = view["metadata"]
        self._config_json = view["config_json"]
        self._core = core

    @property
    def ready(self) -> bool:
        return self._core.running_replicas(self.name) > 0

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def config_json(self) -> dict[str, Any]:
        return self._config_json


def _cause(exc: RayTaskError) -> BaseException:
    """The replica's own exception (an ``InferError`` reaches the client with its code)."""
    cause = exc.cause
    if isinstance(cause, InferError):
        return InferError(cause.code, cause.message)
    # a bug in the replica: the details (which may name server paths) go to the log only
    logger.error("a model replica failed unexpectedly: %s", exc)
    return InferError.internal(f"the model replica failed unexpectedly ({type(cause).__name__})")


class _Families:
    """A ``collect()``-able view of the metric families last gathered from the replicas,
    summed over them when read."""

    def __init__(self, replica_families: Callable[[], Iterable[list]]):
        self._replica_families = replica_families

    def collect(self) -> list:
        return merge_families(self._replica_families())


class ClusterCore:
    """The core API (:class:`triserve.core.api.Core`) of one deployed repository."""

    def __init__(self, app_name: str, handles: dict[str, DeploymentHandle]):
        self.app_name = app_name
        self._handles = handles
        self._models: dict[str, list[RemoteModel]] = {}
        self._running: dict[str, int] = {}
        # the latest figures of each replica: tag -> (when, model, {statistics, families})
        self._figures: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self.metric_families = _Families(
            lambda: [answer["families"] for _, _, answer in self._figures.values()])
        self._poller: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        """Learn every model's metadata (waits until each deployment has a replica)."""
        views = await asyncio.gather(*(handle.describe.remote() for handle in self._handles.values()))
        for name, versions in zip(self._handles, views, strict=True):
            self._models[name] = [RemoteModel(view, self) for view in versions]
        await self._refresh()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    # --- the snapshot ---------------------------------------------------------

    async def _poll(self) -> None:
        """Replica states every ``POLL_S``; statistics and metrics in their own task, so a
        model without a live replica (its calls wait for one) never holds readiness back."""
        gathering: asyncio.Task | None = None
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._refresh_states()
            except Exception:  # the controller restarting: next round
                logger.debug("reading the replica states failed", exc_info=True)
            if gathering is None or gathering.done():
                gathering = asyncio.create_task(self._refresh_figures())

    async def _refresh(self) -> None:
        await self._refresh_states()
        await self._refresh_figures()

    async def _refresh_states(self) -> None:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        running = {}
        for name in self._handles:
            deployment = app.deployments.get(name) if app is not None else None
            states = deployment.replica_states if deployment is not None else {}
            running[name] = sum(count for state, count in states.items() if str(state).endswith("RUNNING"))
        self._running = running

    async def _refresh_figures(self) -> None:
        """Statistics and metric families of every replica of every model, summed."""
        names = [name for name in self._handles if self._running.get(name, 0) > 0]

        async def every_replica(name: str) -> list:
            response = self._handles[name].broadcast("figures")
            return await response.results_async(timeout_s=FIGURES_TIMEOUT_S, return_exceptions=True)

        results = await asyncio.gather(*(every_replica(name) for name in names), return_exceptions=True)
        now = time.monotonic()
        for name, answers in zip(names, results):
            if isinstance(answers, BaseException):  # keep the last figures (until stale)
                logger.debug("model '%s': no figures this round (%s)", name, answers)
                continue
            # the replicas Serve's router knows as running answered; one that failed may be
            # live but busy: its last figures are kept until stale, the others' dropped
            failed = any(isinstance(answer, BaseException) for answer in answers)
            for replica, (heard, model, _) in list(self._figures.items()):
                if model == name and (not failed or now - heard > FIGURES_STALE_S):
                    del self._figures[replica]
            for answer in answers:
                if not isinstance(answer, BaseException):
                    self._figures[answer["replica"]] = (now, name, answer)
        for replica, (heard, model, _) in list(self._figures.items()):
            if now - heard > FIGURES_STALE_S or self._running.get(model, 0) == 0:
                del self._figures[replica]

    def running_replicas(self, name: str) -> int:
        return self._running.get(name, 0)

    # --- the core API -----------------------------------------------------------

    @property
    def live(self) -> bool:
        return not self._stopping

    @property
    def ready(self) -> bool:
        """Ready while every model has at least one live (RUNNING) replica."""
        return not self._stopping and bool(self._running) and all(
            count > 0 for count in self._running.values())

    def metadata(self) -> dict[str, Any]:
        return {"name": "triserve", "version": triserve.__version__, "extensions": EXTENSIONS}

    def get_model(self, name: str, version: str = "") -> RemoteModel:
        versions = self._models.get(name)
        if versions is None:
            raise InferError.not_found(f"unknown model '{name}'")
        if not version:
            return versions[-1]
        for model in versions:
            if str(model.version) == version:
                return model
        raise InferError.not_found(f"unknown version '{version}' of model '{name}'")

    def model_names(self) -> list[str]:
        return sorted(name for name in self._models if self.running_replicas(name) > 0)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        rows = []
        for name, versions in sorted(self._models.items()):
            ready = self.running_replicas(name) > 0
            if ready_only and not ready:
                continue
            for model in versions:
                rows.append({"name": name, "version": str(model.version),
                             "state": "READY" if ready else "UNAVAILABLE",
                             "reason": "" if ready else "no live replica"})
        return rows

    async def load_model(self, name: str, config_json: str | None = None) -> None:
        raise self._no_model_control("load")

    async def unload_model(self, name: str) -> None:
        raise self._no_model_control("unload")

    @staticmethod
    def _no_model_control(action: str) -> InferError:
        return InferError(ErrorCode.UNSUPPORTED,
                          f"explicit model {action} is not available on a cluster deployment: "
                          "deploy again (triserve deploy --override) or undeploy instead")

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        if name:
            self.get_model(name, version)
            names = [name]
        else:
            names = sorted(self._models)
        rows = merge_statistics([row for _, model, answer in self._figures.values() if model in names
                                 for row in answer["statistics"]])
        return [row for row in rows if not version or row.get("version") == version]

    def _handle(self, request: InferRequest) -> DeploymentHandle:
        self.get_model(request.model_name, request.model_version)  # NOT_FOUND before any hop
        return self._handles[request.model_name]

    async def infer(self, request: InferRequest) -> InferResponse:
        return await infer_through(self._handle(request), request)

    def start_infer(self, request: InferRequest,
                    on_answer: Callable[[InferResponse | Exception], None]) -> Callable[[], None]:
        return start_in_task(infer_through(self._handle(request), request), on_answer)

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        try:
            handle = self._handle(request)
        except InferError as error:  # raised at the first step, as InferenceServer.stream does
            return _fails(error)
        return stream_through(handle, request)


async def infer_through(handle: DeploymentHandle, request: InferRequest) -> InferResponse:
    """``request`` on a replica of ``handle``'s deployment, sent again while replicas die."""
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            return await handle.infer.remote(request)
        except RayTaskError as exc:
            raise _cause(exc) from None
        except _REPLICA_GONE as exc:
            if time.monotonic() > deadline:
                raise InferError.unavailable(
                    f"model '{request.model_name}': no replica answered for {RETRY_S:.0f} s "
                    f"({type(exc).__name__})") from None
            logger.warning("model '%s': a replica went away (%s); sending the request again",
                           request.model_name, type(exc).__name__)
            await asyncio.sleep(0.05)


async def stream_through(handle: DeploymentHandle, request: InferRequest) -> AsyncIterator[InferResponse]:
    """Every response of ``request`` from a replica of ``handle``'s deployment: sent again
    while no response came yet, an UNAVAILABLE final response if its replica dies later."""
    handle = handle.options(stream=True)
    deadline = time.monotonic() + RETRY_S
    while True:
        responses = handle.stream.remote(request)
        sent = 0
        try:
            async for response in responses:
                sent += 1
                yield response
                if response.final:
                    return
            return
        except RayTaskError as exc:
            error = _cause(exc)
            if not sent:
                raise error from None
            yield InferResponse(model_name=request.model_name, model_version=request.model_version,
                                id=request.id, error=error, final=True)
            return
        except _REPLICA_GONE as exc:
            if sent:
                yield InferResponse(
                    model_name=request.model_name, model_version=request.model_version,
                    id=request.id, final=True, error=InferError.unavailable(
                        f"the replica of model '{request.model_name}' serving this stream stopped "
                        f"after {sent} response(s) ({type(exc).__name__}); send the request again"))
                return
            if time.monotonic() > deadline:
                raise InferError.unavailable(
                    f"model '{request.model_name}': no replica answered for {RETRY_S:.0f} s") from None
            await asyncio.sleep(0.05)
        finally:
            responses.cancel()


class PeerModels:
    """The other models of a deployment, as a replica's backend calls them (BLS,
    :class:`triserve.core.backend.CoreClient`): through their deployment handles."""

    def __init__(self, app_name: str, models: list[str]):
        self._app_name = app_name
        self._models = set(models)
        self._handles: dict[str, DeploymentHandle] = {}

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        if request.model_name not in self._models:
            return _fails(InferError.not_found(
                f"unknown model '{request.model_name}': it is not part of deployment '{self._app_name}'"))
        handle = self._handles.get(request.model_name)
        if handle is None:
            handle = self._handles[request.model_name] = serve.get_deployment_handle(
                request.model_name, app_name=self._app_name)
        return stream_through(handle, request)


async def _fails(error: InferError) -> AsyncIterator[InferResponse]:
    raise error
    yield  # an async generator that raises on its first step
