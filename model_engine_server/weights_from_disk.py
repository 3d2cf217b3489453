"""Serve the weights of an HF checkpoint folder (`POST /v1/update_weights_from_disk`).

The order is the point: the folder is checked against the model being served -- the
architecture and the settings that change the forward (tied embeddings, head split, rotary,
norms) in its `config.json`, then the name and shape of every tensor from the safetensors
headers (no tensor data is read) -- BEFORE the weight update begins. A missing folder, another
architecture or other shapes is an `InvalidRequest` (HTTP 400) naming what differs, and the old
weights keep serving under the old version. Only a folder that fits goes through the service's
own `update_weights` (drain -> load -> commit, the same gating the trainer-side publisher
drives), one tensor at a time from memory-mapped files. The call returns once the new version
serves.

Floating-point tensors are cast to the dtype being served (a bf16 checkpoint served in fp32 is
loaded exactly as the server's start-up loads it); integer dtypes must match. A tied model's
`lm_head.weight`, when a checkpoint carries it, is the embedding itself and is skipped.

Works on any `LogProbService` (its `weight_layout()` says what is served). Imports neither Ray nor HTTP.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from checkpoint_transport.checkpoint_files import CheckpointError, StoredTensor, list_tensors, read_tensors
from model_engine_server.engines.base import ModelInfo, WeightSpec, forward_settings
from model_engine_server.service import LogProbService
from model_engine_server.errors import Forbidden, InvalidRequest

FIELD = "model_path"
TIED_ALIAS = "lm_head.weight"
EXAMPLES = 3  # names quoted in an error message


@dataclass
class CheckpointPlan:
    """What to load from a folder that fits: which tensor comes from which file, in what dtype."""

    folder: Path
    architecture: str
    tensors: dict[str, StoredTensor]
    load_as: dict[str, torch.dtype]  # served dtype of each tensor to load
    skipped: list[str] = field(default_factory=list)  # tied aliases

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors to load, read lazily file by file, each in its served dtype."""
        for name, tensor in read_tensors(self.tensors, self.load_as):
            yield name, tensor.to(self.load_as[name])


# ---------------------------------------------------------------- reading the folder
def _architecture(folder: Path) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InvalidRequest(f"{folder} has no config.json: not a HuggingFace checkpoint", FIELD)
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise InvalidRequest(f"{config_file} is not JSON: {error}", FIELD) from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures, list):
        raise InvalidRequest(f"{config_file} names no architectures", FIELD)
    return str(architectures[0])


def read_checkpoint(model_path: str | Path) -> tuple[str, dict[str, StoredTensor]]:
    """(architecture, every tensor's file, shape and dtype) from the folder's headers only."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise InvalidRequest(f"{str(model_path)!r} is not a folder on the server's machine", FIELD)
    architecture = _architecture(folder)
    try:
        return architecture, list_tensors(folder)
    except CheckpointError as error:
        raise InvalidRequest(str(error), FIELD) from None


# ---------------------------------------------------------------- checking it fits
def plan_load(model_path: str | Path, info: ModelInfo, specs: dict[str, WeightSpec]) -> CheckpointPlan:
    """Check the folder against the served model; raise `InvalidRequest` naming every kind of
    difference found (architecture, missing, unknown, shapes, dtypes), else the plan."""
    architecture, tensors = read_checkpoint(model_path)
    where = f"{model_path}"
    if architecture != info.architecture:
        raise InvalidRequest(
            f"{where} holds a {architecture} checkpoint; the server serves {info.architecture}", FIELD
        )
    skipped = [TIED_ALIAS] if info.tied_embeddings and TIED_ALIAS in tensors and TIED_ALIAS not in specs else []
    problems: list[str] = _settings_problems(model_path, info)
    missing = sorted(set(specs) - set(tensors))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:EXAMPLES]}")
    unknown = sorted(set(tensors) - set(specs) - set(skipped))
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) the served model does not have, e.g. {unknown[:EXAMPLES]}")
    shapes = [
        f"{name} {list(tensors[name].shape)} (served {list(spec.shape)})"
        for name, spec in specs.items() if name in tensors and tensors[name].shape != tuple(spec.shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of other shapes: {'; '.join(shapes[:EXAMPLES])}")
    dtypes = [
        f"{name} {tensors[name].dtype} (served {spec.dtype})"
        for name, spec in specs.items() if name in tensors and not _castable(tensors[name].dtype, spec.dtype)
    ]
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) of dtypes that cannot be cast: {'; '.join(dtypes[:EXAMPLES])}")
    if problems:
        raise InvalidRequest(f"{where} does not fit the served {info.architecture}: {' | '.join(problems)}", FIELD)
    load_as = {name: spec.dtype for name, spec in specs.items()}
    return CheckpointPlan(Path(model_path).expanduser(), architecture, tensors, load_as, skipped)


def _settings_problems(model_path: str | Path, info: ModelInfo) -> list[str]:
    """Model settings that change the forward while every tensor keeps its name and shape (tied
    embeddings, the head split, rotary and norm settings): such a checkpoint would load and
    score silently wrong. Empty when the engine does not say what it serves."""
    if not info.forward_settings:
        return []
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(model_path).expanduser()), local_files_only=True)
    except Exception as error:  # transformers' reasons are many; the folder is what is wrong
        raise InvalidRequest(f"{model_path}: config.json cannot be read: {type(error).__name__}: {error}", FIELD) from None
    served = dict(info.forward_settings)
    differing = [f"{key} {value} (served {served[key]})" for key, value in forward_settings(config) if served.get(key, value) != value]
    return [f"{len(differing)} model setting(s) differ: {'; '.join(differing[:EXAMPLES])}"] if differing else []


def _castable(stored: torch.dtype | None, served: torch.dtype) -> bool:
    if stored is None:
        return False
    return stored == served or (stored.is_floating_point and served.is_floating_point)


# ---------------------------------------------------------------- where folders may be read
ROOTS_SETTING = "model_engine_server.weight_roots"
OUTSIDE_ROOTS = (
    f"model_path is not under a folder this server loads weights from; "
    f"list the folder in {ROOTS_SETTING} (default: the parent folder of model_path)"
)


def resolve_under_roots(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """`path` resolved (`~`, `..` and symlinks followed) when it lies under one of `roots`,
    else `Forbidden` with one message for every refused path: whether it exists is not told."""
    try:
        target = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise Forbidden(OUTSIDE_ROOTS) from None
    for root in roots:
        try:
            base = Path(root).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if target == base or target.is_relative_to(base):
            return target
    raise Forbidden(OUTSIDE_ROOTS)


# ---------------------------------------------------------------- the update itself
async def update_weights_from_disk(
    service: LogProbService, model_path: str, version: int | None = None, roots: Sequence[str] | None = None
) -> int:
    """Check `model_path` fits, then serve its weights as `version` (default: current + 1)
    through `service.update_weights`; returns the version once it serves. With `roots`, a
    folder not under one of them (after resolving symlinks and `..`) is `Forbidden` before
    anything is read, with the same message whether it exists or not (the HTTP route checks
    its app's roots itself, before the service's own serialised method)."""
    if roots is not None:
        model_path = str(resolve_under_roots(model_path, roots))
    current = int((await service.get_status())["weight_version"])
    target = current + 1 if version is None else version
    if target <= current:
        raise InvalidRequest(f"must be greater than the current weight version {current}, got {target}", "weight_version")
    info, specs = await service.weight_layout()
    plan = await asyncio.to_thread(plan_load, model_path, info, specs)  # reads headers: off the event loop
    return await service.update_weights(plan.named_tensors(), target)
