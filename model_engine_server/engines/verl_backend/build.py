"""verl's `TrainingWorker` for one device, built from the trainer's settings (or our defaults).

verl's worker expects a process a Ray worker group would have made: a platform (device, collective
backend), its rank in the environment and the default process group started. A server replica is
one device, so here that is a one-process group (gloo on CPU, NCCL on CUDA) unless the replica
worker formed one already. The worker is set up as the trainer's actor (FSDP with an optimizer
that is never stepped): verl's forward-only variant forces CPU offload with pinned memory, which
copies every parameter per forward on GPU and does not run on CPU at all.

Settings come from `EngineSpec.verl_engine` (the trainer's `actor_rollout_ref.model` and actor
engine section, as the loader copied them) and are turned into verl's own dataclasses with
verl's `omega_conf_to_dataclass`, so a key verl does not know is verl's error, naming it. A few
engine settings only concern training memory (offload of parameters, gradients, optimizer) and
are switched off: the server holds this one model on its device.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from model_engine_server.engines.base import EngineSpec

if TYPE_CHECKING:
    from verl.workers.config import FSDPEngineConfig, HFModelConfig
    from verl.workers.engine_workers import TrainingWorker

logger = logging.getLogger(__name__)

# Engine settings that trade speed for training memory; a server keeps its model resident.
TRAINING_ONLY_ENGINE_KEYS = {"param_offload": False, "optimizer_offload": False, "offload_policy": False,
                             "forward_only": False}


class VerlEngineError(ValueError):
    """A verl engine setting this server cannot serve; the message names the key."""


def select_platform(device: torch.device) -> None:
    """verl's platform for `device`: our CPU platform without CUDA, verl's own nvidia one with it.

    Must run before any `verl.workers` import: verl reads its device name at import time.
    """
    if device.type == "cpu":
        from model_engine_server.engines.verl_backend.cpu_platform import use_cpu_platform

        use_cpu_platform()
    elif device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
    else:
        raise VerlEngineError(f"backend verl runs on cpu or cuda, not {device.type!r}")


# What `build_training_worker` imports; `verl.checkpoint_engine` is the one that records errors
VERL_WORKER_MODULES = ("verl.workers.config", "verl.checkpoint_engine", "verl.workers.engine_workers")


def import_verl_worker_modules() -> None:
    """Import verl's worker modules on a thread of their own, once, after `select_platform`.

    verl keeps the ImportError of each optional checkpoint engine it cannot load
    (`CheckpointEngineRegistry.record_import_error`), traceback included, for the life of the
    process. A traceback keeps every frame of the stack that first imported those modules alive
    with its locals: imported from `VerlEngine.__init__`, that was the engine itself, model and
    all, never freed after `close()` (a benchmark found a closed engine's model still resident).
    On a fresh thread the only frames kept are the thread's own. Call it from code that runs
    after imports (an engine's constructor), never while a module is being imported: the loader
    thread would wait on the import lock the caller holds."""
    if all(name in sys.modules for name in VERL_WORKER_MODULES):
        return
    failures: list[BaseException] = []

    def load() -> None:
        try:
            for name in VERL_WORKER_MODULES:
                importlib.import_module(name)
        except BaseException as error:  # re-raised on the caller's thread
            failures.append(error)

    loader = threading.Thread(target=load, name="verl-import")
    loader.start()
    loader.join()
    if failures:
        raise failures[0]


def ensure_single_process_group(device: torch.device) -> bool:
    """The default group verl's engine builds its device mesh over: a one-process one unless it
    exists (the replica worker's). Returns whether it was created here (then ours to destroy)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        os.environ.setdefault(key, value)  # verl's Worker reads its place from these
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise VerlEngineError(
                f"backend verl serves one device per replica, but this process group has "
                f"{dist.get_world_size()} ranks; set model_engine_server.n_gpus_per_node so each replica has 1 device"
            )
        return False
    # verl's own choice: gloo for CPU tensors beside NCCL for device ones
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def default_attention(device: torch.device) -> str:
    """verl's default is flash-attn; without it (always on CPU) torch's SDPA, which verl's
    remove-padding path runs through transformers' packed-sequence detection."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_settings(spec: EngineSpec, device: torch.device) -> dict[str, Any]:
    """`HFModelConfig` keys: the trainer's, with our checkpoint path and attention choice."""
    values = dict(spec.verl_engine.model)
    values["path"] = spec.model_path  # the server's checkpoint (the reference's in ref mode)
    values.setdefault("load_tokenizer", False)  # token ids in, scores out
    override = dict(values.get("override_config") or {})
    if spec.attn_implementation:
        override["attn_implementation"] = spec.attn_implementation
    else:
        override.setdefault("attn_implementation", default_attention(device))
    values["override_config"] = override
    if int(values.get("lora_rank") or 0) > 0:
        raise VerlEngineError(
            "model_engine_server.verl_engine.model.lora_rank > 0: LoRA adapters are not served by backend verl "
            "(weight syncs address the base model's HF names)"
        )
    if values.get("use_fused_kernels"):
        raise VerlEngineError(
            "model_engine_server.verl_engine.model.use_fused_kernels: verl's fused kernels take one temperature per "
            "batch, while every request carries its own; set it to false for the server"
        )
    return values


def engine_settings(spec: EngineSpec) -> dict[str, Any]:
    """`FSDPEngineConfig` keys: the trainer's engine section (or fp32-style defaults from our
    spec), with the actor's strategy and training-only memory knobs switched off."""
    trainer = spec.verl_engine
    if trainer.engine:
        values = dict(trainer.engine)
    else:  # the server's own defaults: the spec's precision throughout, no compile step
        values = {"model_dtype": spec.dtype, "use_torch_compile": False,
                  "mixed_precision": {"param_dtype": spec.dtype, "reduce_dtype": "float32", "buffer_dtype": "float32"}}
    strategy = trainer.strategy or "fsdp2"
    if strategy == "fsdp":
        # The same module and forward on one device; but FSDP1 (flat parameters, a cloned full
        # state dict) would hide the HF-named parameters that weight syncs load into, and on
        # CPU it cannot even start (module-state sync needs accelerator parameters).
        logger.info("backend verl: strategy fsdp runs as fsdp2 (weight syncs need its per-parameter tensors)")
        strategy = "fsdp2"
    values["strategy"] = strategy
    for key, value in TRAINING_ONLY_ENGINE_KEYS.items():
        if values.get(key, value) != value:
            logger.info("backend verl: %s=%r ignored (a training memory setting); the model stays on its device",
                        key, values[key])
        values[key] = value
    if int(values.get("ulysses_sequence_parallel_size") or 1) != 1:
        raise VerlEngineError(
            "model_engine_server.verl_engine.engine.ulysses_sequence_parallel_size must be 1: backend verl "
            "serves one device per replica"
        )
    return values


def _as_dataclass(values: dict[str, Any], target: str, what: str) -> Any:
    """verl's own conversion (hydra instantiation of `target`, as verl builds its configs from
    the training YAML); its error names the bad key."""
    from verl.utils.config import omega_conf_to_dataclass

    try:
        return omega_conf_to_dataclass({**values, "_target_": target})
    except Exception as error:
        cause = error.__cause__ or error  # hydra wraps the dataclass's own error
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise VerlEngineError(f"model_engine_server.verl_engine.{what}: {detail}") from None


def hf_model_config(spec: EngineSpec, device: torch.device) -> "HFModelConfig":
    return _as_dataclass(model_settings(spec, device), "verl.workers.config.HFModelConfig", "model")


def fsdp_engine_config(spec: EngineSpec) -> "FSDPEngineConfig":
    return _as_dataclass(engine_settings(spec), "verl.workers.config.FSDPEngineConfig", "engine")


def build_training_worker(spec: EngineSpec, device: torch.device) -> "TrainingWorker":
    """verl's worker, initialised (model loaded and sharded) on `device`; the platform and the
    process group must be in place (`select_platform`, `ensure_single_process_group`)."""
    from verl.workers.config import FSDPOptimizerConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=hf_model_config(spec, device),
        engine_config=fsdp_engine_config(spec),
        optimizer_config=FSDPOptimizerConfig(lr=1e-6),  # verl's FSDP actor wants one; never stepped
    )
    worker = TrainingWorker(config)
    worker.reset()
    return worker
