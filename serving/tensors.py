"""KServe v2 tensors: datatypes, raw (binary) encoding and decoding, validation."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from serving.errors import InvalidInput

NUMPY_TYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # numeric array, or an object array of bytes for BYTES
    parameters: dict = field(default_factory=dict)


def check_shape(name: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Decode the binary representation of a tensor."""
    if datatype == "BYTES":
        return deserialize_bytes(name, raw, shape)
    if datatype not in NUMPY_TYPES:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r}")
    dtype = np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes of data for shape {list(shape)} {datatype} "
                           f"({expected} bytes expected)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_list(name: str, datatype: str, shape: tuple[int, ...], data) -> np.ndarray:
    """Decode JSON `data` (flat or nested lists) into an array of `shape`."""
    if datatype == "BYTES":
        array = np.array([item.encode() if isinstance(item, str) else item for item in _flatten(data)], dtype=object)
    elif datatype in NUMPY_TYPES:
        try:
            array = np.asarray(data, dtype=NUMPY_TYPES[datatype])
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput(f"input {name!r}: data is not a list of {datatype} values") from None
    else:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r}")
    expected = int(np.prod(shape, dtype=np.int64))
    if array.size != expected:
        raise InvalidInput(f"input {name!r}: {array.size} values for shape {list(shape)} ({expected} expected)")
    return array.reshape(shape)


def _flatten(data):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).tobytes()


def serialize_bytes(array: np.ndarray) -> bytes:
    """Triton's BYTES layout: each element as a 4-byte little-endian length + its bytes."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw) or len(items) != int(np.prod(shape, dtype=np.int64)):
        raise InvalidInput(f"input {name!r}: BYTES data does not match shape {list(shape)}")
    return np.array(items, dtype=object).reshape(shape)
