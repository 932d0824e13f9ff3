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

from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from tritonclient.grpc import service_pb2

from triserve.core.errors import InferError
from triserve.frontends import kserve_proto
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.server import InferenceServer

# The service is MultiBackendService; the seed's article spells it "Mutil".
SERVICE_NAMES = ("MultiBackendService", "MutilBackendService")


def parse_predict_request(body: bytes) -> service_pb2.ModelInferRequest:
    try:
        return json_format.Parse(body, service_pb2.ModelInferRequest())
    except json_format.ParseError as exc:
        raise InferError.invalid(f"invalid ModelInferRequest JSON: {exc}") from None


def predict_document(response: service_pb2.ModelInferResponse) -> dict[str, Any]:
    document = json_format.MessageToDict(response, preserving_proto_field_name=True)
    for output in document.get("outputs", []):
        output["shape"] = [int(d) for d in output.get("shape", [])]
    return document


def routes(core: InferenceServer) -> list[BaseRoute]:
    async def predict(request: Request) -> Response:
        proto = parse_predict_request(await request.body())
        infer_request = kserve_proto.request_from_proto(proto)
        response = await until_disconnected(request.receive, core.infer(infer_request))
        return JSONResponse(predict_document(kserve_proto.response_to_proto(response)))

    return [
        Route(prefix + f"/{service}/Predict", predict, methods=["POST"])
        for service in SERVICE_NAMES
        for prefix in ("", "/{base:path}")
    ]
