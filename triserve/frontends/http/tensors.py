"""Tensors as JSON values, both ways.

Two JSON spellings of a tensor reach the HTTP frontend:

- KServe v2 ``data``: a flat or nested list of elements of the stated datatype;
- plain values (generate extension, ChatGLM's api.py): a scalar or a list, whose
  datatype comes from the model's metadata, so ``0.7`` becomes ``"0.7"`` for a
  ``TYPE_STRING`` input and ``0.7`` for an FP32 one.

Elements must already have the right JSON type (numbers for numeric tensors,
booleans for BOOL, strings for BYTES): a value numpy would coerce (``1.5`` into
an INT32, ``"3"`` into an FP32) is refused with the input's name, never changed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from triserve.core import datatypes
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferTensor, check_element_limit, too_many_elements

# numpy kinds (of ``np.asarray(json_list)``) each datatype accepts from JSON.
_JSON_KINDS: dict[str, str] = {"BOOL": "b", "BYTES": "U"}
_JSON_KINDS.update({name: "iu" for name in ("INT8", "INT16", "INT32", "INT64")})
_JSON_KINDS.update({name: "iu" for name in ("UINT8", "UINT16", "UINT32", "UINT64")})
_JSON_KINDS.update({name: "iuf" for name in ("FP16", "FP32", "FP64")})
_KIND_NAMES = {"b": "booleans", "U": "strings", "iu": "integers", "iuf": "numbers"}
_KIND_FOUND = {"b": "booleans", "U": "strings", "i": "integers", "u": "integers", "f": "non-integer numbers"}


def tensor_from_json(name: str, datatype: str, shape: Sequence[int], data: Any,
                     max_elements: int | None = None) -> InferTensor:
    """A KServe v2 JSON input tensor (``data`` flat or nested; one ``-1`` in ``shape`` inferred).

    With ``max_elements``, a larger shape or data is refused before the array is built."""
    if datatype not in _JSON_KINDS:
        raise InferError.invalid(
            f"input '{name}' has unknown datatype '{datatype}'; expected one of " + ", ".join(_JSON_KINDS)
        )
    if max_elements is not None:
        check_element_limit(name, shape, max_elements)
        if isinstance(data, list) and len(data) > max_elements:
            raise too_many_elements(name, max_elements, len(data))
    if datatype == "BYTES" and _is_flat_text(data):
        # The usual BYTES input (a prompt, a chat field): encoded as it is, with no numpy
        # string array in between, which costs more than the rest of decoding.
        return InferTensor.from_flat(name, datatype, shape, [item.encode("utf-8") for item in data])
    return InferTensor.from_flat(name, datatype, shape, _json_array(name, datatype, data).reshape(-1),
                                 max_elements)


def tensor_from_value(name: str, datatype: str, value: Any, rank: int,
                      max_elements: int | None = None) -> InferTensor:
    """A tensor from a plain JSON value, converted to the ``datatype`` the model declares.

    A scalar is one element; a (nested) list keeps its shape, left-padded with 1s up to
    the declared ``rank`` (so a batched model receives a batch of one).
    """
    if max_elements is not None and isinstance(value, list) and len(value) > max_elements:
        raise too_many_elements(name, max_elements, len(value))
    if datatype == "BYTES":
        value = _as_text(value)
    array = _json_array(name, datatype, value)
    shape = [1] * max(rank - array.ndim, 1 if array.ndim == 0 else 0) + list(array.shape)
    return InferTensor.from_flat(name, datatype, shape, array.reshape(-1), max_elements)


def is_text(tensor: InferTensor) -> bool:
    """Whether a BYTES tensor is all valid UTF-8 (so it can be JSON strings)."""
    try:
        for item in tensor.data.flat:
            item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def json_data(tensor: InferTensor) -> list[Any]:
    """The flat KServe ``data`` list of a tensor; BYTES elements as UTF-8 strings."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype != "BYTES":
        return flat.tolist()
    try:
        return [item.decode("utf-8") for item in flat]
    except UnicodeDecodeError:
        raise InferError(
            ErrorCode.UNSUPPORTED,
            f"output '{tensor.name}' is not UTF-8 text, so it cannot be a JSON string; "
            "request it as binary data from the /infer endpoint",
        ) from None


def json_value(tensor: InferTensor) -> Any:
    """A tensor as a plain JSON value: its only element, or the flat list of elements."""
    data = json_data(tensor)
    return data[0] if len(data) == 1 else data


def _json_array(name: str, datatype: str, data: Any) -> np.ndarray:
    """``data`` as a numpy array of ``datatype``, refusing elements of the wrong JSON type."""
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InferError.invalid(f"input '{name}': data is not a regular (rectangular) array: {exc}") from None
    kinds = _JSON_KINDS[datatype]
    found = array.dtype.kind
    if kinds == "iu" and found in "fO" and _all_ints(array := np.asarray(data, dtype=np.object_)):
        found = "i"  # UINT64 values past INT64 made numpy pick floats (or objects) for the mix
    if array.size and found not in kinds:
        raise InferError.invalid(
            f"input '{name}' has datatype {datatype}, so its data must be {_KIND_NAMES[kinds]}; "
            f"got {_KIND_FOUND.get(found, 'mixed or nested non-list values')}"
        )
    if datatype == "BYTES":
        return array.astype(np.object_)
    dtype = np.dtype(datatypes.numpy_dtype(datatype))
    if dtype.kind in "iu" and array.size:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise InferError.invalid(
                f"input '{name}': a value is out of the {datatype} range [{limits.min}, {limits.max}]"
            )
    return array.astype(dtype)


def _is_flat_text(data: Any) -> bool:
    return type(data) is list and all(type(item) is str for item in data)


def _all_ints(array: np.ndarray) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in array.flat)


def _as_text(value: Any) -> Any:
    """Numbers and booleans for a BYTES input become the text a Python model would parse."""
    if isinstance(value, list):
        return [_as_text(item) for item in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value

