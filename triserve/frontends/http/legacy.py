"""The seed's JSON predict: ``POST <base>/MutilBackendService/Predict``.

The body is the protobuf JSON mapping of KServe v2 ``ModelInferRequest`` (tensors in
``contents`` with base64 ``bytes_contents``, or ``raw_input_contents``); the answer
is the JSON mapping of ``ModelInferResponse`` with ``raw_output_contents``, exactly
what the seed's LangChain class decodes. The proto <-> InferRequest conversion is
``frontends/kserve_proto.py``, shared with gRPC, so both wires accept and answer the same.

Field names are kept as in the proto (``raw_output_contents``, not ``rawOutputContents``)
and ``shape`` is a list of JSON integers (the proto's int64 would otherwise become
strings, which the seed's ``reshape(outputs[1]["shape"])`` cannot use).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from tritonclient.grpc import service_pb2

from triserve.core.errors import InferError
from triserve.frontends import kserve_proto
from triserve.frontends.http import jsonio
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.api import Core

# The service is MultiBackendService; the seed's article spells it "Mutil".
SERVICE_NAMES = ("MultiBackendService", "MutilBackendService")


# Proto3 JSON bytes: standard or URL-safe base64, padded or not. Anything else is refused
# (protobuf's own decoder would drop stray characters and decode what is left).
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*")


def _is_base64(value: str) -> bool:
    data = value.rstrip("=")
    padding = len(value) - len(data)
    return (_BASE64.fullmatch(data) is not None and len(data) % 4 != 1 and padding <= 2
            and (padding == 0 or len(value) % 4 == 0))


def _check_base64(document: Any) -> None:
    """Every ``bytes_contents`` element and ``raw_input_contents`` entry must be valid base64;
    the error names the input it belongs to."""
    if not isinstance(document, dict):
        return
    inputs = document.get("inputs") if isinstance(document.get("inputs"), list) else []
    names = [tensor.get("name") if isinstance(tensor, dict) and isinstance(tensor.get("name"), str)
             else f"#{index}" for index, tensor in enumerate(inputs)]
    for tensor, name in zip(inputs, names):
        contents = tensor.get("contents") if isinstance(tensor, dict) else None
        values = (contents.get("bytes_contents", contents.get("bytesContents"))
                  if isinstance(contents, dict) else None)
        for position, value in enumerate(values if isinstance(values, list) else []):
            if isinstance(value, str) and not _is_base64(value):  # other types: protobuf names them
                raise InferError.invalid(
                    f"input '{name:.80}': contents.bytes_contents[{position}] is not valid base64")
    raw = document.get("raw_input_contents", document.get("rawInputContents"))
    for position, value in enumerate(raw if isinstance(raw, list) else []):
        if isinstance(value, str) and not _is_base64(value):
            owner = f" (input '{names[position]:.80}')" if position < len(names) else ""
            raise InferError.invalid(f"raw_input_contents[{position}]{owner} is not valid base64")


def parse_predict_request(body: bytes) -> service_pb2.ModelInferRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InferError.invalid(f"request body is not UTF-8 text (byte {exc.start}): "
                                 "send the ModelInferRequest as JSON") from None
    try:
        document = jsonio.loads(text)
    except InferError as exc:
        raise InferError.invalid(f"invalid ModelInferRequest JSON: {exc.message}") from None
    _check_base64(document)
    try:
        return json_format.ParseDict(document, service_pb2.ModelInferRequest())
    except json_format.ParseError as exc:
        raise InferError.invalid(f"invalid ModelInferRequest JSON: {exc}") from None


def predict_document(response: service_pb2.ModelInferResponse) -> dict[str, Any]:
    document = json_format.MessageToDict(response, preserving_proto_field_name=True)
    for output in document.get("outputs", []):
        output["shape"] = [int(d) for d in output.get("shape", [])]
    return document


def routes(core: Core, max_elements: int | None = None) -> list[BaseRoute]:
    async def predict(request: Request) -> Response:
        proto = parse_predict_request(await request.body())
        infer_request = kserve_proto.request_from_proto(proto, max_elements)
        response = await until_disconnected(request.receive, core.infer(infer_request))
        return JSONResponse(predict_document(kserve_proto.response_to_proto(response)))

    return [
        Route(prefix + f"/{service}/Predict", predict, methods=["POST"])
        for service in SERVICE_NAMES
        for prefix in ("", "/{base:path}")
    ]
