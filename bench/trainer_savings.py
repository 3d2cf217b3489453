"""What the trainer saves per step when old log-probs come from the server, on verl's own worker.

In verl's decoupled-PPO mode (`algorithm.rollout_correction.bypass_mode: False`) the fully-async
trainer (`FullyAsyncTrainer._compute_old_log_prob`) and the V1 separate-async trainer do, every
step after the first of a sync window, on the trainer's own devices:

    save_model_to_cpu(current) -> restore_model_from_cpu(old) -> recompute old log-probs
    -> restore_model_from_cpu(current) -> clear_cpu_model(current)

and then the update. With the server, all of that leaves the trainer; the update stays. This
benchmark builds verl's `TrainingWorker` (FSDP2, fp32, set up as the actor, with an optimizer) for
the Qwen2.5-0.5B shape and times, on one batch, each part as verl runs it: verl's FSDP2 helpers
(`fsdp2_sharded_save_to_cpu`, `fsdp2_sharded_load_from_cpu`, which `save_model_to_cpu` and
`restore_model_from_cpu` call), the recompute through `infer_batch` with entropy (as
`_compute_old_log_prob` asks), and the update through `train_mini_batch` with verl's `ppo_loss`
(one mini-batch: forward, backward, optimizer step).

On a CPU, verl's "save to CPU" (`.cpu()` of a CPU tensor) returns the parameter itself: it costs
nothing, and restoring it later would restore the current weights. So the save is timed twice:
as verl runs it here (`save_s_as_verl_on_cpu`) and with a real copy of every shard (`save_s`),
the host-memory stand-in for the device-to-host copy a GPU trainer pays. The savings use the
real copy. The ratios are this CPU's; on a GPU the copies cross PCIe instead (`copy_bytes_per_step`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from bench import scoring_verl
from bench.common import Target, fixed_targets
from bench.scoring import TOKEN_BUDGET, rl_length_mix, scale_to_tokens
from bench.shapes import QWEN25_0_5B, QwenShape
from model_engine_server.protocol import LogProbRequest

TARGETS: list[Target] = []  # it measures what the server removes; it promises nothing
targets = fixed_targets(TARGETS)


@dataclass(frozen=True)
class Size:
    shape: QwenShape
    requests: int
    max_tokens: int
    rounds: int  # timed rounds, after one untimed warm-up round


FULL = Size(QWEN25_0_5B, requests=16, max_tokens=4096, rounds=3)
QUICK = Size(QWEN25_0_5B, requests=8, max_tokens=1024, rounds=1)


# verl's `trigger_parameter_sync_step` default: steps per weight-sync window. The window's first
# step trains the version it scores (save + recompute, no swap); each later one swaps in the old
# version and back (two restores).
SYNC_WINDOW_STEPS = 4


def _timed(step: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of `step` with its device work done (a GPU queues copies and kernels)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def save_shards(module: torch.nn.Module, copy_on_cpu: bool) -> tuple[dict[str, Any], Any]:
    """verl's `save_model_to_cpu` for FSDP2. On a GPU its `.cpu()` is the device-to-host copy;
    on CPU it hands back the parameter itself, so `copy_on_cpu` clones each shard to stand in for
    that copy (and nothing is added where the copy already happened)."""
    from verl.utils.fsdp_utils import fsdp2_sharded_save_to_cpu

    state, spec = fsdp2_sharded_save_to_cpu(module)
    on_cpu = next(module.parameters()).device.type == "cpu"
    if copy_on_cpu and on_cpu:
        state = {name: (tensor.clone(), shard_spec) for name, (tensor, shard_spec) in state.items()}
    return state, spec


def restore_shards(module: torch.nn.Module, saved: tuple[dict[str, Any], Any]) -> None:
    """verl's `restore_model_from_cpu` for FSDP2."""
    from verl.utils.fsdp_utils import fsdp2_sharded_load_from_cpu

    fsdp2_sharded_load_from_cpu(module, *saved)


