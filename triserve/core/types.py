"""The one internal request and response type.

Every frontend (KServe HTTP, gRPC, OpenAI, the seed's JSON predict, ChatGLM's
api.py) decodes its wire format into :class:`InferRequest`, and encodes
:class:`InferResponse` back. Tensors carry numpy arrays; BYTES tensors are
object arrays of ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from triserve.core import datatypes
from triserve.core.errors import InferError


@dataclass(slots=True)
class InferTensor:
    name: str
    datatype: str  # KServe v2 name: "FP32", "BYTES", ...
    shape: list[int]
    data: np.ndarray  # shaped as ``shape``; BYTES: object array of bytes
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray, datatype: str | None = None) -> "InferTensor":
        """Wrap a numpy array; str elements of a BYTES tensor become UTF-8 bytes."""
        array = np.asarray(array)
        datatype = datatype or datatypes.kserve_datatype(array.dtype)
        if datatype == "BYTES":
            array = datatypes.as_bytes_array(array)
        else:
            array = array.astype(datatypes.numpy_dtype(datatype), copy=False)
        return cls(name, datatype, list(array.shape), array)

    @classmethod
    def from_flat(
        cls, name: str, datatype: str, shape: Sequence[int], values: Any, max_elements: int | None = None
    ) -> "InferTensor":
        """Build a tensor from flat values as JSON and gRPC ``contents`` carry them.

        One ``-1`` in ``shape`` is inferred from the element count (the seed's
        client sends ``history`` with shape ``[-1]``). A count that does not
        match the shape is an error that names the input. With ``max_elements``, a
        shape or a value count past it is refused before any array is built.
        """
        if datatype not in datatypes.KSERVE_TO_NUMPY:
            raise InferError.invalid(
                f"input '{name}' has unknown datatype '{datatype}'; expected one of "
                + ", ".join(datatypes.KSERVE_TO_NUMPY)
            )
        if max_elements is not None:
            check_element_limit(name, shape, max_elements)
            if len(values) > max_elements:
                raise too_many_elements(name, max_elements, len(values))
        if datatype == "BYTES":
            flat = np.empty(len(values), dtype=np.object_)
            flat[:] = list(values)
            flat = datatypes.as_bytes_array(flat)
        else:
            try:
                flat = np.asarray(values, dtype=datatypes.numpy_dtype(datatype)).reshape(-1)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InferError.invalid(
                    f"input '{name}': data cannot be read as {datatype}: {exc}"
                ) from None
        shape = resolve_shape(name, shape, flat.size)
        return cls(name, datatype, shape, flat.reshape(shape))

    @classmethod
    def from_raw(cls, name: str, datatype: str, shape: Sequence[int], raw: bytes,
                 max_elements: int | None = None) -> "InferTensor":
        """Build a tensor from its binary wire form (HTTP binary extension, gRPC raw contents);
        with ``max_elements``, BYTES elements past it are refused before they are built."""
        if datatype not in datatypes.KSERVE_TO_NUMPY:
            raise InferError.invalid(f"input '{name}' has unknown datatype '{datatype}'")
        if max_elements is not None:
            check_element_limit(name, shape, max_elements)
        try:
            flat = datatypes.from_raw(raw, datatype, max_elements)
        except datatypes.TooManyElements:
            raise too_many_elements(name, max_elements) from None
        except ValueError as exc:
            raise InferError.invalid(f"input '{name}': {exc}") from None
        shape = resolve_shape(name, shape, flat.size)
        return cls(name, datatype, shape, flat.reshape(shape))

    def raw(self) -> bytes:
        return datatypes.to_raw(self.data, self.datatype)


def too_many_elements(name: str, limit: int, count: int | None = None) -> InferError:
    """The error for a tensor past the element limit (``count`` when it is known)."""
    has = f"{count} elements, over" if count is not None else "more elements than"
    return InferError.invalid(f"input '{name}' has {has} the limit of {limit} elements per tensor "
                              "(--max-tensor-elements)")


def check_element_limit(name: str, shape: Sequence[Any], limit: int) -> None:
    """Refuse a declared shape of more than ``limit`` elements (a ``-1`` counts as 1),
    before any data is decoded for it."""
    count = 1
    for d in shape:
        if isinstance(d, int) and d > 0:
            count *= d
            if count > limit:
                known = all(isinstance(x, int) and x >= 0 for x in shape) and count < limit * limit
                raise too_many_elements(name, limit, datatypes.element_count(shape) if known else None)


def resolve_shape(name: str, shape: Sequence[int], count: int) -> list[int]:
    """Check ``shape`` against an element count, inferring a single ``-1``.

    One pass over the dimensions: this runs for every input of every request.
    """
    shape = [int(d) for d in shape]
    known = 1
    wildcard = -1
    for index, d in enumerate(shape):
        if d >= 0:
            known *= d
        elif d == -1 and wildcard < 0:
            wildcard = index
        else:
            raise InferError.invalid(f"input '{name}' has invalid shape {shape}")
    if wildcard >= 0:
        if known == 0 or count % known:
            raise InferError.invalid(
                f"input '{name}': cannot infer the -1 dimension of shape {shape} from {count} elements"
            )
        shape[wildcard] = count // known
    elif known != count:
        raise InferError.invalid(
            f"input '{name}' has shape {shape} ({known} elements) but {count} elements of data were given"
        )
    return shape


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)  # e.g. binary_data


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""  # "" means: as the model's version policy chooses (latest)
    id: str = ""
    inputs: list[InferTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: all outputs
    parameters: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> InferTensor | None:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        return None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str = ""
    outputs: list[InferTensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    final: bool = True  # the last response for its request (decoupled models send many)
    error: InferError | None = None  # a failed response in a stream; unary calls raise instead

    def output(self, name: str) -> InferTensor | None:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        return None
