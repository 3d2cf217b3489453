"""The one table of tensor dtypes that cross a boundary, and their names on each side.

A tensor's dtype travels as a name: torch's own (`"bfloat16"`) in bucket headers, HTTP weight
bodies and configs; safetensors' (`"BF16"`) in checkpoint headers; numpy's type string
(`"<f4"`) for arrays in msgpack bodies (`model_engine_server.codec`). Every name is decoded
through this table only, so a name from the network or a file never reaches `getattr(torch, ...)`.

Lives in `checkpoint_transport` (which imports nothing of the server) so that the transport,
the engines, the HTTP wire and the checkpoint reader all share it.
"""

from __future__ import annotations

import torch

# torch name, safetensors name, numpy type string (None: numpy has no such dtype)
_TABLE: tuple[tuple[str, str, str | None], ...] = (
    ("float64", "F64", "<f8"),
    ("float32", "F32", "<f4"),
    ("float16", "F16", "<f2"),
    ("bfloat16", "BF16", "<V2"),  # numpy has none: 2-byte raw values, as bf16 numpy extensions write them
    ("float8_e4m3fn", "F8_E4M3", None),
    ("float8_e5m2", "F8_E5M2", None),
    ("int64", "I64", "<i8"),
    ("int32", "I32", "<i4"),
    ("int16", "I16", "<i2"),
    ("int8", "I8", "|i1"),
    ("uint64", "U64", "<u8"),
    ("uint32", "U32", "<u4"),
    ("uint16", "U16", "<u2"),
    ("uint8", "U8", "|u1"),
    ("bool", "BOOL", "|b1"),
)
_ROWS = [(getattr(torch, name), name, safetensors, numpy) for name, safetensors, numpy in _TABLE]

DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name, _, _ in _ROWS}
"""By torch name: what buckets, HTTP weight bodies and configs may name."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, _, code, _ in _ROWS}
"""By safetensors header name (`"BF16"`)."""

NUMPY_DTYPES: frozenset[str] = frozenset(numpy for _, _, _, numpy in _ROWS if numpy is not None)
"""Numpy type strings (`np.dtype.str`) an array in a msgpack body may have."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The torch name a tensor of `dtype` travels under; `TypeError` for one that cannot travel."""
    if dtype not in _NAMES:
        raise TypeError(f"dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}")
    return _NAMES[dtype]

