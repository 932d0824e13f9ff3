"""Tensor datatypes: KServe v2 names, config ``TYPE_*`` names, numpy dtypes, and
the length-prefixed encoding of BYTES tensors.

This module imports nothing but numpy and the standard library on purpose: the
Python-backend stub loads it by file path inside a model's own environment, so
``triton_python_backend_utils`` and the server share one implementation.
"""

from __future__ import annotations

import struct
from itertools import repeat
from typing import Iterable

import numpy as np

# KServe v2 datatype -> numpy dtype.
KSERVE_TO_NUMPY: dict[str, type] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

NUMPY_TO_KSERVE: dict[np.dtype, str] = {
    np.dtype(t): name for name, t in KSERVE_TO_NUMPY.items() if name != "BYTES"
}

# model_config DataType name (as text format / JSON shows it) <-> KServe datatype.
CONFIG_TO_KSERVE: dict[str, str] = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
KSERVE_TO_CONFIG: dict[str, str] = {v: k for k, v in CONFIG_TO_KSERVE.items()}

# Size in bytes of one element, for raw (binary) tensor payloads.
ELEMENT_SIZE: dict[str, int] = {
    name: np.dtype(t).itemsize for name, t in KSERVE_TO_NUMPY.items() if name != "BYTES"
}


def numpy_dtype(datatype: str) -> type:
    """numpy dtype for a KServe datatype; ``KeyError`` for an unknown one."""
    return KSERVE_TO_NUMPY[datatype]


def kserve_datatype(dtype: np.dtype) -> str:
    """KServe datatype for a numpy dtype; strings and objects are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_KSERVE[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype") from None


def element_count(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_U32 = struct.Struct("<I")  # a BYTES element's length prefix


def _all_bytes(items: Iterable[object]) -> bool:
    return all(map(isinstance, items, repeat(bytes)))  # C-level: this runs for every BYTES tensor


def as_bytes_array(array: np.ndarray) -> np.ndarray:
    """A BYTES tensor as an object array of ``bytes``; ``str`` elements are UTF-8 encoded.

    Models often build string outputs from Python ``str`` (the seed's model.py does);
    they go on the wire as UTF-8.
    """
    array = np.asarray(array)
    if array.dtype == np.object_ and _all_bytes(array.flat):
        return array
    out = np.empty(array.size, dtype=np.object_)
    out[:] = [bytes(item) if isinstance(item, (bytes, bytearray)) else str(item).encode("utf-8")
              for item in array.flat]
    return out.reshape(array.shape)


def pack_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    items = np.asarray(array).ravel().tolist()
    if not _all_bytes(items):
        items = as_bytes_array(array).ravel().tolist()
    if len(items) == 1:
        return _U32.pack(len(items[0])) + items[0]
    parts = []
    for item in items:
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


class TooManyElements(ValueError):
    """The data holds more elements than the caller allows (raised before they are all built)."""


def unpack_bytes(buffer: bytes, max_items: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_bytes`: a 1-D object array of ``bytes``.

    Raises ``ValueError`` when the buffer is not a sequence of length-prefixed elements,
    and :class:`TooManyElements` as soon as it holds more than ``max_items`` elements.
    """
    if type(buffer) is not bytes:
        buffer = memoryview(buffer)  # slices of it are copied out as bytes below
    end = len(buffer)
    if end >= 4 and _U32.unpack_from(buffer)[0] == end - 4 and max_items != 0:  # one element: most prompts
        out = np.empty(1, dtype=np.object_)
        out[0] = bytes(buffer[4:])
        return out
    if max_items is not None and end // 4 <= max_items:
        max_items = None  # every element takes at least its 4-byte prefix: the cap cannot be reached
    unpack_from = _U32.unpack_from
    items = []
    offset = 0
    while offset < end:
        if max_items is not None and len(items) >= max_items:
            raise TooManyElements(f"more than {max_items} elements")
        if offset + 4 > end:
            raise ValueError("BYTES tensor data ends inside a 4-byte length prefix")
        (length,) = unpack_from(buffer, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise ValueError(
                f"BYTES tensor element of length {length} runs past the end of the data"
            )
        items.append(buffer[offset:stop])
        offset = stop
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items if type(buffer) is bytes else [bytes(item) for item in items]
    return out


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """The raw (binary) wire form of a tensor."""
    if datatype == "BYTES":
        return pack_bytes(array)
    return np.ascontiguousarray(array, dtype=KSERVE_TO_NUMPY[datatype]).tobytes()


def from_raw(raw: bytes, datatype: str, max_items: int | None = None) -> np.ndarray:
    """A flat numpy array from the raw wire form; ``ValueError`` if the size is off,
    :class:`TooManyElements` past ``max_items`` elements."""
    if datatype == "BYTES":
        return unpack_bytes(raw, max_items)
    size = ELEMENT_SIZE[datatype]
    if len(raw) % size:
        raise ValueError(
            f"raw data of {len(raw)} bytes is not a whole number of {datatype} elements ({size} bytes each)"
        )
    if max_items is not None and len(raw) // size > max_items:
        raise TooManyElements(f"{len(raw) // size} elements, more than {max_items}")
    return np.frombuffer(raw, dtype=KSERVE_TO_NUMPY[datatype])
