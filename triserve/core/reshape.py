"""A config's ``reshape``: the model sees inputs, and clients see outputs, in another shape.

As in Triton, a client sends an input in its ``dims`` and the model receives it in
``reshape.shape``; the model produces an output in ``reshape.shape`` and the client
receives it in ``dims``. With ``max_batch_size`` > 0 the batch dimension stays in
front, untouched. A ``-1`` in the target shape takes the size of the matching
``-1`` of the source shape (in order), or, if they do not pair up, whatever the
element count leaves. Arrays are reshaped as views: no data is copied.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2

from triserve.core import datatypes
from triserve.core.errors import InferError
from triserve.core.types import InferRequest, InferResponse, InferTensor


class Reshape:
    """The reshapes of one config; ``inputs`` / ``outputs`` are empty when there are none."""

    def __init__(self, config: model_config_pb2.ModelConfig):
        self._batched = config.max_batch_size > 0
        # name -> (shape the client uses, shape the model uses)
        self.inputs = {tensor.name: (tuple(tensor.dims), tuple(tensor.reshape.shape))
                       for tensor in config.input if tensor.HasField("reshape")}
        self.outputs = {tensor.name: (tuple(tensor.reshape.shape), tuple(tensor.dims))
                        for tensor in config.output if tensor.HasField("reshape")}

    def reshape_inputs(self, request: InferRequest) -> None:
        """The request's inputs as the model expects them (after validation against ``dims``)."""
        for tensor in request.inputs:
            shapes = self.inputs.get(tensor.name)
            if shapes is not None:
                self._apply(tensor, *shapes, "input")

    def reshape_outputs(self, response: InferResponse) -> None:
        """The model's outputs in the shape the config's ``dims`` promise the client."""
        for tensor in response.outputs:
            shapes = self.outputs.get(tensor.name)
            if shapes is not None:
                self._apply(tensor, *shapes, "output")

    def _apply(self, tensor: InferTensor, source: tuple[int, ...], target: tuple[int, ...],
               kind: str) -> None:
        shape = list(tensor.shape)
        batch = shape[:1] if self._batched else []
        body = shape[1:] if self._batched else shape
        new = batch + _target_shape(source, target, body)
        if datatypes.element_count(new) != tensor.data.size:
            error = InferError.invalid if kind == "input" else InferError.internal
            raise error(f"{kind} '{tensor.name}' of shape {shape} cannot be reshaped to {new}")
        tensor.data = tensor.data.reshape(new)
        tensor.shape = new


def _target_shape(source: tuple[int, ...], target: tuple[int, ...], actual: list[int]) -> list[int]:
    """``target`` with its -1s filled from the sizes ``actual`` has where ``source`` has -1."""
    variable = [size for wanted, size in zip(source, actual) if wanted == -1]
    wildcards = [i for i, d in enumerate(target) if d == -1]
    new = list(target)
    if len(variable) == len(wildcards) and len(source) == len(actual):
        for index, size in zip(wildcards, variable):
            new[index] = size
        return new
    if len(wildcards) == 1:
        known = datatypes.element_count(d for d in target if d != -1)
        total = datatypes.element_count(actual)
        new[wildcards[0]] = total // known if known else 0
    return new
