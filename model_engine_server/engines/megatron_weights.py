"""Weights by HuggingFace name for a Megatron model shard, through mbridge's name mapping.

A trainer (or the checkpoint on disk) speaks HF names with full, unsharded tensors. One
Megatron parameter may gather several HF tensors (`linear_qkv` = q, k, v; `linear_fc1` =
gate, up); a weight-sync bucket may carry only some of them, so parts wait here until their
group is complete, then mbridge merges them into Megatron's layout and this rank copies its
own TP slice. Every rank receives every tensor and slices locally: no collective runs while
loading, so a rejected bucket on one rank cannot leave its peers blocked in a scatter.

Names belonging to another pipeline stage are accepted and skipped; names the model does not
have at all are rejected. `specs` lists every HF name of the whole model (all stages) with its
full shape, which is what a sync must deliver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from checkpoint_transport.checkpoint_files import StoredTensor, list_tensors
from model_engine_server.engines.base import WeightSpec
from model_engine_server.engines.megatron_bridge import MegatronConfigError
from model_engine_server.engines.megatron_parallel import ModelParallelLayout
from model_engine_server.errors import WeightSyncError

TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ParamSlot:
    """One Megatron parameter of this rank and the HF tensors it is made of."""

    local_name: str  # in this stage's model (layer numbers local to the stage)
    global_name: str  # layer numbers of the whole model, as mbridge maps them
    hf_names: tuple[str, ...]
    param: torch.nn.Parameter


def _full_mcore_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[int(param.partition_dim)] *= tp_size
    return shape


class HFWeightMap:
    """This rank's parameters addressed by HF names; loads shards and exports whole tensors."""

    def __init__(self, bridge: Any, model: torch.nn.Module, layout: ModelParallelLayout, dtype: torch.dtype) -> None:
        self.bridge = bridge
        self.layout = layout
        self.dtype = dtype
        self.tied = bool(getattr(bridge.hf_config, "tie_word_embeddings", False))
        params = model.state_dict(keep_vars=True)
        local_to_global = bridge._weight_name_mapping_mcore_local_to_global(model)
        self.slots: list[ParamSlot] = []
        self._slots_by_hf: dict[str, list[ParamSlot]] = {}
        local_specs: dict[str, tuple[int, ...]] = {}
        for local_name, global_name in local_to_global.items():
            if "_extra_state" in local_name:
                continue
            try:
                hf_names = tuple(bridge._weight_name_mapping_mcore_to_hf(global_name))
            except NotImplementedError as error:
                raise MegatronConfigError(f"mbridge has no HF name for Megatron parameter {global_name!r}") from error
            slot = ParamSlot(local_name, global_name, hf_names, params[local_name])
            self.slots.append(slot)
            meta = torch.empty(_full_mcore_shape(slot.param, layout.tp_size), dtype=dtype, device="meta")
            for hf_name, hf_tensor in zip(*bridge._weight_to_hf_format(global_name, meta)):
                local_specs[hf_name] = tuple(hf_tensor.shape)
                self._slots_by_hf.setdefault(hf_name, []).append(slot)
        self.specs = {name: WeightSpec(shape, dtype) for name, shape in self._all_stages(local_specs).items()}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._complete_this_sync: set[str] = set()  # local names written whole since the last discard

    def _all_stages(self, local_specs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        if self.layout.pp_size == 1:
            return local_specs
        gathered: list[dict[str, tuple[int, ...]] | None] = [None] * self.layout.pp_size
        dist.all_gather_object(gathered, local_specs, group=self.layout.pp_group)
        merged: dict[str, tuple[int, ...]] = {}
        for stage_specs in gathered:
            for name, shape in (stage_specs or {}).items():
                if merged.setdefault(name, shape) != shape:
                    raise RuntimeError(f"pipeline stages disagree on the shape of {name!r}")
        return merged

    @property
    def local_hf_names(self) -> set[str]:
        return set(self._slots_by_hf)

    def _check(self, name: str, tensor: torch.Tensor, allow_cast: bool) -> str:
        key = TIED_ALIASES.get(name, name) if self.tied else name
        spec = self.specs.get(key)
        if spec is None:
            raise WeightSyncError(f"unknown weight name {name!r} for {self.bridge.hf_config.model_type}")
        if tuple(tensor.shape) != spec.shape:
            raise WeightSyncError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {spec.shape}")
        if tensor.dtype != spec.dtype and not (allow_cast and tensor.dtype.is_floating_point):
            raise WeightSyncError(
                f"weight {name!r} has dtype {tensor.dtype}, expected {spec.dtype} (set allow_dtype_cast to convert)"
            )
        return key

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], allow_cast: bool) -> list[str]:
        """Accept a (partial) stream of HF tensors; returns the names now written, in order.

        Each tensor is checked (name, shape, dtype) before anything is written. A parameter is
        written once all its parts have arrived, possibly in a later call; a part's name is
        returned only then, so a sync whose fused parameter never completes is seen as missing
        that part. Names of another pipeline stage's parameters are accepted at once.
        """
        written: list[str] = []
        for name, tensor in named_tensors:
            key = self._check(name, tensor, allow_cast)
            slots = self._slots_by_hf.get(key, ())
            completed: list[ParamSlot] = []
            for slot in slots:
                if slot.local_name in self._complete_this_sync and slot.local_name not in self._pending:
                    self._rewrite_part(slot, key, tensor)  # sent again: the last copy wins, as on the HF engine
                    continue
                parts = self._pending.setdefault(slot.local_name, {})
                parts[key] = tensor
                if len(parts) == len(slot.hf_names):
                    del self._pending[slot.local_name]
                    self._write(slot, [parts[hf_name] for hf_name in slot.hf_names])
                    self._complete_this_sync.add(slot.local_name)
                    completed.append(slot)
                else:  # the caller may reuse its buffer for the next tensor; mbridge views parts flat
                    parts[key] = tensor.detach().clone(memory_format=torch.contiguous_format)
            # another stage's parameter (no slot here) is complete at once; else this name and
            # the earlier parts of each parameter just written, once none of theirs still waits
            candidates = dict.fromkeys([part for slot in completed for part in slot.hf_names if part != key])
            written += [part for part in candidates if not self._waiting(part)]
            if not self._waiting(key):
                written.append(name)
        return written

    def _waiting(self, hf_name: str) -> bool:
        """Whether some parameter holding `hf_name` still waits for other parts."""
        return any(hf_name in self._pending.get(slot.local_name, {}) for slot in self._slots_by_hf.get(hf_name, ()))

    def discard_partial_weights(self) -> None:
        """Forget parts waiting for the rest of their parameter (an aborted sync's leftovers).
        Called as every sync begins, so it also starts the count of parameters written whole."""
        self._pending.clear()
        self._complete_this_sync.clear()

    def _rewrite_part(self, slot: ParamSlot, key: str, tensor: torch.Tensor) -> None:
        """Write one part of a parameter already written whole in this sync, in place: where the
        part lands in this rank's shard is found by passing a marker through mbridge's own
        mapping (ones for this part, zeros for the others), so no peer rank is needed."""
        if len(slot.hf_names) == 1:
            self._write(slot, [tensor])
            return
        device = slot.param.device

        def among_zeros(part: torch.Tensor) -> list[torch.Tensor]:
            return [part if hf_name == key else torch.zeros(self.specs[hf_name].shape, dtype=self.dtype, device=device)
                    for hf_name in slot.hf_names]

        values = self._shard(slot, among_zeros(tensor.to(device=device, dtype=self.dtype)))
        marks = self._shard(slot, among_zeros(torch.ones(tuple(tensor.shape), dtype=self.dtype, device=device)))
        if not bool(((marks == 0) | (marks == 1)).all()):
            raise WeightSyncError(f"{key!r} was sent twice in one sync, and mbridge does not place it by copying")
        where = marks.bool()
        slot.param.data[where] = values[where]

    def _shard(self, slot: ParamSlot, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's slice of the Megatron parameter the HF tensors make up."""
        hf_tensors = [t.to(device=slot.param.device).contiguous() for t in hf_tensors]  # mbridge views them flat
        whole = self.bridge._weight_to_mcore_format(slot.global_name, hf_tensors)
        shards = self.bridge._weight_split_across_tp(slot.global_name, whole, slot.param, self.layout.tp_size)
        return list(shards)[self.layout.tp_rank]

    def _write(self, slot: ParamSlot, hf_tensors: list[torch.Tensor]) -> None:
        shard = self._shard(slot, hf_tensors)
        if tuple(shard.shape) != tuple(slot.param.shape):
            raise WeightSyncError(
                f"{'/'.join(slot.hf_names)} gives a shard of shape {tuple(shard.shape)} for "
                f"{slot.local_name}, expected {tuple(slot.param.shape)}"
            )
        slot.param.data.copy_(shard)

    @torch.no_grad()
    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model as HF tensors, on every rank of the model-parallel group.

        Collective: every rank must iterate to the end. TP shards are all-gathered within the
        owning stage, then each tensor is broadcast from its stage along the pipeline. A tied
        output layer is not yielded again (it is `model.embed_tokens.weight`).
        """
        layout = self.layout
        owned = {slot.global_name: slot for slot in self.slots}
        entries = [
            (slot.global_name, _full_mcore_shape(slot.param, layout.tp_size))
            for slot in self.slots
            if not (self.tied and slot.global_name == "output_layer.weight")
        ]
        if layout.pp_size == 1:
            per_stage = [entries]
        else:
            per_stage = [None] * layout.pp_size
            dist.all_gather_object(per_stage, entries, group=layout.pp_group)
        for stage, stage_entries in enumerate(per_stage):
            for global_name, shape in stage_entries:
                if stage == layout.pp_rank:
                    whole = self._whole_mcore_tensor(owned[global_name])
                else:
                    whole = torch.empty(shape, dtype=self.dtype, device=self.slots[0].param.device)
                if layout.pp_size > 1:
                    dist.broadcast(whole, src=layout.stage_rank(stage), group=layout.pp_group)
                yield from zip(*self.bridge._weight_to_hf_format(global_name, whole))

    def _whole_mcore_tensor(self, slot: ParamSlot) -> torch.Tensor:
        param = slot.param.detach()
        if not (getattr(slot.param, "tensor_model_parallel", False) and self.layout.tp_size > 1):
            return param.contiguous()
        shards = [torch.empty_like(param) for _ in range(self.layout.tp_size)]
        dist.all_gather(shards, param.contiguous(), group=self.layout.tp_group)
        return self.bridge._weight_merge_across_tp(slot.global_name, shards, slot.param).contiguous()


def checkpoint_weights(model_path: str | Path) -> dict[str, StoredTensor]:
    """Every weight stored in the checkpoint (headers only), less known non-weights."""
    stored = list_tensors(model_path)
    return {name: tensor for name, tensor in stored.items() if not name.endswith(IGNORED_CHECKPOINT_SUFFIXES)}
