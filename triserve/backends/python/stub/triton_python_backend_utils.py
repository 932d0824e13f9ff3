"""Triton's ``triton_python_backend_utils`` (pb_utils) API, for model.py files run unmodified.

This module runs inside the model's process, possibly under a foreign Python
environment (EXECUTION_ENV_PATH), so it imports only numpy and the standard
library. The BYTES codec is triserve's own ``core/datatypes.py``, loaded by file
path so that server and stub share one implementation without importing
``triserve``. Names and signatures follow Triton's python_backend
(``src/resources/triton_python_backend_utils.py`` and ``src/pb_stub.cc``).
"""

from __future__ import annotations

import importlib.util
import json
import queue
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def _load_datatypes():
    path = Path(__file__).resolve().parents[3] / "core" / "datatypes.py"
    spec = importlib.util.spec_from_file_location("triserve_stub_datatypes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


datatypes = _load_datatypes()

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2

# Triton's TRITONSERVER_DataType enum values, as model configs in JSON carry them.
_TRITON_TYPE_NUMBERS = {
    "TYPE_BOOL": 1, "TYPE_UINT8": 2, "TYPE_UINT16": 3, "TYPE_UINT32": 4, "TYPE_UINT64": 5,
    "TYPE_INT8": 6, "TYPE_INT16": 7, "TYPE_INT32": 8, "TYPE_INT64": 9,
    "TYPE_FP16": 10, "TYPE_FP32": 11, "TYPE_FP64": 12, "TYPE_STRING": 13,
}
TRITON_STRING_TO_NUMPY: dict[str, type] = {
    config_name: datatypes.numpy_dtype(kserve_name)
    for config_name, kserve_name in datatypes.CONFIG_TO_KSERVE.items()
}
_NUMBER_TO_NUMPY = {
    number: TRITON_STRING_TO_NUMPY[name] for name, number in _TRITON_TYPE_NUMBERS.items()
}


def triton_string_to_numpy(triton_type_string: str) -> type:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> type | None:
    return _NUMBER_TO_NUMPY.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    try:
        name = datatypes.KSERVE_TO_CONFIG[datatypes.kserve_datatype(data_type)]
    except (TypeError, ValueError):
        return None
    return _TRITON_TYPE_NUMBERS[name]


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray:
    """A BYTES tensor as one length-prefixed buffer (a 0-d object array, as Triton returns)."""
    if input_tensor.size == 0:
        return np.empty([0], dtype=np.object_)
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type is not np.bytes_:
        raise TritonModelException("cannot serialize bytes tensor: invalid datatype")
    return np.asarray(datatypes.pack_bytes(input_tensor), dtype=np.object_)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    """A length-prefixed buffer as a 1-D object array of ``bytes``."""
    return datatypes.unpack_bytes(bytes(encoded_tensor))


class TritonError:
    """An error a model puts in an InferenceResponse; ``code`` picks the client's status."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL):
        self._message = message
        self._code = code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code})"

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    """Raised by pb_utils calls (and by models) to fail a request with a message."""

    def message(self) -> str:
        return str(self)


class Tensor:
    """A named numpy array, an input of a request or an output of a response."""

    __slots__ = ("_name", "_array")

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None):
        array = np.asarray(numpy_array)
        if triton_dtype is not None:
            dtype = triton_to_numpy_type(triton_dtype)
            if dtype is None:
                raise TritonModelException(f"tensor '{name}': unknown Triton datatype {triton_dtype}")
            if array.dtype != dtype:
                array = array.view(dtype)
        elif array.dtype.kind not in "OSU" and numpy_to_triton_type(array.dtype) is None:
            raise TritonModelException(
                f"tensor '{name}': numpy dtype {array.dtype} has no Triton datatype"
            )
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int | None:
        return numpy_to_triton_type(self._array.dtype)

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, dlpack: Any) -> "Tensor":
        """Wrap a DLPack producer (a torch tensor, a capsule-carrying object) as a CPU tensor."""
        if not hasattr(dlpack, "__dlpack__"):
            raise TritonModelException(
                f"tensor '{name}': from_dlpack needs an object with __dlpack__ (e.g. a torch tensor)"
            )
        return Tensor(name, np.from_dlpack(dlpack))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


class InferenceResponse:
    """The answer to one request: output tensors, or an error."""

    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None,
                 parameters: dict[str, Any] | str | None = None):
        if output_tensors is not None and not isinstance(output_tensors, list):
            raise TritonModelException('"output_tensors" must be a list.')
        if error is not None and not isinstance(error, TritonError):
            error = TritonError(str(error))
        self._output_tensors = output_tensors or []
        self._error = error
        self._parameters = json.loads(parameters) if isinstance(parameters, str) else dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


def get_input_tensor_by_name(inference_request: "InferenceRequest", name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((item for item in model_config.get("input", []) if item["name"] == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((item for item in model_config.get("output", []) if item["name"] == name), None)


class _Channel:
    """How pb_utils reaches the server; the runner installs the real one at start-up.

    ``send_response(job_id, response, final)`` answers a request;
    ``bls(request, decoupled)`` returns a queue of ``(InferenceResponse, final)``;
    ``log(level, message)`` goes to the server's log.
    """

    send_response: Callable[[int, InferenceResponse | None, bool], None]
    bls: Callable[["InferenceRequest", bool], "queue.SimpleQueue[tuple[InferenceResponse, bool]]"]
    log: Callable[[str, str], None]


channel = _Channel()


class InferenceResponseSender:
    """Sends the responses of one request, any number for a decoupled model."""

    def __init__(self, request: "InferenceRequest"):
        self._request = request

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if self._request._completed:
            raise TritonModelException(
                f"request '{self._request.request_id()}' already sent its final response"
            )
        if response is None and not final:
            raise TritonModelException("send() needs a response, the COMPLETE_FINAL flag, or both")
        self._request._completed = final
        channel.send_response(self._request._job_id, response, final)

    def is_cancelled(self) -> bool:
        return self._request.is_cancelled()


class InferenceRequest:
    """A request to this model (built by the runner) or to another model (BLS).

    Models build BLS requests with keyword arguments, as in Triton:
    ``InferenceRequest(model_name=..., inputs=[...], requested_output_names=[...])``.
    """

    def __init__(self, model_name: str = "", inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, request_id: str = "",
                 correlation_id: int | str = 0, model_version: int = -1, flags: int = 0,
                 timeout: int = 0, parameters: dict[str, Any] | str | None = None, **_triton_only: Any):
        self.model_name = model_name
        self.model_version = model_version
        self._inputs = list(inputs or [])
        self._requested_output_names = list(requested_output_names or [])
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = json.loads(parameters) if isinstance(parameters, str) else dict(parameters or {})
        self._job_id = -1
        self._cancelled = False  # set by the runner's control thread; a bool store is atomic
        self._completed = False
        self._sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return json.dumps(self._parameters)

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            self._sender = InferenceResponseSender(self)
        return self._sender

    def is_cancelled(self) -> bool:
        return self._cancelled

    def set_release_flags(self, flags: int) -> None:
        """Accepted for compatibility: requests are always released after execute."""

    def exec(self, decoupled: bool = False) -> InferenceResponse | Iterator[InferenceResponse]:
        """Run this request on another model (BLS) and wait for its response(s)."""
        responses = channel.bls(self, decoupled)
        if decoupled:
            return _ResponseIterator(responses)
        return _single_response(self.model_name, responses)

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse | Iterator[InferenceResponse]:
        """``exec`` without blocking the model's event loop while the other model runs."""
        import asyncio

        responses = channel.bls(self, decoupled)
        if decoupled:
            return _ResponseIterator(responses)
        return await asyncio.get_running_loop().run_in_executor(
            None, _single_response, self.model_name, responses
        )


class _ResponseIterator:
    """The responses of a decoupled BLS call, as they arrive; ends after the final one."""

    def __init__(self, responses: "queue.SimpleQueue[tuple[InferenceResponse, bool]]"):
        self._responses = responses
        self._done = False

    def __iter__(self) -> "_ResponseIterator":
        return self

    def __next__(self) -> InferenceResponse:
        if self._done:
            raise StopIteration
        response, final = self._responses.get()
        self._done = final
        return response


def _single_response(model_name: str, responses: "queue.SimpleQueue") -> InferenceResponse:
    """The one response of a non-decoupled BLS call; a decoupled model's many are an error."""
    collected = []
    final = False
    while not final:
        response, final = responses.get()
        if response.has_error() or response.output_tensors() or not final:
            collected.append(response)
    if len(collected) == 1:
        return collected[0]
    return InferenceResponse(error=TritonError(
        f"model '{model_name}' sent {len(collected)} responses: use exec(decoupled=True) "
        "for a decoupled model", TritonError.UNSUPPORTED))


class Logger:
    """Model logging into the server's log (Triton's pb_utils.Logger)."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    VERBOSE = "VERBOSE"

    @staticmethod
    def log(message: str, level: str = INFO) -> None:
        channel.log(level, str(message))

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, Logger.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, Logger.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, Logger.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, Logger.VERBOSE)


LogLevel = Logger


class ModelConfig:
    """The model configuration handed to ``TritonPythonModel.auto_complete_config``.

    Setters refuse to contradict what config.pbtxt already states, as Triton's do.
    """

    def __init__(self, model_config: str | dict):
        self._config = json.loads(model_config) if isinstance(model_config, str) else model_config

    def as_dict(self) -> dict:
        return self._config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = int(self._config.get("max_batch_size", 0))
        if current not in (0, max_batch_size):
            raise ValueError(
                f"configuration specified max_batch_size {current}, but auto-complete-config "
                f"tries to set it to {max_batch_size}"
            )
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        policy = self._config.setdefault("model_transaction_policy", {})
        for key, value in transaction_policy_dict.items():
            if key != "decoupled":
                raise ValueError(f"model_transaction_policy has no field '{key}'")
            if key in policy and bool(policy[key]) != bool(value):
                raise ValueError(
                    f"configuration specified decoupled={policy[key]}, but auto-complete-config "
                    f"tries to set it to {value}"
                )
            policy[key] = bool(value)

    def add_input(self, input: dict) -> None:
        self._add_tensor("input", input)

    def add_output(self, output: dict) -> None:
        self._add_tensor("output", output)

    def _add_tensor(self, kind: str, tensor: dict) -> None:
        if "name" not in tensor:
            raise ValueError(f"{kind} {tensor} has no 'name'")
        tensors = self._config.setdefault(kind, [])
        existing = next((item for item in tensors if item["name"] == tensor["name"]), None)
        if existing is None:
            tensors.append(dict(tensor))
            return
        for key, value in tensor.items():
            if key in existing and existing[key] not in (value, [], "", "TYPE_INVALID"):
                raise ValueError(
                    f"{kind} '{tensor['name']}': configuration specified {key}={existing[key]}, "
                    f"but auto-complete-config tries to set it to {value}"
                )
            existing[key] = value