def update_batch(requests: list[LogProbRequest], old_log_probs: list[torch.Tensor]) -> Any:
    """The batch as `_update_actor` hands it to the worker: left-right padded, old log-probs and
    GRPO-like advantages (one per sequence, alternating sign) per response token, no-padding."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch = scoring_verl.left_right_batch(requests)
    width = batch["responses"].shape[1]
    old = torch.zeros(len(requests), width)
    for row, values in enumerate(old_log_probs):
        old[row, : values.numel()] = values
    signs = torch.tensor([1.0 if row % 2 == 0 else -1.0 for row in range(len(requests))])
    batch["old_log_probs"] = old
    batch["advantages"] = signs[:, None] * batch["response_mask"].float()
    batch = left_right_2_no_padding(batch)
    size = len(requests)
    tu.assign_non_tensor(batch, calculate_entropy=False, global_batch_size=size, mini_batch_size=size, epochs=1,
                         seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=True,
                         temperature=requests[0].temperature, max_token_len_per_gpu=TOKEN_BUDGET)
    return batch


def actor_loss(requests: int) -> Callable[..., Any]:
    """verl's own PPO loss with the actor's defaults (clip 0.2, token-mean), dynamic batch size."""
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    config = FSDPActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=requests, use_dynamic_bsz=True,
                             ppo_max_token_len_per_gpu=TOKEN_BUDGET, use_torch_compile=False)
    return partial(ppo_loss, config=config)


def one_step(verl: Any, requests: list[LogProbRequest], old: tuple[dict[str, Any], Any]) -> dict[str, float]:
    """One decoupled-mode step as verl orders it, each part timed; the update goes last."""
    module = verl.worker.engine.module
    times: dict[str, float] = {}
    with torch.inference_mode(False):
        times["save_s_as_verl_on_cpu"], _ = _timed(lambda: save_shards(module, copy_on_cpu=False))
        times["save_s"], current = _timed(lambda: save_shards(module, copy_on_cpu=True))
        times["restore_old_s"], _ = _timed(lambda: restore_shards(module, old))
        times["recompute_s"], log_probs = _timed(lambda: scoring_verl.verl_recompute(verl, requests))
        times["restore_current_s"], _ = _timed(partial(restore_shards, module, current))
        del current  # verl's clear_cpu_model
        batch = update_batch(requests, log_probs)
        times["update_s"], _ = _timed(lambda: verl.worker.train_mini_batch(batch))
    return times


def measure(verl: Any, requests: list[LogProbRequest], rounds: int) -> dict[str, Any]:
    """The quickest of `rounds` steps after a warm-up step (first-call allocations, the
    optimizer's state), each part as that step took it (a step that happened, not a sum of
    minima from different rounds), and the ratios of what the server removes to the update."""
    verl.worker.set_loss_fn(actor_loss(len(requests)))
    with torch.inference_mode(False):
        old = save_shards(verl.worker.engine.module, copy_on_cpu=True)  # the window's first version (verl's key 1)
    one_step(verl, requests, old)
    steps = [one_step(verl, requests, old) for _ in range(rounds)]
    best = min(steps, key=lambda step: sum(seconds for name, seconds in step.items() if name != "save_s_as_verl_on_cpu"))
    restores = best["restore_old_s"] + best["restore_current_s"]
    removed = best["save_s"] + best["recompute_s"] + restores  # a step after the window's first
    window_mean = best["save_s"] + best["recompute_s"] + restores * (SYNC_WINDOW_STEPS - 1) / SYNC_WINDOW_STEPS
    save_restore = removed - best["recompute_s"]
    parameter_bytes = sum(tensor.numel() * tensor.element_size() for tensor, _ in old[0].values())
    return {
        **best,
        "removed_per_step_s": removed,
        "removed_per_step_window_mean_s": window_mean,
        "sync_window_steps": SYNC_WINDOW_STEPS,
        "save_restore_s": save_restore,
        "removed_over_update": removed / best["update_s"],
        "recompute_over_update": best["recompute_s"] / best["update_s"],
        "save_restore_over_update": save_restore / best["update_s"],
        "removed_share_of_trainer_step": removed / (removed + best["update_s"]),
        "trainer_step_speedup_without_them": (removed + best["update_s"]) / best["update_s"],
        "parameter_bytes": parameter_bytes,
        "copy_bytes_per_step": 3 * parameter_bytes,  # one save, two restores
    }


def run(quick: bool = False) -> dict[str, Any]:
    size = QUICK if quick else FULL
    if not scoring_verl.verl_available():
        return scoring_verl.skipped_figures("")
    torch.manual_seed(0)
    requests = scale_to_tokens(rl_length_mix(size.requests, size.shape.vocab_size), size.max_tokens)
    requests = [r.model_copy(update={"return_entropy": True}) for r in requests]  # the trainer asks for it
    figures: dict[str, Any] = {
        "shape": size.shape.name, "dtype": "float32", "requests": len(requests),
        "tokens": sum(r.num_tokens for r in requests), "response_tokens": sum(r.num_response_tokens for r in requests),
        "rounds": size.rounds, "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-trainer-savings-") as folder:
        path = size.shape.save(Path(folder) / size.shape.key)
        verl = scoring_verl.build_verl(str(path), "float32", TOKEN_BUDGET)
        try:
            figures.update(measure(verl, requests, size.rounds))
        finally:
            verl.close()
    return figures
