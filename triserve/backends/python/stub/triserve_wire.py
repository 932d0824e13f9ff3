"""How a tensor crosses the instance-process wire, for both sides of it.

Numeric numpy arrays travel as they are; object arrays (BYTES tensors) travel as
``(shape, flat list of their items)``: pickling a list of ``bytes`` costs a fraction of
numpy's object-array reduce, on both sides. This module needs numpy only, so the model
process (``runner.py``, which cannot import triserve) imports it from its own folder and
the server (``ipc.py``) from the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np


# A request the model process refuses before its execute, because it waited there behind
# another batch (ipc.to_error gives the core's own errors for these codes):
CANCELLED_WHILE_QUEUED = "cancelled-while-queued"  # its client cancelled it meanwhile
QUEUE_TIMEOUT_EXPIRED = "queue-timeout-expired"  # its queue timeout passed meanwhile


def pack_array(array: np.ndarray) -> Any:
    """A tensor's wire form: an object array as ``(shape, items)``, any other array as it is."""
    if array.dtype.hasobject:
        return tuple(array.shape), array.ravel().tolist()
    return array


def unpack_array(data: Any) -> np.ndarray:
    """Inverse of :func:`pack_array`."""
    if type(data) is not tuple:
        return data
    shape, items = data
    array = np.empty(len(items), dtype=np.object_)
    try:
        array[:] = items
    except ValueError:  # items that numpy would read as sequences: placed one by one
        for index, item in enumerate(items):
            array[index] = item
    return array.reshape(shape)
