"""Triton's Python backend: model.py files run unmodified, one process per instance.

Each instance of the config's ``instance_group`` is a ``stub/runner.py`` process
started by file path with the model's Python (ours, or the EXECUTION_ENV_PATH
env's), so the model never imports triserve. Parent and child talk over two
socketpairs in length-prefixed pickle (protocol 5) frames: numpy arrays travel
as they are, with no JSON on the per-request path. The parent side is one
asyncio protocol (:class:`FrameProtocol`), so a request costs no thread, one
write, and no await per frame received.

Messages, parent -> child: ``initialize``, ``execute``, ``finalize``, which the
child's main thread reads itself, and on the control socket ``cancel`` and
``bls_response``, which its reader thread takes while ``execute`` runs;
child -> parent: ``ready`` / ``load_failed``, ``response``, ``done``, ``bls``,
``log``, ``finalized``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from triserve.core.backend import Backend, Job, ModelContext
from triserve.backends.python import environment
from triserve.core import datatypes
from triserve.core.config import config_to_json
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor, RequestedOutput

STUB_DIR = Path(__file__).resolve().parent / "stub"
RUNNER = STUB_DIR / "runner.py"
_HEADER = struct.Struct("<I")
_FINALIZE_TIMEOUT_S = 30.0
_LOG_LEVELS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
               "VERBOSE": logging.DEBUG}

logger = logging.getLogger("triserve.backends.python")


@dataclass(frozen=True)
class InstanceSpec:
    """Where one instance runs, as Triton's ``initialize(args)`` describes it."""

    name: str
    kind: str  # "CPU", "GPU" or "MODEL", as args["model_instance_kind"]
    device_id: int


