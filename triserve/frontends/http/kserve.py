"""KServe v2 REST with Triton's extensions: health, metadata, config, infer (JSON and
binary tensor data), statistics and the model repository.

Decoding is strict: every field of an inference request is either used or refused
with a message naming it, so a typo never silently changes what the model sees.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor, RequestedOutput
from triserve.frontends.http import binary, jsonio, tensors
from triserve.frontends.http.errors import error_body
from triserve.frontends.http.jsonio import JSONResponse

if TYPE_CHECKING:
    from triserve.core.api import Core

_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_FIELDS = frozenset({"name", "parameters"})
_BINARY_OUTPUT = "binary_data"  # output parameter: send this output as binary
_BINARY_OUTPUTS = "binary_data_output"  # request parameter: default for every output
# Bodies larger than this are decoded in a worker thread, so the event loop keeps serving.
THREAD_DECODE_BYTES = 1 << 20


@dataclass(slots=True)
class OutputEncoding:
    """Which outputs the client wants as binary data rather than JSON ``data``."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, tensor: InferTensor) -> bool:
        wanted = self.binary.get(tensor.name, self.binary_default)
        # BYTES that are not UTF-8 cannot be JSON strings: send them binary, as Triton does.
        return wanted or (tensor.datatype == "BYTES" and not tensors.is_text(tensor))


