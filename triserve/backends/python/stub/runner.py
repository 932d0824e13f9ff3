"""The model process: loads one model.py and serves one instance of it over a socket.

Started by file path (``python runner.py FD CONTROL_FD``), so only this folder is on
``sys.path``: the model sees its own environment plus ``triton_python_backend_utils``,
never triserve's packages. ``python runner.py --auto-complete MODEL_PY`` instead
reads a config JSON on stdin, runs ``TritonPythonModel.auto_complete_config`` and
prints the completed JSON.

Frames are a 4-byte little-endian length and a pickle (protocol 5) of a tuple
whose first item names the message; see ``ipc.py`` and ``instance.py`` for the parent side.
Object arrays (BYTES tensors) travel as ``(shape, flat list of items)``, as ``ipc.py``'s
``triserve_wire.py`` (beside this file: this process cannot import triserve).
The main thread reads ``execute`` and ``finalize`` from FD itself, so a request
reaches the model with no thread handoff. Cancellations and BLS responses come on
CONTROL_FD, served by a reader thread, so they arrive while a model is busy.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.util
import inspect
import json
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from types import ModuleType
from typing import Any, Iterable

import triton_python_backend_utils as pb_utils

# After pb_utils (which imports numpy itself): numpy imported first, each model process measured 0.8 MB
# more RSS.
from triserve_wire import CANCELLED_WHILE_QUEUED, QUEUE_TIMEOUT_EXPIRED, pack_array, unpack_array  # noqa: E402

_HEADER = struct.Struct("<I")
_PR_SET_PDEATHSIG = 1


def load_model_module(model_file: str) -> ModuleType:
    """Import model.py by path; its folder goes on sys.path for its sibling modules."""
    sys.path.insert(1, os.path.dirname(model_file))
    spec = importlib.util.spec_from_file_location("model", model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "TritonPythonModel"):
        raise pb_utils.TritonModelException(f"{model_file} defines no class TritonPythonModel")
    return module


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# pb_utils.TritonError codes <-> the server's ErrorCode values, which pick the client's status.
_ERROR_CODE_NAMES = {
    pb_utils.TritonError.UNKNOWN: "INTERNAL",
    pb_utils.TritonError.INTERNAL: "INTERNAL",
    pb_utils.TritonError.NOT_FOUND: "NOT_FOUND",
    pb_utils.TritonError.INVALID_ARG: "INVALID_ARGUMENT",
    pb_utils.TritonError.UNAVAILABLE: "UNAVAILABLE",
    pb_utils.TritonError.UNSUPPORTED: "UNSUPPORTED",
    pb_utils.TritonError.ALREADY_EXISTS: "ALREADY_EXISTS",
    pb_utils.TritonError.CANCELLED: "CANCELLED",
}
_ERROR_CODES = {name: code for code, name in _ERROR_CODE_NAMES.items()
                if code != pb_utils.TritonError.UNKNOWN}


def error_payload(error: pb_utils.TritonError) -> tuple[str, str]:
    return (_ERROR_CODE_NAMES.get(error.code(), "INTERNAL"), error.message())


def response_payload(response: pb_utils.InferenceResponse | None) -> tuple:
    """``(outputs, error, parameters)``; outputs are ``(name, array)`` with str made UTF-8 bytes."""
    if response is None:
        return ([], None, {})
    if response.has_error():
        return ([], error_payload(response.error()), json.loads(response.parameters()))
    outputs = []
    for tensor in response.output_tensors():
        array = tensor.as_numpy()
        if array.dtype.kind in "OSU":
            array = pb_utils.datatypes.as_bytes_array(array)
        outputs.append((tensor.name(), pack_array(array)))
    return (outputs, None, json.loads(response.parameters()))


def response_from_payload(outputs: list, error: tuple[str, str] | None,
                          parameters: dict) -> pb_utils.InferenceResponse:
    if error is not None:
        code_name, message = error
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(message, _ERROR_CODES.get(code_name, pb_utils.TritonError.INTERNAL)),
            parameters=parameters)
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, unpack_array(data)) for name, data in outputs],
        parameters=parameters,
    )


class Connection:
    """Framed pickle messages over the socket to the server; ``send`` is thread-safe."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._file = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        self.send_all((message,))

    def send_all(self, messages: Iterable[tuple]) -> None:
        """Several messages in one write: the server reads them with one wakeup."""
        frames = []
        for message in messages:
            data = pickle.dumps(message, protocol=5)
            frames += (_HEADER.pack(len(data)), data)
        with self._lock:
            self._sock.sendall(b"".join(frames))

    def receive(self) -> tuple | None:
        """The next message, or None when the server closed the socket."""
        header = self._file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack(header)
        data = self._file.read(length)
        if len(data) < length:
            return None
        return pickle.loads(data)