class PythonBackend(Backend):
    """One loaded Python model version: its instance processes and a pool of idle ones."""

    def __init__(self, context: ModelContext):
        super().__init__(context)
        self._instances: list[InstanceProcess] = []
        self._idle: asyncio.Queue[InstanceProcess] = asyncio.Queue()

    @classmethod
    def auto_complete_config(
        cls, config: model_config_pb2.ModelConfig, model_dir: Path
    ) -> model_config_pb2.ModelConfig:
        """Run the model's static ``auto_complete_config`` in a short-lived process.

        Only a model.py that mentions it pays for the process.
        """
        model_file = latest_version_dir(model_dir) / model_filename(config)
        if not model_file.is_file() or "auto_complete_config" not in model_file.read_text(
                encoding="utf-8", errors="replace"):
            return config
        python, env = model_python(config)
        result = subprocess.run(
            [str(python), str(RUNNER), "--auto-complete", str(model_file)],
            input=json.dumps(config_to_json(config)), capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise InferError.unavailable(
                f"auto_complete_config of {model_file} failed: {_last_line(result.stderr)}")
        completed = model_config_pb2.ModelConfig()
        json_format.ParseDict(json.loads(result.stdout), completed, ignore_unknown_fields=True)
        return completed

    async def load(self) -> None:
        config = self.context.config
        python, env = await asyncio.to_thread(model_python, config)
        specs = await asyncio.to_thread(instance_specs, self.context, python, env)
        model_file = self.context.version_dir / model_filename(config)
        if not model_file.is_file():
            raise InferError.unavailable(f"{model_file} not found")
        model_config_json = json.dumps(config_to_json(config))
        self._instances = [InstanceProcess(self.context, spec) for spec in specs]
        results = await asyncio.gather(
            *(instance.start(python, env, model_file, model_config_json) for instance in self._instances),
            return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.unload()
            raise failure
        for instance in self._instances:
            self._idle.put_nowait(instance)

    async def unload(self) -> None:
        await asyncio.gather(*(instance.stop() for instance in self._instances))
        self._instances = []

    @property
    def capacity(self) -> int:
        return max(1, len(self._instances))

    async def execute(self, jobs: list[Job]) -> None:
        """Run the batch on a free instance; returns when the model's execute returned.

        A decoupled model may keep answering its jobs after that, from its own threads.
        """
        instance = await self._idle.get()
        try:
            await instance.execute(jobs)
        finally:
            self._idle.put_nowait(instance)

    def stats(self) -> dict[str, Any]:
        return {"instances": len(self._instances)}


def model_filename(config: model_config_pb2.ModelConfig) -> str:
    return config.default_model_filename or "model.py"


def latest_version_dir(model_dir: Path) -> Path:
    """The highest numeric version folder (auto-complete runs before versions are chosen)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return model_dir / str(max(versions, default=1))


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no error output"


def model_python(config: model_config_pb2.ModelConfig) -> tuple[Path, dict[str, str]]:
    """The Python that runs the model's processes, and their environment variables."""
    parameter = config.parameters.get(environment.PARAMETER)
    if parameter is None or not parameter.string_value:
        return Path(sys.executable), dict(os.environ)
    python = environment.prepare_python(parameter.string_value)
    return python, environment.foreign_env(os.environ)


def instance_specs(context: ModelContext, python: Path, env: dict[str, str]) -> list[InstanceSpec]:
    """One spec per instance, named ``<group>_<n>`` like Triton's; GPU groups count per GPU."""
    groups = list(context.config.instance_group) or [model_config_pb2.ModelInstanceGroup()]
    specs = []
    for index, group in enumerate(groups):
        group_name = group.name or (context.name if len(groups) == 1 else f"{context.name}_{index}")
        count = group.count or 1
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
            devices = list(group.gpus) or [0]
            kind = "GPU" if cuda_device_count(python, env) > 0 else "CPU"
            if kind == "CPU":
                context.logger.warning(
                    "model '%s': instance group '%s' is KIND_GPU but no CUDA GPU is usable "
                    "(torch missing or no device); running it on the CPU", context.name, group_name)
        else:
            devices = [0]
            kind = "MODEL" if group.kind == model_config_pb2.ModelInstanceGroup.KIND_MODEL else "CPU"
        placements = [device_id for device_id in devices for _ in range(count)]
        specs.extend(InstanceSpec(f"{group_name}_{n}", kind, device_id)
                     for n, device_id in enumerate(placements))
    return specs


def cuda_device_count(python: Path, env: dict[str, str]) -> int:
    """CUDA devices the model's Python can use; no NVIDIA driver means none, without importing torch."""
    if not Path("/proc/driver/nvidia").exists():
        return 0
    result = subprocess.run(
        [str(python), "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True, text=True, env=env)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else 0


def to_error(code_name: str, message: str) -> InferError:
    return InferError(ErrorCode(code_name), message)


class FrameProtocol(asyncio.Protocol):
    """The parent's end of an instance socket: length-prefixed pickle frames both ways.

    Every frame complete in one read is handed to ``on_message`` there and then, so
    the child's response and ``done`` for a batch (written together) cost one wakeup.
    A frame larger than one read waits in a buffer until it is whole, copied once.
    Sending is one ``transport.write`` per message; :meth:`writable` waits only
    while the socket's buffer is above its high-water mark.
    """

    def __init__(self, on_message: Callable[[tuple], None], on_closed: Callable[[], None]):
        self._on_message = on_message
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()  # the start of a frame not yet complete
        self._needed = 0  # bytes _pending must reach before the next frame can be read
        self._resumed: asyncio.Future | None = None  # set while writing is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._pending:
            self._pending += data
            if len(self._pending) < self._needed:
                return
            data = bytes(self._pending)
            self._pending.clear()
        view = memoryview(data)
        offset, size = 0, len(data)
        self._needed = _HEADER.size
        while size - offset >= _HEADER.size:
            (length,) = _HEADER.unpack_from(view, offset)
            start = offset + _HEADER.size
            if start + length > size:
                self._needed = _HEADER.size + length
                break
            offset = start + length
            self._on_message(pickle.loads(view[start:offset]))
        if offset < size:
            self._pending += view[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._on_closed()

    def pause_writing(self) -> None:
        self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=5)
        self._transport.write(_HEADER.pack(len(data)) + data)

    async def writable(self) -> None:
        """Return once the socket buffer has room (at once, unless the child is slow to read)."""
        if self._resumed is not None:
            await self._resumed

    def close(self) -> None:
        self._transport.close()


class InstanceProcess:
    """One runner process and the jobs, batches and BLS calls in flight on it."""

    def __init__(self, context: ModelContext, spec: InstanceSpec):
        self.context = context
        self.spec = spec
        self.pid = 0
        self._process: subprocess.Popen | None = None
        self._protocol: FrameProtocol | None = None
        self._control: FrameProtocol | None = None  # cancellations and BLS responses
        self._closed = asyncio.Event()  # the socket closed; _exit_task then cleans up
        self._exit_task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._finalized: asyncio.Future | None = None
        self._jobs: dict[int, Job] = {}
        self._batches: dict[int, asyncio.Future] = {}
        self._bls_tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._alive = False

    async def start(self, python: Path, env: dict[str, str], model_file: Path,
                    model_config_json: str) -> None:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        parent_control, child_control = socket.socketpair()
        env = dict(env)
        if self.spec.kind == "GPU":
            env["CUDA_VISIBLE_DEVICES"] = str(self.spec.device_id)
        try:
            # subprocess.Popen, not the event loop's subprocess support: CPython spawns with
            # vfork, which runs no fork handlers (gRPC's, under uvloop, crash a forked child).
            # Its own session keeps a Ctrl-C to the server's process group from killing the
            # instance before the server finalizes it.
            self._process = subprocess.Popen(
                [str(python), str(RUNNER), str(child_sock.fileno()), str(child_control.fileno())],
                pass_fds=(child_sock.fileno(), child_control.fileno()), env=env,
                start_new_session=True)
        finally:
            child_sock.close()
            child_control.close()
        _, self._protocol = await loop.create_unix_connection(
            lambda: FrameProtocol(self._dispatch, self._on_closed), sock=parent_sock)
        _, self._control = await loop.create_unix_connection(
            lambda: FrameProtocol(self._dispatch, lambda: None), sock=parent_control)
        self._alive = True
        self._ready = loop.create_future()
        self._send(("initialize", str(model_file), {
            "model_config": model_config_json,
            "model_instance_kind": self.spec.kind,
            "model_instance_name": self.spec.name,
            "model_instance_device_id": str(self.spec.device_id),
            "model_repository": str(self.context.model_dir),
            "model_version": str(self.context.version),
            "model_name": self.context.name,
        }))
        self.pid = await self._ready

    async def execute(self, jobs: list[Job]) -> None:
        if not self._alive:
            raise InferError.unavailable(
                f"model '{self.context.name}' instance '{self.spec.name}' has exited; reload the model")
        batch_id = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._batches[batch_id] = done
        payloads = []
        for job in jobs:
            job_id = next(self._ids)
            self._jobs[job_id] = job
            job.add_cancel_callback(lambda job_id=job_id: self._send_control(("cancel", job_id)))
            payloads.append(request_payload(job_id, job.request))
        self._send(("execute", batch_id, payloads))
        await self._protocol.writable()
        await done

    async def stop(self) -> None:
        if self._process is None:
            return
        if self._alive:
            self._finalized = asyncio.get_running_loop().create_future()
            self._send(("finalize",))
            try:
                await asyncio.wait_for(asyncio.shield(self._finalized), _FINALIZE_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.context.logger.warning("model '%s' instance '%s': finalize timed out",
                                            self.context.name, self.spec.name)
        self._protocol.close()
        self._control.close()
        try:
            await asyncio.to_thread(self._process.wait, _FINALIZE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        await self._closed.wait()
        await self._exit_task
        self._process = None

    # -- frames -------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self._alive:
            self._protocol.send(message)

    def _send_control(self, message: tuple) -> None:
        if self._alive:
            self._control.send(message)

    def _on_closed(self) -> None:
        self._closed.set()
        self._exit_task = asyncio.create_task(self._exited())

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "response":
            self._on_response(*message[1:])
        elif kind == "done":
            self._batches.pop(message[1]).set_result(None)
        elif kind == "bls":
            task = asyncio.create_task(self._run_bls(*message[1:]))
            self._bls_tasks.add(task)
            task.add_done_callback(self._bls_tasks.discard)
        elif kind == "log":
            self.context.logger.log(_LOG_LEVELS.get(message[1], logging.INFO), "%s: %s",
                                    self.spec.name, message[2])
        elif kind == "ready":
            self._ready.set_result(message[1])
        elif kind == "load_failed":
            self.context.logger.error("model '%s' instance '%s' failed to load:\n%s",
                                      self.context.name, self.spec.name, message[2])
            self._ready.set_exception(InferError.unavailable(
                f"model '{self.context.name}' failed to initialize: {message[1]}"))
        elif kind == "finalized" and self._finalized is not None:
            self._finalized.set_result(None)

    def _on_response(self, job_id: int, outputs: list, error: tuple[str, str] | None,
                     parameters: dict, final: bool) -> None:
        job = self._jobs.pop(job_id) if final else self._jobs.get(job_id)
        if job is None:
            return
        request = job.request
        if error is not None:
            response = InferResponse(request.model_name, request.model_version, request.id,
                                     parameters=parameters, final=final, error=to_error(*error))
        else:
            try:
                tensors = output_tensors(outputs)
            except ValueError as exc:
                response = InferResponse(request.model_name, request.model_version, request.id,
                                         final=final, error=InferError.internal(str(exc)))
            else:
                response = InferResponse(request.model_name, request.model_version, request.id,
                                         outputs=tensors, parameters=parameters, final=final)
        job.send(response)

    async def _exited(self) -> None:
        """The process is gone: fail what it still owed, unblock waiters."""
        was_alive, self._alive = self._alive, False
        returncode = await asyncio.to_thread(self._process.wait) if self._process else None
        message = (f"model '{self.context.name}' instance '{self.spec.name}' process exited "
                   f"(exit code {returncode})")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(InferError.unavailable(f"{message} during initialize"))
        if self._finalized is None:
            if was_alive:
                self.context.logger.error("%s unexpectedly", message)
        elif not self._finalized.done():
            self._finalized.set_result(None)
        for job in self._jobs.values():
            job.fail(InferError.internal(message))
        self._jobs.clear()
        for batch in self._batches.values():
            batch.set_result(None)
        self._batches.clear()

    # -- BLS ------------------------------------------------------------------------

    async def _run_bls(self, bls_id: int, model_name: str, version: str, request_id: str,
                       parameters: str, inputs: list, outputs: list[str]) -> None:
        """Send a model's BLS request through the core and its responses back to it."""
        final_sent = False
        try:
            request = InferRequest(
                model_name, version, request_id,
                inputs=[InferTensor.from_numpy(name, array) for name, array in inputs],
                outputs=[RequestedOutput(name) for name in outputs],
                parameters=json.loads(parameters))
            async for response in self.context.core.stream(request):
                error = None if response.error is None else (response.error.code.value,
                                                             response.error.message)
                tensors = [(tensor.name, tensor.data) for tensor in response.outputs]
                self._send_control(("bls_response", bls_id, tensors, error,
                                    response.parameters, response.final))
                final_sent = response.final
                if final_sent:
                    break
        except InferError as exc:
            self._send_control(("bls_response", bls_id, [], (exc.code.value, exc.message), {}, True))
            final_sent = True
        except ValueError as exc:
            self._send_control(("bls_response", bls_id, [],
                                (ErrorCode.INVALID_ARGUMENT.value, str(exc)), {}, True))
            final_sent = True
        except Exception as exc:  # a bug: the model's exec() still gets its final response, not a hang
            self.context.logger.exception("BLS request of model '%s' failed", self.context.name)
            self._send_control(("bls_response", bls_id, [],
                                (ErrorCode.INTERNAL.value, f"internal error: {exc}"), {}, True))
            final_sent = True
        if not final_sent:
            self._send_control(("bls_response", bls_id, [], None, {}, True))


def request_payload(job_id: int, request: InferRequest) -> tuple:
    """What the model's pb_utils.InferenceRequest is built from, in the child."""
    parameters = request.parameters
    flags = (1 if parameters.get("sequence_start") else 0) | (2 if parameters.get("sequence_end") else 0)
    return (job_id, request.id, parameters.get("sequence_id", 0), parameters,
            [(tensor.name, tensor.data) for tensor in request.inputs],
            [output.name for output in request.outputs], flags)


def output_tensors(outputs: list[tuple[str, Any]]) -> list[InferTensor]:
    """The model's outputs as InferTensors (the core keeps only the requested ones)."""
    return [
        InferTensor(name, datatypes.kserve_datatype(array.dtype), list(array.shape), array)
        for name, array in outputs
    ]
