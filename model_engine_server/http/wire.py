"""Bodies on the HTTP wire: JSON or msgpack for scoring calls, msgpack for weights.

Shared by the FastAPI app and the HTTP clients, so it imports neither FastAPI nor httpx.
Nothing here ever unpickles: msgpack carries plain values and raw-byte arrays
(`model_engine_server.codec`), and weights travel as (name, dtype, shape, raw bytes) with the
dtype checked against the one dtype table (`checkpoint_transport.dtypes`). A request's outcome
is `protocol.outcome_to_wire`, the same on HTTP and on the Ray handle.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from typing import Any, Iterable

import numpy as np
import torch

from checkpoint_transport.dtypes import DTYPES, dtype_name
from model_engine_server import codec
from model_engine_server.errors import InvalidRequest, ModelEngineError
from model_engine_server.weight_session import MAX_WEIGHT_VERSION

logger = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
JSON = "application/json"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
# curl -d sends form-urlencoded unless told otherwise; such a body is read as JSON
JSON_TYPES = frozenset({JSON, "", "application/x-www-form-urlencoded", "text/plain"})

def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_msgpack(content_type: str | None) -> bool:
    return media_type(content_type) in MSGPACK_TYPES


# A `\ud800`-`\udfff` escape: JSON's way to write half of a UTF-16 pair, and the only way a
# string no UTF-8 can carry (a lone half) gets into a decoded body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def decode_body(body: bytes, content_type: str | None) -> Any:
    """Decode a request body by its content type; malformed input is `InvalidRequest` (400).
    JSON is read as UTF-8, as RFC 8259 requires of JSON between systems."""
    if is_msgpack(content_type):
        return codec.decode(body)  # msgpack strings are UTF-8, checked as they are unpacked
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"the JSON body is not UTF-8 ({error.reason} at byte {error.start})", "body") from None
    try:
        payload = json.loads(text)
    except Exception as error:  # ValueError, RecursionError on deep nesting
        raise InvalidRequest(f"malformed JSON: {type(error).__name__}: {error}", "body") from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(payload, "body")
    return payload


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """A string with half a UTF-16 pair cannot be tokenized nor written back in an answer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRequest(f"a string holds a lone UTF-16 surrogate at character {error.start}, which is "
                                 "not Unicode text", where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, where)
            _refuse_lone_surrogates(item, f"{where}.{key}" if where != "body" else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{index}]")


def encode_body(payload: Any, as_msgpack: bool) -> bytes:
    if as_msgpack:
        return codec.encode(payload)
    return json.dumps(json_safe(payload), allow_nan=False, separators=(",", ":")).encode()


def json_safe(value: Any) -> Any:
    """JSON has no NaN/Infinity: such values are sent as null (msgpack carries them exactly).
    numpy scalars and torch tensors become plain numbers and lists, as msgpack sends them."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        if value.ndim > 1:  # e.g. top-k log-probs [response_len, k]
            return [json_safe(row) for row in value]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return [float(x) if math.isfinite(x) else None for x in value.tolist()]
        return value.tolist()
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# ---------------------------------------------------------------- scoring results
def internal_error_wire(error: BaseException, where: str = "") -> dict[str, str]:
    """Log `error` with its traceback under a fresh short id and return the only thing the
    caller learns of it: the id. Exception text can hold paths, hosts or tensor values of the
    server's, and a 500 is the server's bug, not something the caller can act on."""
    error_id = secrets.token_hex(6)
    logger.error("internal error %s%s: %s: %s", error_id, f" on {where}" if where else "",
                 type(error).__name__, error, exc_info=error)
    return {"code": "internal_error", "message": f"internal error; see the server log for error id {error_id}",
            "error_id": error_id}


def public_error_wire(error: ModelEngineError) -> dict[str, Any]:
    """What a caller sees of `error`: its own wire form, except that an internal error (500)
    is logged and answered with an id instead of its message."""
    return internal_error_wire(error) if error.http_status == 500 else error.to_wire()


# ---------------------------------------------------------------- weights
def encode_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> bytes:
    """A weight update as one msgpack body: `{"version", "tensors": [[name, dtype, shape, bytes]]}`."""
    tensors = []
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        try:
            dtype = dtype_name(tensor.dtype)
        except TypeError as error:
            raise TypeError(f"cannot send tensor {name!r}: {error}") from None
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        tensors.append([name, dtype, list(tensor.shape), raw])
    return codec.encode({"version": int(version), "tensors": tensors})


MAX_DIM = 2**63 - 1  # torch sizes are int64


def decode_weights(body: bytes) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """Inverse of `encode_weights`; every malformed part is an `InvalidRequest` naming it."""
    payload = codec.decode(body)
    if not isinstance(payload, dict) or set(payload) != {"version", "tensors"}:
        raise InvalidRequest('a weight update is {"version": int, "tensors": [[name, dtype, shape, bytes], ...]}', "body")
    version, entries = payload["version"], payload["tensors"]
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_WEIGHT_VERSION:
        raise InvalidRequest(f"must be an integer in [0, {MAX_WEIGHT_VERSION}], got {version!r}", "version")
    if not isinstance(entries, list):
        raise InvalidRequest("must be a list of [name, dtype, shape, bytes]", "tensors")
    named = []
    for index, entry in enumerate(entries):
        where = f"tensors[{index}]"
        if not (isinstance(entry, list) and len(entry) == 4):
            raise InvalidRequest("must be [name, dtype, shape, bytes]", where)
        name, dtype_text, shape, raw = entry
        if not isinstance(name, str) or not isinstance(dtype_text, str) or dtype_text not in DTYPES or not isinstance(raw, bytes):
            raise InvalidRequest(f"needs a str name, a dtype among {', '.join(DTYPES)} and raw bytes", where)
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
                                                for d in shape)):
            raise InvalidRequest(f"bad shape {shape!r} (each dimension an integer in [0, {MAX_DIM}])", where)
        dtype = DTYPES[dtype_text]
        numel = math.prod(shape)
        expected = numel * dtype.itemsize
        if numel == 0 and math.prod(d for d in shape if d) * dtype.itemsize > MAX_DIM:
            raise InvalidRequest(f"bad shape {shape!r}: its size overflows int64 even though it holds no values", where)
        if len(raw) != expected:
            raise InvalidRequest(f"{name}: shape {shape} of {dtype_text} needs {expected} bytes, got {len(raw)}", where)
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
        named.append((name, tensor))
    return version, named
