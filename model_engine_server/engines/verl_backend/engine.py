"""`VerlEngine`: verl's own `TrainingWorker` behind our `Engine` seam (engine backend ``verl``).

For a policy trained with verl's FSDP engine, scoring with that very engine gives the numbers
the trainer's own old-log-prob recompute gives: same model loading and patches, same attention
path, same precision and the same log-softmax and entropy code. `score_packed` turns our packed
row into verl's no-padding batch (`batches.py`) and calls the worker's forward-only
`infer_batch`, one temperature per sequence.

Weights are written by HF name into the FSDP2 module's parameters (DTensors). A replica is one
device, so each parameter's local shard is the whole tensor; the copy still goes through the
parameter's own mesh and placements, so it stays right for any sharding. FSDP2 may keep a
unit's gathered copy of its parameters after a forward-only pass (see `_reshard_everywhere`),
so after a load every unit is resharded: the next forward gathers the new values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.distributed as dist

from checkpoint_transport.dtypes import DTYPES
from model_engine_server.engines.base import EngineSpec, ModelInfo, WeightSpec, forward_settings, register_engine, resolve_device
from model_engine_server.engines.hf import check_checkpoint_folder
from model_engine_server.engines.verl_backend import build
from model_engine_server.engines.verl_backend.batches import flat_output, to_verl_batch
from model_engine_server.errors import WeightSyncError
from model_engine_server.packing import PackedBatch

if TYPE_CHECKING:
    from verl.workers.engine_workers import TrainingWorker


class VerlEngine:
    """verl's `TrainingWorker` (FSDP2, one device) serving forward-only scores."""

    returns_results = True  # one device per replica: this rank's results are the replica's
    data_parallel_rank = None

    def __init__(self, spec: EngineSpec) -> None:
        check_checkpoint_folder(spec.model_path)
        self.spec = spec
        self.device = resolve_device(spec.device)
        build.select_platform(self.device)
        build.import_verl_worker_modules()  # before any verl import from this stack (see there)
        self._owns_process_group = build.ensure_single_process_group(self.device)
        try:
            self.worker: "TrainingWorker" = build.build_training_worker(spec, self.device)
        except BaseException:
            self.close()
            raise
        self.module: torch.nn.Module = self.worker.engine.module
        self._params = dict(self.module.named_parameters())
        self._state = self.module.state_dict()  # the parameters again, plus tied aliases (lm_head)
        self.info = self._describe()

    def _describe(self) -> ModelInfo:
        config = self.module.config
        return ModelInfo(
            architecture=_architecture(self.module),
            vocab_size=int(self.module.get_output_embeddings().weight.shape[0]),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 1 << 20)),
            hidden_size=int(config.hidden_size),
            num_parameters=sum(p.numel() for p in self._params.values()),
            dtype=_compute_dtype_name(self.worker.engine_config),
            device=str(self.device),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            forward_settings=forward_settings(config),
        )

    # ---------------------------------------------------------------- scoring
    def score_packed(
        self, batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool, chunk_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of `batch.targets`, our layout. verl materialises the
        micro-batch's logits whole, as the trainer does; `chunk_tokens` does not apply.

        Runs outside inference mode (the adapter's): FSDP2 tracks the version counters of the
        parameters it gathers, which inference tensors do not have. verl disables autograd itself.
        """
        with torch.inference_mode(False):
            verl_batch = to_verl_batch(batch, temperatures, want_entropy)
            output = self.worker.infer_batch(verl_batch.data)
        log_probs = flat_output(output, "log_probs", verl_batch)
        entropy = flat_output(output, "entropy", verl_batch) if want_entropy else None
        return log_probs, entropy

    # ---------------------------------------------------------------- weights
    def weight_specs(self) -> dict[str, WeightSpec]:
        """Every tensor a complete sync must deliver (tied aliases are accepted, not required)."""
        return {name: WeightSpec(tuple(p.shape), p.dtype) for name, p in self._params.items()}

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors into the sharded parameters by HF name; an unknown name, shape or dtype
        is rejected before anything of that tensor is written."""
        loaded = []
        try:
            for name, tensor in named_tensors:
                target = self._checked_target(name, tensor)
                _copy_into(target, tensor)
                loaded.append(name)
        finally:
            if loaded:
                _reshard_everywhere(self.module)
        return loaded

    def _checked_target(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self._state.get(name)
        if target is None:
            raise WeightSyncError(f"unknown weight name {name!r} for {self.info.architecture}")
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightSyncError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        if tensor.dtype != target.dtype and not (self.spec.allow_dtype_cast and tensor.dtype.is_floating_point):
            raise WeightSyncError(
                f"weight {name!r} has dtype {tensor.dtype}, expected {target.dtype} (set allow_dtype_cast to convert)"
            )
        return target

    def discard_partial_weights(self) -> None:
        """Every tensor is written whole here: nothing waits for parts."""

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors by HF name (gathered from the shards: collective over the replica)."""
        from torch.distributed.tensor import DTensor

        for name, param in self._params.items():
            yield name, (param.full_tensor() if isinstance(param, DTensor) else param).detach()

    def close(self) -> None:
        """Destroy the process group only if this engine started it."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False


def _copy_into(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Write a full tensor into a parameter: a DTensor gets its local shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        local = target.to_local()
        full = tensor.detach().to(device=local.device, dtype=local.dtype)
        # every rank holds the full tensor: take this rank's part without communication
        local.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local())
    else:
        target.copy_(tensor)


def _reshard_everywhere(module: torch.nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters, so the next forward gathers what was written.

    Without a backward, FSDP2 frees a unit's gathered copy after its forward only when that unit
    reshards after forward: never the root under FSDP2's default, never any unit under the
    trainer's `reshard_after_forward: false`. `reshard()` acts on one unit, hence all of them.
    """
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def _architecture(module: torch.nn.Module) -> str:
    """The HF class name (FSDP2 wraps the module's class in `FSDP<name>`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls.__name__ for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _compute_dtype_name(engine_config: Any) -> str:
    """The forward's parameter dtype: FSDP's mixed-precision param dtype (verl's default bf16)."""
    from verl.utils.torch_dtypes import PrecisionType

    mixed = engine_config.mixed_precision or {}
    dtype = PrecisionType.to_dtype(mixed.get("param_dtype", "bf16"))
    return next(name for name, value in DTYPES.items() if value == dtype)


@register_engine("verl")
def build_verl_engine(
    spec: EngineSpec, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, **_: object
) -> VerlEngine:
    """The replica layer passes its parallel sizes to every non-hf backend; verl's engine here
    is one device per replica."""
    if tensor_model_parallel_size * pipeline_model_parallel_size != 1:
        raise build.VerlEngineError(
            f"backend verl serves one device per replica, got tensor_model_parallel_size={tensor_model_parallel_size} "
            f"x pipeline_model_parallel_size={pipeline_model_parallel_size}"
        )
    return VerlEngine(spec)