class Instance:
    """One TritonPythonModel object and the requests it is working on."""

    def __init__(self, connection: Connection, control: Connection, model_file: str,
                 args: dict[str, str]):
        self.connection = connection
        self.control = control
        self.model_name = args["model_name"]
        self.decoupled = json.loads(args["model_config"]).get(
            "model_transaction_policy", {}).get("decoupled", False)
        self.requests: dict[int, pb_utils.InferenceRequest] = {}
        self.newest_job = -1  # the highest job id read so far (the server numbers them in order)
        self.cancelled_early: set[int] = set()  # cancelled before this process read them
        self.requests_lock = threading.Lock()
        self.bls_calls: dict[int, queue.SimpleQueue] = {}
        self.next_bls_id = 0
        self.loop = asyncio.new_event_loop()
        pb_utils.channel.send_response = self.send_response
        pb_utils.channel.bls = self.bls
        pb_utils.channel.log = self.log
        module = load_model_module(model_file)
        self.model = module.TritonPythonModel()
        if hasattr(self.model, "initialize"):
            self.run(self.model.initialize(args))

    def run(self, coroutine: Any) -> Any:
        """Finish an ``async def`` model method on this process's event loop."""
        if inspect.iscoroutine(coroutine):
            return self.loop.run_until_complete(coroutine)
        return coroutine

    # -- answering requests -------------------------------------------------

    def send_response(self, job_id: int, response: pb_utils.InferenceResponse | None,
                      final: bool) -> None:
        """A decoupled model's response sender: goes out at once, from any thread."""
        self.connection.send(self.response_message(job_id, response, final))

    def response_message(self, job_id: int, response: pb_utils.InferenceResponse | None,
                         final: bool, refusal: tuple[str, str] | None = None) -> tuple:
        """A response on the wire; ``refusal``: an error (code, message) in place of ``response``."""
        outputs, error, parameters = response_payload(response) if refusal is None else ([], refusal, {})
        if final:
            with self.requests_lock:
                self.requests.pop(job_id, None)
        return ("response", job_id, outputs, error, parameters, final)

    def fail_open_requests(self, batch: list[pb_utils.InferenceRequest], message: str) -> list[tuple]:
        """Final error responses for the requests of ``batch`` that have none yet."""
        failures = []
        for request in batch:
            if not request._completed:
                request._completed = True
                failures.append(self.response_message(request._job_id, pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)), True))
        return failures

    def execute(self, batch_id: int, payloads: list[tuple]) -> None:
        """Run one batch; its returned responses and ``done`` (with the time it began) leave in a
        single write."""
        started_ns = time.monotonic_ns()
        batch = []
        deadlines = {}
        for job_id, request_id, correlation_id, parameters, inputs, outputs, flags, deadline_ns in payloads:
            request = pb_utils.InferenceRequest(
                model_name=self.model_name, request_id=request_id, correlation_id=correlation_id,
                inputs=[pb_utils.Tensor(name, unpack_array(data)) for name, data in inputs],
                requested_output_names=outputs, flags=flags, parameters=parameters)
            request._job_id = job_id
            batch.append(request)
            if deadline_ns:
                deadlines[job_id] = deadline_ns
        with self.requests_lock:
            self.requests.update((request._job_id, request) for request in batch)
            self.newest_job = max(self.newest_job, *(request._job_id for request in batch))
            refused = {}  # what waited here behind another batch and may not run any more
            for request in batch:
                job_id = request._job_id
                if job_id in self.cancelled_early:
                    self.cancelled_early.discard(job_id)
                    refused[job_id] = CANCELLED_WHILE_QUEUED
                elif job_id in deadlines and deadlines[job_id] <= started_ns:
                    refused[job_id] = QUEUE_TIMEOUT_EXPIRED
        replies = []
        if refused:  # as in Triton's queue: it never reaches the model
            replies = [self.response_message(job_id, None, True, (code, "")) for job_id, code in refused.items()]
            batch = [request for request in batch if request._job_id not in refused]
        if batch:
            try:
                replies += self.answer(batch, self.run(self.model.execute(batch)))
            except Exception as exc:  # the model's error goes to its clients; the instance lives on
                self.log("ERROR", f"execute failed:\n{traceback.format_exc()}")
                replies += self.fail_open_requests(batch, describe(exc))
        self.connection.send_all([*replies, ("done", batch_id, started_ns)])

    def answer(self, batch: list[pb_utils.InferenceRequest], responses: Any) -> list[tuple]:
        """The response messages for what ``execute`` returned: one response per request, or None."""
        if responses is None:
            if self.decoupled:
                return []
            return self.fail_open_requests(
                batch, "execute returned None without sending a final response for the request")
        if self.decoupled:
            return self.fail_open_requests(
                batch, "execute of a decoupled model must return None and answer through "
                "request.get_response_sender()")
        responses = list(responses)
        if len(responses) != len(batch):
            return self.fail_open_requests(
                batch, f"execute returned {len(responses)} responses for {len(batch)} requests")
        replies = []
        for request, response in zip(batch, responses):
            if request._completed:
                continue
            if not isinstance(response, pb_utils.InferenceResponse):
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"execute returned {type(response).__name__}, not an InferenceResponse"))
            request._completed = True
            replies.append(self.response_message(request._job_id, response, True))
        return replies

    # -- messages from the server --------------------------------------------

    def cancel(self, job_id: int) -> None:
        with self.requests_lock:
            request = self.requests.get(job_id)
            if request is None and job_id > self.newest_job:  # not read yet: queued behind a batch
                self.cancelled_early.add(job_id)
        if request is not None:
            request._cancelled = True

    def bls(self, request: pb_utils.InferenceRequest, decoupled: bool) -> queue.SimpleQueue:
        responses: queue.SimpleQueue = queue.SimpleQueue()
        with self.requests_lock:
            bls_id = self.next_bls_id
            self.next_bls_id += 1
            self.bls_calls[bls_id] = responses
        inputs = [(tensor.name(), pack_array(tensor.as_numpy())) for tensor in request.inputs()]
        version = "" if request.model_version < 0 else str(request.model_version)
        self.connection.send(("bls", bls_id, request.model_name, version, request.request_id(),
                              request.parameters(), inputs, request.requested_output_names()))
        return responses

    def bls_response(self, bls_id: int, outputs: list, error: tuple | None, parameters: dict,
                     final: bool) -> None:
        with self.requests_lock:
            responses = self.bls_calls.pop(bls_id, None) if final else self.bls_calls.get(bls_id)
        if responses is None:  # a server bug; the control reader must live on for every other call
            print(f"triserve: response for unknown BLS request {bls_id} ignored", file=sys.stderr, flush=True)
            return
        responses.put((response_from_payload(outputs, error, parameters), final))

    def log(self, level: str, message: str) -> None:
        self.connection.send(("log", level, message))

    def read_control(self) -> None:
        """Reader thread: cancellations and BLS responses; exit the process when the server goes away."""
        while True:
            message = self.control.receive()
            if message is None:
                os._exit(0)
            if message[0] == "cancel":
                self.cancel(message[1])
            else:
                self.bls_response(*message[1:])

    def serve(self) -> None:
        """Main thread: read and run batches one at a time until told to finalize."""
        threading.Thread(target=self.read_control, name="triserve-control", daemon=True).start()
        while True:
            message = self.connection.receive()
            if message is None:
                os._exit(0)
            if message[0] == "finalize":
                break
            self.execute(message[1], message[2])
        if hasattr(self.model, "finalize"):
            try:
                self.run(self.model.finalize())
            except Exception:
                self.log("ERROR", f"finalize failed:\n{traceback.format_exc()}")
        self.connection.send(("finalized",))


