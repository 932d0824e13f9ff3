"""Requests checked against a model's config before they are queued.

A request that does not fit the model never reaches the backend: the client
gets an INVALID_ARGUMENT error that names the input and what was expected,
worded like Triton's own messages so existing clients and docs still match.
The per-model facts are computed once when the model loads
(:class:`RequestValidator`); checking a request is a few dict lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2

from triserve.core import datatypes
from triserve.core.errors import InferError
from triserve.core.types import InferRequest


@dataclass(frozen=True, slots=True)
class _InputSpec:
    datatype: str
    shapes: tuple[tuple[int, ...], ...]  # dims, and the reshape if the config has one
    optional: bool


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _matches(expected: tuple[int, ...], shape: list[int]) -> bool:
    """Does ``shape`` fit ``expected`` (-1: any size)? A plain loop: it runs per input per request."""
    if len(expected) != len(shape):
        return False
    for wanted, size in zip(expected, shape):
        if wanted != size and wanted != -1:
            return False
    return True


class RequestValidator:
    """Checks requests for one model config; :meth:`validate` returns the batch size."""

    def __init__(self, config: model_config_pb2.ModelConfig, numeric_for_string_inputs: bool = False):
        self.model_name = config.name
        self.max_batch_size = config.max_batch_size
        self._numeric_for_string_inputs = numeric_for_string_inputs
        self._inputs: dict[str, _InputSpec] = {}
        for tensor in config.input:
            shapes = [tuple(tensor.dims)]
            if tensor.HasField("reshape"):
                shapes.append(tuple(tensor.reshape.shape))
            self._inputs[tensor.name] = _InputSpec(
                datatypes.CONFIG_TO_KSERVE[model_config_pb2.DataType.Name(tensor.data_type)],
                tuple(shapes),
                tensor.optional,
            )
        self._required = [name for name, spec in self._inputs.items() if not spec.optional]
        self._outputs = frozenset(tensor.name for tensor in config.output)

    def validate(self, request: InferRequest) -> int:
        """The request's batch size (1 without batching); INVALID_ARGUMENT if it does not fit."""
        given = [tensor.name for tensor in request.inputs]
        if len(set(given)) != len(given):
            repeated = sorted({name for name in given if given.count(name) > 1})
            raise InferError.invalid(
                f"input(s) {_names(repeated)} given more than once for model '{self.model_name}'"
            )
        missing = [name for name in self._required if name not in given]
        if missing:
            raise InferError.invalid(
                f"{self._expected_count()} but got {len(given)} inputs for model "
                f"'{self.model_name}'. Got input(s) {_names(given)}, but missing required "
                f"input(s) {_names(missing)}. Please provide all required input(s)."
            )
        batch_size = 0
        for tensor in request.inputs:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise InferError.invalid(
                    f"unexpected inference input '{tensor.name}' for model '{self.model_name}'"
                    f"; the model's inputs are {_names(self._inputs)}"
                )
            if tensor.datatype != spec.datatype and not (
                self._numeric_for_string_inputs and spec.datatype == "BYTES"
            ):
                raise InferError.invalid(
                    f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                    f"'{self.model_name}' expects '{spec.datatype}'"
                )
            shape = tensor.shape
            if self.max_batch_size > 0:
                if not shape:
                    raise InferError.invalid(
                        f"input '{tensor.name}' has no batch dimension, but model "
                        f"'{self.model_name}' has max_batch_size {self.max_batch_size}: "
                        f"give its shape as [batch] + {_shape_text(spec.shapes[0])}"
                    )
                if batch_size and shape[0] != batch_size:
                    raise InferError.invalid(
                        f"input '{tensor.name}' has batch size {shape[0]} but an earlier input has "
                        f"{batch_size}; all inputs of a request to '{self.model_name}' share one batch size"
                    )
                batch_size = shape[0]
                if not 0 < batch_size <= self.max_batch_size:
                    raise InferError.invalid(
                        f"inference request batch-size must be <= {self.max_batch_size} for "
                        f"'{self.model_name}'"
                        + ("" if batch_size else f"; input '{tensor.name}' has batch size 0")
                    )
                shape = shape[1:]
            for expected in spec.shapes:
                if _matches(expected, shape):
                    break
            else:
                batch_dim = [-1] if self.max_batch_size > 0 else []
                raise InferError.invalid(
                    f"unexpected shape for input '{tensor.name}' for model '{self.model_name}'. "
                    f"Expected {_shape_text(batch_dim + list(spec.shapes[0]))}, "
                    f"got {_shape_text(tensor.shape)}"
                )
        for output in request.outputs:
            if output.name not in self._outputs:
                raise InferError.invalid(
                    f"unexpected inference output '{output.name}' for model '{self.model_name}'"
                    f"; the model's outputs are {_names(sorted(self._outputs))}"
                )
        return batch_size or 1

    def _expected_count(self) -> str:
        if len(self._required) == len(self._inputs):
            return f"expected {len(self._inputs)} inputs"
        return f"expected number of inputs between {len(self._required)} and {len(self._inputs)}"


def _names(names) -> str:
    """A list of names as Triton prints it: ``['a','b']``."""
    return "[" + ",".join(f"'{name}'" for name in names) + "]"
