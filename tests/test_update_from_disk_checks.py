"""What a checkpoint folder must be before a disk update begins, beyond names and shapes: the
same forward settings, one unambiguous set of files, an index that stays in its folder.

Each failed before: an untied checkpoint (or another head split of the same shapes) loaded into
a tied model and scored up to 1.0 off, a stray file beside `model.safetensors` overrode it, and
an index could point the server at files outside the folders it may read, or crash it (500).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_transport.checkpoint_files import CheckpointError, checkpoint_files, list_tensors, read_tensors
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import InvalidRequest
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model
from model_engine_server.weights_from_disk import plan_load


@pytest.fixture(scope="module")
def served_model(tiny_model):
    return build_engine("hf", EngineSpec(model_path=str(tiny_model), device="cpu"))


@pytest.mark.parametrize("shape,setting", [
    (TinyModelShape(arch="qwen2", tie_word_embeddings=False), "tie_word_embeddings false (served true)"),
    (TinyModelShape(arch="qwen2", num_heads=8, num_kv_heads=4), "num_attention_heads 8 (served 4)"),
], ids=["untied", "head-split"])
def test_a_checkpoint_whose_forward_settings_differ_is_refused_though_its_shapes_fit(tmp_path, served_model, shape, setting):
    folder = make_tiny_model(tmp_path / "other", shape, seed=3)
    with pytest.raises(InvalidRequest, match="model setting") as refused:
        plan_load(folder, served_model.info, served_model.weight_specs())
    assert setting in refused.value.message


def test_a_stray_file_beside_model_safetensors_is_not_read(tiny_model, tmp_path, served_model):
    folder = tmp_path / "with-stray"
    shutil.copytree(tiny_model, folder)
    stray = {name: torch.zeros_like(t) for name, t in load_file(str(folder / "model.safetensors")).items()}
    save_file(stray, str(folder / "optimizer_backup.safetensors"))
    assert checkpoint_files(folder) == [folder / "model.safetensors"]
    plan = plan_load(folder, served_model.info, served_model.weight_specs())
    assert all(stored.file.name == "model.safetensors" for stored in plan.tensors.values())


def test_files_without_an_index_that_hold_the_same_tensor_are_refused(tiny_model, tmp_path):
    folder = tmp_path / "twice"
    folder.mkdir()
    tensors = load_file(str(tiny_model / "model.safetensors"))
    save_file(tensors, str(folder / "a.safetensors"))
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, str(folder / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b.safetensors holds tensor\(s\) another file of the folder holds too"):
        list_tensors(folder)


@pytest.mark.parametrize("shard,reason", [
    ("/etc/outside.safetensors", "names shards outside its folder"),
    ("../outside.safetensors", "names shards outside its folder"),
    (7, "must map each tensor name to a shard file name"),
])
def test_an_index_naming_anything_but_a_file_of_its_folder_is_refused(tiny_model, tmp_path, shard, reason):
    folder = tmp_path / "indexed"
    shutil.copytree(tiny_model, folder)
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(CheckpointError, match=reason):
        checkpoint_files(folder)


def _copied(tiny_model: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    return folder / "model.safetensors"


def test_tensors_read_through_the_reader_equal_safetensors_own(tiny_model):
    expected = load_file(str(tiny_model / "model.safetensors"))
    read = dict(read_tensors(list_tensors(tiny_model)))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


@pytest.mark.parametrize("change", ["truncated", "rewritten in place"])
def test_a_file_changed_while_it_is_read_is_refused_not_a_crash(tiny_model, tmp_path, change):
    """A memory-mapped read of a file truncated meanwhile killed the process (SIGBUS); one
    rewritten in place would have mixed two checkpoints."""
    weights = _copied(tiny_model, tmp_path / "ckpt")
    listing = list_tensors(weights.parent)
    stream = read_tensors(listing)
    next(stream)  # the reader is inside the file when the trainer's save begins
    if change == "truncated":
        with weights.open("r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed after its header was read|ended inside"):
        list(stream)


def test_a_file_that_is_not_safetensors_is_refused_by_name(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        list_tensors(tmp_path)


def test_a_shard_cut_short_is_refused_before_any_update_begins(tiny_model, tmp_path, served_model):
    """A trainer's save still being written: refused when the folder is planned (a 400, old
    weights serving on), not midway through loading it (weights left incomplete)."""
    weights = _copied(tiny_model, tmp_path / "ckpt")
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 16)
    with pytest.raises(CheckpointError, match="cut short, or still being written"):
        list_tensors(weights.parent)
    with pytest.raises(InvalidRequest, match="cut short"):
        plan_load(weights.parent, served_model.info, served_model.weight_specs())