def die_with_parent() -> None:
    """Ask Linux to kill this process when the server dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def serve_instance(fd: int, control_fd: int) -> None:
    die_with_parent()
    connection = Connection(socket.socket(fileno=fd))
    control = Connection(socket.socket(fileno=control_fd))
    message = connection.receive()
    if message is None:
        return
    _, model_file, args = message
    try:
        instance = Instance(connection, control, model_file, args)
    except Exception as exc:
        connection.send(("load_failed", describe(exc), traceback.format_exc()))
        return
    gc.freeze()  # the loaded model stays out of the collections that requests trigger
    connection.send(("ready", os.getpid()))
    instance.serve()


def auto_complete(model_file: str) -> None:
    """Print the config completed by the model's ``auto_complete_config`` (stdout is ours alone)."""
    result = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    config = pb_utils.ModelConfig(sys.stdin.read())
    model_class = load_model_module(model_file).TritonPythonModel
    completed = model_class.auto_complete_config(config)
    if not isinstance(completed, pb_utils.ModelConfig):
        raise pb_utils.TritonModelException(
            "auto_complete_config must return the ModelConfig it was given")
    result.write(json.dumps(completed.as_dict()))
    result.close()


if __name__ == "__main__":
    if sys.argv[1] == "--auto-complete":
        auto_complete(sys.argv[2])
    else:
        serve_instance(int(sys.argv[1]), int(sys.argv[2]))
