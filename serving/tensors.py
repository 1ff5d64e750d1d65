"""KServe v2 tensors: raw (binary) and JSON decoding with validation, raw encoding.

Datatype names and the BYTES layout (each element as a 4-byte little-endian
length and its bytes) are tritonclient's (`tritonclient.utils`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from serving.errors import InvalidInput


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # numeric array, or an object array of bytes for BYTES
    parameters: dict = field(default_factory=dict)


MAX_DIMENSIONS = 16
MAX_ELEMENTS = 1 << 40  # far above any body's worth of data, far below what overflows int64


def check_shape(name: str, shape) -> tuple[int, ...]:
    """A tensor's shape: a list of at most MAX_DIMENSIONS non-negative integers (not booleans) whose
    product, counting zeros as ones, stays within MAX_ELEMENTS, so no size computation can overflow."""
    elements = 1  # (one loop, no generators: this runs for every tensor of every request)
    if isinstance(shape, (list, tuple)) and len(shape) <= MAX_DIMENSIONS:
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                break
            if d > 1:
                elements *= d
        else:
            if elements > MAX_ELEMENTS:
                raise InvalidInput(f"input {name!r}: shape {list(shape)} has more than {MAX_ELEMENTS} elements")
            return tuple(shape)
    raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_DIMENSIONS} non-negative "
                       f"integers, got {_short(shape)}")


def _short(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters (a message never echoes a whole hostile value)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


_LITTLE_ENDIAN: dict[str, np.dtype] = {}  # datatype -> little-endian numpy type, filled on first use


def numeric_dtype(name: str, datatype: str) -> np.dtype:
    """The numpy type of input `name`'s numeric KServe `datatype`."""
    dtype = triton_to_np_dtype(datatype) if datatype != "BYTES" else None
    if dtype is None:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r}")
    return np.dtype(dtype)


def _little_endian(name: str, datatype: str) -> np.dtype:
    dtype = _LITTLE_ENDIAN.get(datatype)
    if dtype is None:
        dtype = _LITTLE_ENDIAN[datatype] = numeric_dtype(name, datatype).newbyteorder("<")
    return dtype


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Decode the binary representation of a tensor."""
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, shape)
    dtype = _little_endian(name, datatype)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes of data for shape {list(shape)} {datatype} "
                           f"({expected} bytes expected)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_list(name: str, datatype: str, shape: tuple[int, ...], data) -> np.ndarray:
    """Decode JSON `data` (flat or nested lists) into an array of `shape`."""
    if datatype == "BYTES":
        array = np.array([item.encode() if isinstance(item, str) else item for item in _flatten(data)], dtype=object)
    else:
        dtype = numeric_dtype(name, datatype)
        try:
            array = np.asarray(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise InvalidInput(f"input {name!r}: data is not a list of {datatype} values") from None
    expected = int(np.prod(shape, dtype=np.int64))
    if array.size != expected:
        raise InvalidInput(f"input {name!r}: {array.size} values for shape {list(shape)} ({expected} expected)")
    return array.reshape(shape)


def _flatten(data):
    """The leaves of nested lists, depth first, without recursion (a hostile body may nest deeply)."""
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_DIMENSIONS:
                    raise InvalidInput("data is nested deeper than any tensor's shape")
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    """The binary representation of an output tensor (BYTES: an object array of bytes or str)."""
    if datatype == "BYTES":
        return serialize_byte_tensor(np.asarray(array, dtype=object)).item() if array.size else b""
    return np.ascontiguousarray(array, dtype=_little_endian("output", datatype)).tobytes()


def deserialize_bytes(name: str, raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    try:
        items = deserialize_bytes_tensor(raw)
    except struct.error:  # a length prefix or an element runs past the end
        raise InvalidInput(f"input {name!r}: truncated BYTES element") from None
    if items.size != int(np.prod(shape, dtype=np.int64)):
        raise InvalidInput(f"input {name!r}: BYTES data does not match shape {list(shape)}")
    return items.reshape(shape)
