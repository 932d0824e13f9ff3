"""Triton's generate extension: ``/generate`` (one JSON answer) and ``/generate_stream``
(server-sent events, one ``data:`` event per response of the model).

The request is a flat JSON object: each key is a model input, its value a scalar or
a list converted to the datatype the model's metadata declares. Keys under
``parameters`` that name an input become that input too (as in Triton); the others
are request parameters for the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse
from triserve.frontends.http import jsonio, sse, tensors
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.errors import error_body, error_response
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.api import Core

_PARAMETER_TYPES = (str, int, float, bool)


def decode_generate_request(metadata: dict[str, Any], version: str, document: dict[str, Any],
                            streaming: bool = False, max_elements: int | None = None) -> InferRequest:
    """A generate request for the model described by ``metadata`` (KServe model metadata).

    On ``/generate_stream`` a model with a ``stream`` input (the chat contract) gets
    ``stream: true`` unless the request says otherwise, so that its text arrives piece by piece.
    """
    declared = {entry["name"]: entry for entry in metadata["inputs"]}
    values = dict(document)
    parameters = values.pop("parameters", {})
    if not isinstance(parameters, dict):
        raise InferError.invalid(f"'parameters' must be a JSON object, not {parameters!r:.60}")
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise InferError.invalid(
            f"model '{metadata['name']}' has no input(s) {', '.join(map(repr, unknown))}; its inputs are "
            f"{', '.join(declared)} (request parameters go under \"parameters\")"
        )
    request_parameters = {}
    for key, value in parameters.items():
        if key in declared:
            if key in values:
                raise InferError.invalid(f"input '{key}' is given both as a field and in 'parameters'")
            values[key] = value
        elif isinstance(value, _PARAMETER_TYPES):
            request_parameters[key] = value
        else:
            raise InferError.invalid(f"parameter '{key}' must be a string, number or boolean, not {value!r:.60}")
    if streaming and "stream" in declared:
        values.setdefault("stream", True)
    inputs = [
        tensors.tensor_from_value(name, declared[name]["datatype"], value, len(declared[name]["shape"]),
                                  max_elements)
        for name, value in values.items()
    ]
    return InferRequest(metadata["name"], version, inputs=inputs, parameters=request_parameters)


def generate_document(response: InferResponse) -> dict[str, Any]:
    """The generate response object: each output as a scalar (one element) or a flat list."""
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    for tensor in response.outputs:
        document[tensor.name] = tensors.json_value(tensor)
    if response.parameters:
        document["parameters"] = response.parameters
    return document


async def _events(first: InferResponse, responses: AsyncIterator[InferResponse]) -> AsyncIterator[bytes]:
    """SSE events from the first response on; an error becomes an ``{"error"}`` event.

    The ``finally`` closes the core's stream whatever ends this generator (the last
    response, an error, or the client going away): closing it cancels the request.
    """
    try:
        response: InferResponse | None = first
        while response is not None:
            if response.error is not None:
                yield sse.event(error_body(response.error.message))
            elif response.outputs or response.parameters:
                yield sse.event(generate_document(response))
            response = None if response.final else await anext(responses, None)
    except InferError as exc:
        yield sse.event(error_body(exc.message))
    finally:
        await sse.closing(responses)


def routes(core: Core, max_elements: int | None = None) -> list[BaseRoute]:
    async def decode(request: Request, streaming: bool = False) -> InferRequest:
        model = core.get_model(request.path_params["model"], request.path_params.get("version", ""))
        document = jsonio.loads_object(await request.body())
        return decode_generate_request(model.metadata(), request.path_params.get("version", ""), document,
                                       streaming, max_elements)

    async def generate(request: Request) -> Response:
        infer_request = await decode(request)
        response = await until_disconnected(request.receive, core.infer(infer_request))
        return JSONResponse(generate_document(response))

    async def generate_stream(request: Request) -> Response:
        responses = core.stream(await decode(request, streaming=True))
        # Wait for the first response (the client leaving first cancels the request): a
        # request that fails before inference gets a plain JSON error with its HTTP status,
        # not a 200 event stream.
        first = await sse.first_response(request.receive, responses)
        if first is None:  # a decoupled model that sent nothing at all
            return Response(b"", media_type="text/event-stream")
        if first.error is not None and first.final:
            return error_response(first.error)
        return sse.EventStreamResponse(_events(first, responses))

    return [
        Route(prefix + suffix, handler, methods=["POST"])
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
        for suffix, handler in (("/generate", generate), ("/generate_stream", generate_stream))
    ]
