"""Triton's binary tensor data extension for KServe v2 HTTP.

A request or response body may be a JSON header followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header says where the JSON ends, and each
binary tensor's ``binary_data_size`` parameter says how many of the following
bytes are its own, in the order the tensors appear in the JSON.
"""

from __future__ import annotations

from typing import Any

from triserve.core.errors import InferError
from triserve.frontends.http import jsonio

HEADER = "Inference-Header-Content-Length"
SIZE_PARAMETER = "binary_data_size"


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, "BinaryReader"]:
    """Split a request body into its JSON part and a reader for the binary part after it."""
    view = memoryview(body)
    if header_length is None:
        return view, BinaryReader(view[len(view):])
    try:
        length = int(header_length)
    except ValueError:
        raise InferError.invalid(f"{HEADER} header must be an integer, not '{header_length}'") from None
    if not 0 <= length <= len(view):
        raise InferError.invalid(
            f"{HEADER} header is {length} but the request body has only {len(view)} bytes"
        )
    return view[:length], BinaryReader(view[length:])


class BinaryReader:
    """Hands out consecutive slices of the binary part to the inputs that declare a size."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: memoryview):
        self._data = data
        self._offset = 0

    def take(self, name: str, size: Any) -> bytes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InferError.invalid(
                f"input '{name}': parameter {SIZE_PARAMETER} must be a non-negative integer, not {size!r}"
            )
        end = self._offset + size
        if end > len(self._data):
            raise InferError.invalid(
                f"input '{name}' has {SIZE_PARAMETER} {size} but only {len(self._data) - self._offset} "
                f"bytes of binary data are left in the request body"
            )
        chunk = self._data[self._offset:end].tobytes()
        self._offset = end
        return chunk

    def check_consumed(self) -> None:
        """Bytes no input claimed mean the sizes and the data disagree: refuse, don't drop them."""
        left = len(self._data) - self._offset
        if left:
            raise InferError.invalid(
                f"the request body has {left} bytes of binary data after the inputs' {SIZE_PARAMETER} "
                "values are accounted for"
            )


def encode_body(document: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The response body (JSON, then the binary chunks) and the headers that describe it."""
    header = jsonio.dumps(document)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        HEADER: str(len(header)),
    }
