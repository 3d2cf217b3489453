"""Megatron's model-parallel state on top of the process group the replica already formed.

The replica's workers call `torch.distributed.init_process_group` (gloo on CPU, NCCL on GPU)
before building the engine; here Megatron's `parallel_state` splits that world into tensor-
and pipeline-parallel groups. Megatron keeps those groups in module globals, so one process
holds one layout at a time: engines share it (counted) and the last one to close releases it.

Pipeline stages exchange activations with plain send/recv: every rank of a model-parallel
group receives the same requests, so every stage knows the row length and no shape handshake
is needed (Megatron's forward-only schedule would add one per micro-batch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model_engine_server.engines.megatron_bridge import MegatronConfigError
from model_engine_server.logprobs import ChunkedScores

_lock = threading.Lock()
_users = 0
_sizes: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelParallelLayout:
    """Where this rank sits in its model-parallel group (TP x PP ranks serving one replica)."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    prev_stage_rank: int  # global ranks in this rank's pipeline
    next_stage_rank: int
    last_stage_rank: int

    def stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` in this rank's pipeline."""
        return dist.get_global_rank(self.pp_group, stage)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def returns_results(self) -> bool:
        """The one rank per model-parallel group whose outputs the replica takes."""
        return self.is_last_stage and self.tp_rank == 0


def check_layout(tp_size: int, pp_size: int, world_size: int, dp_size: int | None = None) -> int:
    """TP x PP (x DP) must cover the process group exactly; returns DP, names the numbers that disagree.

    `dp_size=None` lets the replica's extra workers form data-parallel copies of the
    model-parallel group (world = TP x PP x DP); a world that TP x PP does not divide is an error.
    """
    if tp_size < 1 or pp_size < 1 or (dp_size is not None and dp_size < 1):
        raise MegatronConfigError(
            f"parallel sizes must be >= 1, got tensor_model_parallel_size={tp_size}, "
            f"pipeline_model_parallel_size={pp_size}, data_parallel_size={dp_size}"
        )
    model_parallel = tp_size * pp_size
    if dp_size is None:
        if world_size % model_parallel == 0:
            return world_size // model_parallel
        wanted = f"a multiple of {model_parallel}"
    elif model_parallel * dp_size == world_size:
        return dp_size
    else:
        wanted = f"x data_parallel_size ({dp_size}) = {model_parallel * dp_size}"
    raise MegatronConfigError(
        f"tensor_model_parallel_size ({tp_size}) x pipeline_model_parallel_size ({pp_size}) = {model_parallel}, "
        f"but the replica has {world_size} worker(s), one per GPU (needed: {wanted}); set "
        "model_engine_server.megatron.* so that the product matches the replica's GPU count"
    )


def ensure_process_group(device: torch.device, tp_size: int, pp_size: int) -> bool:
    """A one-process group when the engine runs alone (TP = PP = 1) and none exists yet.

    With model parallelism the caller (the replica worker) must have formed the group: the
    engine cannot know its peers. Returns whether a group was created here.
    """
    if dist.is_initialized():
        return False
    if tp_size * pp_size != 1:
        raise MegatronConfigError(
            f"TP={tp_size} x PP={pp_size} needs torch.distributed initialised over the replica's "
            "workers before the engine is built (the replica worker does this)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def acquire_layout(tp_size: int, pp_size: int, dp_size: int | None = None) -> ModelParallelLayout:
    """Initialise (or join) Megatron's parallel state for this TP x PP; counted, see `release_layout`."""
    from megatron.core import parallel_state as mpu

    global _users, _sizes
    dp_size = check_layout(tp_size, pp_size, dist.get_world_size(), dp_size)
    with _lock:
        if _sizes is not None and _sizes != (tp_size, pp_size):
            raise MegatronConfigError(
                f"this process already serves TP={_sizes[0]} x PP={_sizes[1]}; "
                f"cannot also build TP={tp_size} x PP={pp_size} (close the other engine first)"
            )
        if _sizes is None:
            if mpu.model_parallel_is_initialized():
                mpu.destroy_model_parallel()  # left by someone else: rebuild for our sizes
            mpu.initialize_model_parallel(
                tensor_model_parallel_size=tp_size,
                pipeline_model_parallel_size=pp_size,
                create_gloo_process_groups=False,
            )
            _sizes = (tp_size, pp_size)
        _users += 1
    return ModelParallelLayout(
        tp_size=tp_size,
        pp_size=pp_size,
        dp_size=dp_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        prev_stage_rank=mpu.get_pipeline_model_parallel_prev_rank(),
        next_stage_rank=mpu.get_pipeline_model_parallel_next_rank(),
        last_stage_rank=mpu.get_pipeline_model_parallel_last_rank(),
    )


def release_layout() -> bool:
    """One engine is done with the layout; the last one destroys Megatron's groups (returns True)."""
    from megatron.core import parallel_state as mpu

    global _users, _sizes
    with _lock:
        if _users == 0:
            return False
        _users -= 1
        if _users:
            return False
        mpu.destroy_model_parallel()
        _sizes = None
        return True


def send_to_next_stage(layout: ModelParallelLayout, activations: torch.Tensor) -> None:
    dist.send(activations.contiguous(), dst=layout.next_stage_rank, group=layout.pp_group)


def receive_from_previous_stage(
    layout: ModelParallelLayout, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buffer, src=layout.prev_stage_rank, group=layout.pp_group)
    return buffer


def broadcast_from_last_stage(layout: ModelParallelLayout, tensor: torch.Tensor) -> torch.Tensor:
    """Give every stage the last stage's results (a few floats per token), in place."""
    dist.broadcast(tensor, src=layout.last_stage_rank, group=layout.pp_group)
    return tensor


def broadcast_scores_from_last_stage(
    layout: ModelParallelLayout, scores: ChunkedScores | None, num_scored: int, top_k: int, want_entropy: bool,
    device: torch.device,
) -> ChunkedScores:
    """Top-k results of the last stage on every stage (`scores` is None elsewhere): one float
    tensor (log-prob, entropy, k log-probs per position) and one int64 tensor (target rank, k ids),
    so two broadcasts per batch whatever k is."""
    floats = torch.empty(num_scored, 2 + top_k, dtype=torch.float32, device=device)
    ints = torch.empty(num_scored, 1 + top_k, dtype=torch.int64, device=device)
    if scores is not None:
        assert scores.top_k_ids is not None and scores.top_k_log_probs is not None and scores.target_ranks is not None
        floats[:, 0] = scores.log_probs
        floats[:, 1] = scores.entropy if scores.entropy is not None else 0.0
        floats[:, 2:] = scores.top_k_log_probs
        ints[:, 0] = scores.target_ranks
        ints[:, 1:] = scores.top_k_ids
    dist.broadcast(floats, src=layout.last_stage_rank, group=layout.pp_group)
    dist.broadcast(ints, src=layout.last_stage_rank, group=layout.pp_group)
    return ChunkedScores(
        log_probs=floats[:, 0], entropy=floats[:, 1] if want_entropy else None,
        top_k_ids=ints[:, 1:], top_k_log_probs=floats[:, 2:], target_ranks=ints[:, 0],
    )
