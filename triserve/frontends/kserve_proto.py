"""KServe v2 protobuf messages <-> core types.

The gRPC service and the seed's JSON predict endpoint (which parses the same
``ModelInferRequest`` from protobuf JSON) both decode requests here, so the
rules for typed ``contents``, ``raw_input_contents`` and parameters live in
one place. Tensor data goes through :class:`InferTensor` so shape checks and
``-1`` inference match every other frontend.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping, MutableMapping, Sequence, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2, service_pb2

from triserve.core import datatypes
from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor, RequestedOutput, too_many_elements

# The typed ``InferTensorContents`` field that carries each datatype. FP16 has
# none in the KServe proto: it can only travel as raw bytes.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_INT64_MAX = 2**63 - 1

MessageT = TypeVar("MessageT", bound=Message)


# --- parameters -------------------------------------------------------------


def parameters_from_proto(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``map<string, InferParameter>`` (or ``ModelRepositoryParameter``) as Python values."""
    values: dict[str, Any] = {}
    if not parameters:  # most requests and tensors carry none: skip the Mapping mixin's items()
        return values
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is None:
            raise InferError.invalid(f"parameter '{key}' has no value")
        values[key] = getattr(parameter, kind)
    return values


def set_parameters(target: MutableMapping[str, Any], values: Mapping[str, Any]) -> None:
    """Write Python values into a ``map<string, InferParameter>`` field."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, (bool, np.bool_)):
            parameter.bool_param = bool(value)
        elif isinstance(value, numbers.Integral):
            if int(value) > _INT64_MAX:
                parameter.uint64_param = int(value)
            else:
                parameter.int64_param = int(value)
        elif isinstance(value, numbers.Real):
            parameter.double_param = float(value)
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InferError.internal(
                f"parameter '{key}' holds a {type(value).__name__}, which an InferParameter cannot carry"
            )


# --- inference ---------------------------------------------------------------


def request_from_proto(message: service_pb2.ModelInferRequest, max_elements: int | None = None) -> InferRequest:
    """Decode a ``ModelInferRequest``; every problem is an INVALID_ARGUMENT naming the input.

    An input past ``max_elements`` elements is refused before its array is built."""
    raw_contents: Sequence[bytes] = message.raw_input_contents
    if raw_contents and len(raw_contents) != len(message.inputs):
        raise InferError.invalid(
            f"request has {len(raw_contents)} raw_input_contents for {len(message.inputs)} inputs; "
            "raw_input_contents must hold the data of every input, in input order, or be empty"
        )
    inputs = [
        _input_from_proto(tensor, raw_contents[index] if raw_contents else None, max_elements)
        for index, tensor in enumerate(message.inputs)
    ]
    outputs = [
        RequestedOutput(output.name, parameters_from_proto(output.parameters))
        for output in message.outputs
    ]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters_from_proto(message.parameters),
    )


def _input_from_proto(
    tensor: service_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None, max_elements: int | None
) -> InferTensor:
    if raw is not None:
        if tensor.HasField("contents") and tensor.contents.ListFields():
            raise InferError.invalid(
                f"input '{tensor.name}' has data in both 'contents' and raw_input_contents; send one"
            )
        decoded = InferTensor.from_raw(tensor.name, tensor.datatype, tensor.shape, raw, max_elements)
    else:
        decoded = InferTensor.from_flat(
            tensor.name, tensor.datatype, tensor.shape, _typed_contents(tensor, max_elements), max_elements
        )
    decoded.parameters = parameters_from_proto(tensor.parameters)
    return decoded


def _typed_contents(tensor: service_pb2.ModelInferRequest.InferInputTensor,
                    max_elements: int | None = None) -> list[Any]:
    """The values of the one ``contents`` field that matches the input's datatype.

    An input without data is an empty list: the shape check then decides
    whether that is allowed (``[0]`` or ``[-1]``) and names the input if not.
    """
    filled = [field.name for field, _ in tensor.contents.ListFields()]
    if not filled or tensor.datatype not in datatypes.KSERVE_TO_NUMPY:
        return []  # an unknown datatype is rejected by name in InferTensor.from_flat
    expected = CONTENTS_FIELD.get(tensor.datatype)
    if expected is None:
        raise InferError.invalid(
            f"input '{tensor.name}': {tensor.datatype} has no typed 'contents' field; "
            "send its data in raw_input_contents"
        )
    if filled != [expected]:
        raise InferError.invalid(
            f"input '{tensor.name}' has datatype {tensor.datatype}, whose data goes in "
            f"contents.{expected}, but the request filled contents.{', contents.'.join(filled)}"
        )
    values = getattr(tensor.contents, expected)
    if max_elements is not None and len(values) > max_elements:
        raise too_many_elements(tensor.name, max_elements, len(values))
    return list(values)


def response_to_proto(response: InferResponse,
                      message: service_pb2.ModelInferResponse | None = None) -> service_pb2.ModelInferResponse:
    """Encode a response; tensor data goes in ``raw_output_contents`` as Triton sends it.

    ``message``: an empty ``ModelInferResponse`` to fill in place (a stream reply's
    ``infer_response``: building it apart would copy it into the reply)."""
    if message is None:
        message = service_pb2.ModelInferResponse()
    message.model_name = response.model_name
    message.model_version = response.model_version
    message.id = response.id
    add = message.outputs.add
    for tensor in response.outputs:
        output = add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.parameters:
            set_parameters(output.parameters, tensor.parameters)
    message.raw_output_contents.extend([tensor.raw() for tensor in response.outputs])
    if response.parameters:
        set_parameters(message.parameters, response.parameters)
    return message


# --- metadata, config, statistics, repository ----------------------------------


def _from_json(data: Mapping[str, Any], message: MessageT) -> MessageT:
    """Fill a message from the core's JSON-shaped dict.

    The proto defines what the gRPC wire can carry; keys it has no field for
    (HTTP-only extras) are left out rather than failing the call.
    """
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def server_metadata_to_proto(metadata: Mapping[str, Any]) -> service_pb2.ServerMetadataResponse:
    return _from_json(metadata, service_pb2.ServerMetadataResponse())


def model_metadata_to_proto(metadata: Mapping[str, Any]) -> service_pb2.ModelMetadataResponse:
    return _from_json(metadata, service_pb2.ModelMetadataResponse())


def model_config_to_proto(config: model_config_pb2.ModelConfig) -> service_pb2.ModelConfigResponse:
    return service_pb2.ModelConfigResponse(config=config)


def statistics_to_proto(model_stats: Iterable[Mapping[str, Any]]) -> service_pb2.ModelStatisticsResponse:
    return _from_json({"model_stats": list(model_stats)}, service_pb2.ModelStatisticsResponse())


def repository_index_to_proto(
    models: Iterable[Mapping[str, Any]],
) -> service_pb2.RepositoryIndexResponse:
    return _from_json({"models": list(models)}, service_pb2.RepositoryIndexResponse())
