"""msgpack codec that carries numpy arrays as raw bytes with dtype and shape.

A 4,096-token response as a list of floats costs ~9 bytes per value in msgpack and a Python
float object per value on each side; as raw little-endian bytes it costs 4 bytes and one copy.
Only the numeric dtypes of `checkpoint_transport.dtypes` are accepted on decode: nothing from
the network is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from checkpoint_transport.dtypes import NUMPY_DTYPES
from model_engine_server.errors import InvalidRequest

ARRAY_EXT_CODE = 1
MAX_ARRAY_DIMS = 8


def _encode_array(array: np.ndarray) -> msgpack.ExtType:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    dtype = array.dtype.str
    if dtype not in NUMPY_DTYPES:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}")
    header = msgpack.packb([dtype, list(array.shape)])
    return msgpack.ExtType(ARRAY_EXT_CODE, header + array.tobytes())


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "numpy") and hasattr(value, "dtype"):  # torch.Tensor, without importing torch
        return _encode_array(value.detach().cpu().numpy())
    raise TypeError(f"cannot encode {type(value).__name__} in msgpack")


def _decode_array(data: bytes) -> np.ndarray:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    header = next(unpacker)
    offset = unpacker.tell()
    if not (isinstance(header, list) and len(header) == 2 and isinstance(header[1], list)):
        raise ValueError("array header must be [dtype, shape]")
    dtype, shape = header
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"array dtype {dtype!r} is not allowed")
    if len(shape) > MAX_ARRAY_DIMS or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        raise ValueError(f"bad array shape {shape!r}")
    payload = memoryview(data)[offset:]
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(payload) != expected:
        raise ValueError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(payload)}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == ARRAY_EXT_CODE:
        return _decode_array(data)
    raise ValueError(f"unknown msgpack extension type {code}")


def encode(obj: Any) -> bytes:
    """Pack a tree of dicts/lists/scalars/arrays; arrays become raw-byte extension values."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes, max_bytes: int | None = None) -> Any:
    """Unpack what `encode` produced; malformed input raises `InvalidRequest` naming the problem."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest(f"body of {len(data)} bytes exceeds the limit of {max_bytes}", "body")
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise InvalidRequest(f"malformed msgpack: {error}", "body") from None
    except Exception as error:  # msgpack raises a few internal types on truncated input
        raise InvalidRequest(f"malformed msgpack: {type(error).__name__}: {error}", "body") from None
