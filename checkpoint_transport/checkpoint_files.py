"""Read an HF checkpoint folder of safetensors files: the one reader behind the disk update
(`model_engine_server.weights_from_disk`), the Megatron engine's start-up load and the
publisher's `weights="<folder>"`.

- `list_tensors(folder)`: every tensor's file, shape and dtype, from the headers only.
- `read_tensors(listing, names)`: the wanted tensors, lazily, file by file (safetensors
  memory-maps the files), so a reader holds one tensor at a time, never the model.
- `iter_checkpoint(folder)`: every tensor, as the same `(hf_name, tensor)` stream a trainer's
  export yields.

The files are those the folder's `model.safetensors.index.json` lists (each must exist, a plain
file name of the folder), else `model.safetensors` alone when present (as transformers loads),
else every `*.safetensors` file, sorted, none holding a name another holds. A folder that is not
a readable checkpoint is a `CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from checkpoint_transport.dtypes import SAFETENSORS_DTYPES

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXAMPLES = 3  # names quoted in an error message


class CheckpointError(ValueError):
    """A folder that is not a readable safetensors checkpoint."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, as its header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a safetensors dtype outside `checkpoint_transport.dtypes`


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
    from safetensors import safe_open

    tensors: dict[str, StoredTensor] = {}
    for file in checkpoint_files(folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                found = {name: reader.get_slice(name) for name in reader.keys()}
        except Exception as error:  # a truncated or foreign file
            raise CheckpointError(f"cannot read {file.name}: {type(error).__name__}: {error}") from None
        twice = sorted(name for name in found if name in tensors)
        if twice:
            raise CheckpointError(f"{file.name} holds tensor(s) another file of the folder holds too, e.g. "
                                  f"{twice[:EXAMPLES]}: which one is the model is unclear")
        for name, part in found.items():
            tensors[name] = StoredTensor(file, tuple(part.get_shape()), SAFETENSORS_DTYPES.get(part.get_dtype()))
    return tensors


def read_tensors(
    listing: Mapping[str, StoredTensor], names: Iterable[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `names` (default: all) of `listing`, read lazily file by file, as stored."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in listing if names is None else names:
        by_file.setdefault(listing[name].file, []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in file_names:
                yield name, reader.get_tensor(name)


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time (the folder is read on the first `next`)."""
    yield from read_tensors(list_tensors(folder))
