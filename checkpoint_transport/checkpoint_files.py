"""Read an HF checkpoint folder of safetensors files: the one reader behind the disk update
(`model_engine_server.weights_from_disk`), the Megatron engine's start-up load and the
publisher's `weights="<folder>"`.

- `list_tensors(folder)`: every tensor's file, shape and dtype, from the headers only.
- `read_tensors(listing, names)`: the wanted tensors, lazily, file by file, with positioned
  reads (no memory map), so a reader holds one tensor at a time, never the model.
- `iter_checkpoint(folder)`: every tensor, as the same `(hf_name, tensor)` stream a trainer's
  export yields.

The files are those the folder's `model.safetensors.index.json` lists (each must exist, a plain
file name of the folder), else `model.safetensors` alone when present (as transformers loads),
else every `*.safetensors` file, sorted, none holding a name another holds. A folder that is not
a readable checkpoint is a `CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from checkpoint_transport.dtypes import SAFETENSORS_DTYPES

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXAMPLES = 3  # names quoted in an error message
HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on a header


class CheckpointError(ValueError):
    """A folder that is not a readable safetensors checkpoint."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, as its header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a safetensors dtype outside `checkpoint_transport.dtypes`
    offset: int = 0  # of its bytes in the file
    nbytes: int = 0
    stamp: tuple[int, int, int] = (0, 0, 0)  # the file's inode, size and mtime when its header was read


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The folder's safetensors files, in the order its index lists them (or sorted)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder")
    index = path / INDEX
    if index.is_file():
        shards = _index_shards(index)
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shard(s) missing from {path}: {missing[:EXAMPLES]}")
        return [path / shard for shard in shards]
    if (path / SINGLE_FILE).is_file():  # what transformers loads; other files beside it are not the model
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors files (only safetensors checkpoints are loaded)")
    return files


def _index_shards(index: Path) -> list[str]:
    """The shard files an index names, in order; each a plain file name of the index's folder
    (a path in it could make the server read files outside the folder it was allowed)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index} is not a safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map each tensor name to a shard file name")
    shards = list(dict.fromkeys(weight_map.values()))
    outside = [shard for shard in shards if Path(shard).name != shard or shard in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index} names shards outside its folder: {outside[:EXAMPLES]}")
    return shards


def list_tensors(folder: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint by name, from the headers only (no tensor data is read)."""
    tensors: dict[str, StoredTensor] = {}
    for file in checkpoint_files(folder):
        found = _read_header(file)
        twice = sorted(name for name in found if name in tensors)
        if twice:
            raise CheckpointError(f"{file.name} holds tensor(s) another file of the folder holds too, e.g. "
                                  f"{twice[:EXAMPLES]}: which one is the model is unclear")
        tensors.update(found)
    return tensors


def _read_header(file: Path) -> dict[str, StoredTensor]:
    """A safetensors file's header: an 8-byte little-endian length, then that many bytes of JSON
    mapping each name to its dtype, shape and byte range after the header."""
    try:
        with file.open("rb") as handle:
            stamp = _stamp(os.fstat(handle.fileno()))
            size_field = handle.read(HEADER_SIZE_BYTES)
            length = int.from_bytes(size_field, "little") if len(size_field) == HEADER_SIZE_BYTES else -1
            if not 0 < length <= MAX_HEADER_BYTES:
                raise CheckpointError(f"cannot read {file.name}: not a safetensors file (header length {length})")
            text = handle.read(length)
        header = json.loads(text) if len(text) == length else None
    except (OSError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {file.name}: {type(error).__name__}: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {file.name}: its header is cut short or not a JSON object")
    data_start = HEADER_SIZE_BYTES + length
    found: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (begin, end) = tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            dtype_code = str(entry["dtype"])
            if not 0 <= int(begin) <= int(end) or min(shape, default=0) < 0:
                raise ValueError("negative sizes or offsets")
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"cannot read {file.name}: entry {name!r} is malformed ({error})") from None
        found[name] = StoredTensor(file, shape, SAFETENSORS_DTYPES.get(dtype_code), data_start + int(begin),
                                   int(end) - int(begin), stamp)
    _check_layout(file, found, data_start, size=stamp[1])
    return found


def _check_layout(file: Path, found: Mapping[str, StoredTensor], data_start: int, size: int) -> None:
    """What safetensors checks too: each tensor's bytes fit its shape and dtype, the ranges tile
    the data with no gap or overlap, and the file ends where the data does. A shard still being
    written (or cut short) is refused here, before an update begins, not midway through it."""
    position = data_start
    for name, stored in sorted(found.items(), key=lambda item: item[1].offset):
        if stored.dtype is not None and stored.nbytes != math.prod(stored.shape) * stored.dtype.itemsize:
            raise CheckpointError(f"cannot read {file.name}: {name!r} holds {stored.nbytes} bytes, but shape "
                                  f"{list(stored.shape)} of {stored.dtype} needs {math.prod(stored.shape) * stored.dtype.itemsize}")
        if stored.offset != position:
            raise CheckpointError(f"cannot read {file.name}: the tensors' byte ranges leave a gap or overlap at {name!r}")
        position += stored.nbytes
    if position != size:
        raise CheckpointError(f"cannot read {file.name}: its header describes {position} bytes, the file has {size} "
                              "(cut short, or still being written?)")


def read_tensors(
    listing: Mapping[str, StoredTensor], names: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `names` (default: all) of `listing`, read lazily file by file, as stored.

    Read with positioned reads, not a memory map: a file a trainer rewrites in place while it is
    read ends in a `CheckpointError` (a short read), where touching a mapped page past a
    truncated file's end would kill the whole process (SIGBUS)."""
    by_file: dict[Path, list[str]] = {}
    for name in listing if names is None else names:
        by_file.setdefault(listing[name].file, []).append(name)
    for file, file_names in by_file.items():
        try:
            handle = file.open("rb")
        except OSError as error:
            raise CheckpointError(f"cannot read {file.name}: {type(error).__name__}: {error}") from None
        with handle:
            listed = listing[file_names[0]].stamp
            _check_unchanged(file, listed, os.fstat(handle.fileno()))
            for name in file_names:
                tensor = _read_one(handle.fileno(), file, name, listing[name])
                _check_unchanged(file, listed, os.fstat(handle.fileno()))  # not rewritten in place meanwhile
                yield name, tensor


def _stamp(status: os.stat_result) -> tuple[int, int, int]:
    return status.st_ino, status.st_size, status.st_mtime_ns


def _check_unchanged(file: Path, listed: tuple[int, int, int], status: os.stat_result) -> None:
    """A file replaced or rewritten since its header was read would mix two checkpoints."""
    if _stamp(status) != listed:
        raise CheckpointError(f"{file.name} changed after its header was read (replaced or rewritten): "
                              "load a checkpoint folder nothing writes to any more")


def _read_one(descriptor: int, file: Path, name: str, stored: StoredTensor) -> torch.Tensor:
    if stored.dtype is None:
        raise CheckpointError(f"{file.name}: {name!r} has a dtype this server cannot load")
    expected = stored.nbytes  # matches its shape and dtype: `_check_layout` refused the file otherwise
    raw = torch.empty(expected, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    while done < expected:
        got = os.preadv(descriptor, [view[done:]], stored.offset + done)
        if got <= 0:
            raise CheckpointError(f"{file.name} ended inside {name!r} ({done} of {expected} bytes): "
                                  "was it rewritten while being read?")
        done += got
    return raw.view(stored.dtype).reshape(stored.shape)


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time (the folder is read on the first `next`)."""
    yield from read_tensors(list_tensors(folder))