def decode_infer_request(
    model: str, version: str, body: bytes, header_length: str | None, max_elements: int | None = None
) -> tuple[InferRequest, OutputEncoding]:
    """An inference request body (JSON, optionally followed by binary tensor data); each
    input past ``max_elements`` elements is refused before its array is built."""
    json_part, binary_part = binary.split_body(body, header_length)
    document = jsonio.loads_object(json_part)
    _check_fields(document, _REQUEST_FIELDS, "inference request")
    request_id = _typed(document, "id", str, "inference request", "")
    parameters = dict(_typed(document, "parameters", dict, "inference request", {}))
    encoding = OutputEncoding(_flag(parameters.pop(_BINARY_OUTPUTS, False), _BINARY_OUTPUTS))

    inputs = []
    for entry in _typed(document, "inputs", list, "inference request", None) or []:
        inputs.append(_decode_input(entry, binary_part, max_elements))
    binary_part.check_consumed()
    if not inputs:
        raise InferError.invalid("inference request has no 'inputs'")

    outputs = []
    for entry in _typed(document, "outputs", list, "inference request", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InferError.invalid("each requested output must be an object with a string 'name'")
        name = entry["name"]
        _check_fields(entry, _OUTPUT_FIELDS, f"output '{name}'")
        output_parameters = dict(_typed(entry, "parameters", dict, f"output '{name}'", {}))
        if "classification" in output_parameters:
            raise InferError.invalid(f"output '{name}': the classification extension is not supported")
        if _BINARY_OUTPUT in output_parameters:
            encoding.binary[name] = _flag(output_parameters.pop(_BINARY_OUTPUT), f"output '{name}' {_BINARY_OUTPUT}")
        outputs.append(RequestedOutput(name, output_parameters))

    request = InferRequest(model, version, request_id, inputs, outputs, parameters)
    return request, encoding


def encode_infer_response(
    response: InferResponse, encoding: OutputEncoding
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers, built once (the fast path sends them as they are)."""
    outputs = []
    chunks: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        parameters = dict(tensor.parameters)
        if encoding.is_binary(tensor):
            raw = tensor.raw()
            parameters[binary.SIZE_PARAMETER] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = tensors.json_data(tensor)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    return binary.encode_body(document, chunks)


async def infer(
    core: Core, model: str, version: str, body: bytes,
    header_length: str | None, max_elements: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """``POST .../infer`` without a web framework: raw body and headers in, response bytes out.

    Both the Starlette route and the app's ASGI fast path call this, so the two agree.
    The body arrives plain (the body-limit middleware inflated a compressed one).
    """
    if len(body) > THREAD_DECODE_BYTES:
        infer_request, encoding = await asyncio.to_thread(
            decode_infer_request, model, version, body, header_length, max_elements)
    else:
        infer_request, encoding = decode_infer_request(model, version, body, header_length, max_elements)
    return encode_infer_response(await core.infer(infer_request), encoding)


def infer_path_target(path: str) -> tuple[str, str] | None:
    """``(model, version)`` when ``path`` is ``/v2/models/{model}[/versions/{version}]/infer``.

    Matches what the Starlette routes below match (a parameter is one non-empty segment).
    """
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    segments = path[len("/v2/models/"):-len("/infer")].split("/")
    if len(segments) == 1 and segments[0]:
        return segments[0], ""
    if len(segments) == 3 and segments[1] == "versions" and segments[0] and segments[2]:
        return segments[0], segments[2]
    return None


def _decode_input(entry: Any, binary_part: binary.BinaryReader, max_elements: int | None) -> InferTensor:
    # Every check below is a C-level test of the common case first; only a request that fails
    # one goes through the slower checks that word the error.
    if type(entry) is not dict or type(name := entry.get("name")) is not str:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InferError.invalid("each input must be an object with a string 'name'")
        name = entry["name"]
    datatype = entry.get("datatype")
    shape = entry.get("shape")
    parameters = entry.get("parameters")
    if (not entry.keys() <= _INPUT_FIELDS or type(datatype) is not str or type(shape) is not list
            or ("parameters" in entry and type(parameters) is not dict)):
        where = f"input '{name}'"
        _check_fields(entry, _INPUT_FIELDS, where)
        datatype = _typed(entry, "datatype", str, where, None)
        shape = _typed(entry, "shape", list, where, None)
        if datatype is None or shape is None:
            raise InferError.invalid(f"{where} needs 'datatype' and 'shape'")
        parameters = _typed(entry, "parameters", dict, where, {})
    for d in shape:
        if type(d) is not int:
            if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
                raise InferError.invalid(f"input '{name}': 'shape' must be a list of integers, not {shape!r}")
            break
    where = f"input '{name}'"
    parameters = dict(parameters) if parameters else {}
    if binary.SIZE_PARAMETER in parameters:
        if "data" in entry:
            raise InferError.invalid(f"{where} has both 'data' and parameter {binary.SIZE_PARAMETER}")
        raw = binary_part.take(name, parameters.pop(binary.SIZE_PARAMETER))
        tensor = InferTensor.from_raw(name, datatype, shape, raw, max_elements)
    elif "data" in entry:
        tensor = tensors.tensor_from_json(name, datatype, shape, entry["data"], max_elements)
    else:
        raise InferError.invalid(f"{where} has no 'data' and no {binary.SIZE_PARAMETER} parameter")
    tensor.parameters = parameters
    return tensor


def _check_fields(entry: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InferError.invalid(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"expected {', '.join(sorted(allowed))}"
        )


def _typed(entry: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = entry.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise InferError.invalid(f"{where}: '{key}' must be a JSON {_JSON_NAMES[kind]}, not {value!r:.60}")
    return value


_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InferError.invalid(f"parameter {what} must be true or false, not {value!r}")
    return value


def routes(core: Core, max_elements: int | None = None) -> list[BaseRoute]:
    def model_version(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(core.metadata())

    async def live(request: Request) -> Response:
        return _health(core.live, "server is not live")

    async def ready(request: Request) -> Response:
        return _health(core.ready, "server is not ready")

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(core.get_model(*model_version(request)).metadata())

    async def model_ready(request: Request) -> Response:
        try:
            ready = core.get_model(*model_version(request)).ready
        except InferError as exc:
            return JSONResponse(error_body(exc.message), status_code=400)
        return _health(ready, "model is not ready")

    async def model_config(request: Request) -> Response:
        return JSONResponse(core.get_model(*model_version(request)).config_json())

    async def infer_route(request: Request) -> Response:
        body, headers = await infer(
            core, *model_version(request), await request.body(), request.headers.get(binary.HEADER), max_elements,
        )
        return Response(body, headers=headers)

    async def all_statistics(request: Request) -> Response:
        return JSONResponse({"model_stats": core.statistics()})

    async def model_statistics(request: Request) -> Response:
        return JSONResponse({"model_stats": core.statistics(*model_version(request))})

    async def repository_index(request: Request) -> Response:
        document = jsonio.loads_object(await request.body(), empty_ok=True)
        _check_fields(document, frozenset({"ready"}), "repository index request")
        ready_only = _flag(document.get("ready", False), "ready")
        return JSONResponse(core.repository_index(ready_only=ready_only))

    async def load(request: Request) -> Response:
        parameters = _repository_parameters(await request.body(), {"config"})
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InferError.invalid("load parameter 'config' must be the model config as a JSON string")
        await core.load_model(request.path_params["model"], config)
        return Response(status_code=200)

    async def unload(request: Request) -> Response:
        # There are no ensembles, so no model has dependents: unload_dependents changes nothing.
        parameters = _repository_parameters(await request.body(), {"unload_dependents"})
        if "unload_dependents" in parameters:
            _flag(parameters["unload_dependents"], "unload_dependents")
        await core.unload_model(request.path_params["model"])
        return Response(status_code=200)

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    return [
        # The app's ASGI fast path answers POST to these before Starlette sees it; the routes
        # remain for Starlette's own answers (405 to other methods) and its route list.
        Route(model + "/infer", infer_route, methods=["POST"]),
        Route(versioned + "/infer", infer_route, methods=["POST"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", all_statistics, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
        *[
            route
            for prefix in (model, versioned)
            for route in (
                Route(prefix, model_metadata, methods=["GET"]),
                Route(prefix + "/ready", model_ready, methods=["GET"]),
                Route(prefix + "/config", model_config, methods=["GET"]),
                Route(prefix + "/stats", model_statistics, methods=["GET"]),
            )
        ],
    ]


def _health(ok: bool, reason: str) -> Response:
    """KServe answers health and readiness by status: 200 yes, 400 no (as Triton)."""
    return Response(status_code=200) if ok else JSONResponse(error_body(reason), status_code=400)


def _repository_parameters(body: bytes, allowed: set[str]) -> dict[str, Any]:
    document = jsonio.loads_object(body, empty_ok=True)
    _check_fields(document, frozenset({"parameters"}), "repository request")
    parameters = _typed(document, "parameters", dict, "repository request", {})
    unknown = sorted(set(parameters) - allowed)
    if unknown:
        raise InferError.invalid(
            f"unsupported repository parameter(s) {', '.join(map(repr, unknown))}; "
            f"supported: {', '.join(sorted(allowed))}"
        )
    return parameters
