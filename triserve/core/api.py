"""What frontends need from a core: the :class:`Core` and :class:`ModelView` protocols.

Every frontend is written against these protocols, never against a concrete class.
Two cores implement them: :class:`triserve.core.server.InferenceServer` (the models
run in this process) and :class:`triserve.deploy.facade.ClusterCore` (each model is
a Ray Serve deployment; requests go through deployment handles). So the same
HTTP, gRPC and metrics frontends serve a single process and a cluster unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Coroutine, Protocol

from tritonclient.grpc import model_config_pb2

from triserve.core.types import InferRequest, InferResponse


class ModelView(Protocol):
    """One model version as frontends see it (:class:`triserve.core.model.ModelVersion` fits)."""

    name: str
    version: int
    config: model_config_pb2.ModelConfig
    decoupled: bool

    @property
    def ready(self) -> bool: ...

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata: name, versions, platform, inputs, outputs."""

    def config_json(self) -> dict[str, Any]:
        """The config as Triton's ``/config`` endpoint shows it."""


class Core(Protocol):
    """The API every frontend calls (docs/ARCHITECTURE.md, "The core API")."""

    @property
    def live(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    def metadata(self) -> dict[str, Any]: ...

    def get_model(self, name: str, version: str = "") -> ModelView:
        """The model version; ``InferError`` NOT_FOUND / UNAVAILABLE."""

    def model_names(self) -> list[str]: ...

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]: ...

    async def load_model(self, name: str, config_json: str | None = None) -> None: ...

    async def unload_model(self, name: str) -> None: ...

    async def infer(self, request: InferRequest) -> InferResponse:
        """One request, one response; raises ``InferError``."""

    def start_infer(self, request: InferRequest,
                    on_answer: Callable[[InferResponse | Exception], None]) -> Callable[[], None]:
        """``infer`` for a caller without a task of its own: ``on_answer`` gets the response or the
        error, once, on the event loop, unless the returned function (cancel) was called first.
        May raise ``InferError`` for a request refused at once. :func:`start_in_task` implements
        it for a core whose ``infer`` is only a coroutine."""

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """Every response until ``final``; closing the iterator early cancels the request."""

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]: ...


def start_in_task(infer: Coroutine[Any, Any, InferResponse],
                  on_answer: Callable[[InferResponse | Exception], None]) -> Callable[[], None]:
    """:meth:`Core.start_infer` from a core's ``infer`` coroutine: it runs in a task of its own."""
    task = asyncio.ensure_future(infer)

    def finished(task: asyncio.Task) -> None:
        if not task.cancelled():
            error = task.exception()
            on_answer(error if isinstance(error, Exception) else task.result())

    task.add_done_callback(finished)
    return task.cancel
