"""Read an HF checkpoint folder as the same `(hf_name, tensor)` stream a trainer's export yields.

Lazy, one tensor at a time (safetensors memory-maps the files), so publishing a checkpoint
never holds the whole model in memory: only the bucket being packed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The folder's safetensors files, in the order its index lists them (or sorted)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {str(folder)!r} is not a folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} holds no *.safetensors files")
    return files


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)
