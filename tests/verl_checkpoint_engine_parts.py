"""The verl-side parts of `tests/test_verl_checkpoint_engine.py`: a trainer worker group that
sends weights the way verl's trainer workers do, and a replica of another type (verl's own
rollout worker around an adapter that records what it got)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterator

import ray
import torch
from verl.checkpoint_engine import CheckpointEngineRegistry, CheckpointEngineWorker
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.utils.import_utils import import_external_libs
from verl.workers.config import CheckpointEngineConfig, HFModelConfig, RolloutConfig
from verl.workers.rollout import BaseRollout, RolloutReplica

from clients.verl.checkpoint_engine import BACKEND
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present
from model_engine_server.tiny_model import perturbed_weights

CPU_ENV = {} if accelerator_present() else {"VERL_PLATFORM": "cpu"}
CHECKPOINT_ENGINE = CheckpointEngineConfig(
    backend=BACKEND, update_weights_bucket_megabytes=1, custom_backend_module="clients.verl.checkpoint_engine",
    engine_kwargs={BACKEND: {"timeout_s": 60.0}},
)

# ---------------------------------------------------------------------- the trainer side
class WeightSource(Worker):
    """A trainer worker as verl's own are for the checkpoint engine: the engine built from the
    rollout's `checkpoint_engine` config (`is_master` on rank 0), `update_weights` sending the
    model engine's per-tensor generator through `send_weights`, `execute_checkpoint_engine`
    running the step the manager names. The weights are the checkpoint's, perturbed per sync."""

    def __init__(self, model_dir: str, checkpoint_engine: CheckpointEngineConfig) -> None:
        super().__init__()
        import_external_libs(checkpoint_engine.custom_backend_module)
        self.base = checkpoint_weights(model_dir)
        self.checkpoint_engine = CheckpointEngineRegistry.new(
            checkpoint_engine.backend, is_master=self.rank == 0,
            bucket_size=checkpoint_engine.update_weights_bucket_megabytes << 20,
            **checkpoint_engine.engine_kwargs.get(checkpoint_engine.backend, {}),
        )
        self.plan: dict[str, Any] = {"seed": 0}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def plan_next_sync(self, seed: int, gate: Any = None, die_after: int | None = None) -> None:
        """The next sync sends `new_weights(seed)`; after `gate` opens; dying after `die_after` tensors."""
        self.plan = {"seed": seed, "gate": gate, "die_after": die_after}

    def per_tensor_param(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What a trainer engine's `get_per_tensor_param()` yields: one (HF name, tensor) at a time."""
        plan = self.plan
        for index, (name, tensor) in enumerate(new_weights(self.base, plan["seed"]).items()):
            if index == 0 and plan.get("gate") is not None:
                ray.get(plan["gate"].wait.remote())
            if index == plan.get("die_after"):
                os._exit(1)  # the trainer process dies part-way through the stream
            yield name, tensor

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int | None = None, mode: str = "auto") -> dict:
        return await self.checkpoint_engine.send_weights(self.per_tensor_param(), global_steps=global_steps)

    @register(dispatch_mode=Dispatch.DP_COMPUTE, blocking=False)
    def execute_checkpoint_engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.checkpoint_engine, method)(*args, **kwargs)


def checkpoint_weights(model_dir: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor the engine serves, by HF name, on the CPU."""
    engine = build_engine("hf", EngineSpec(model_path=str(model_dir)))
    return {name: tensor.detach().cpu().clone() for name, tensor in engine.export_weights()}


def new_weights(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    return perturbed_weights(base, seed=seed, scale=0.05)


def trainer_group(model_dir: Path, ranks: int) -> RayWorkerGroup:
    pool = RayResourcePool([ranks], use_gpu=False, max_colocate_count=1)
    worker = RayClassWithInitArgs(ray.remote(WeightSource), model_dir=str(model_dir), checkpoint_engine=CHECKPOINT_ENGINE)
    return RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker, device_name="cpu", worker_env=CPU_ENV)


def remove_group(group: RayWorkerGroup) -> None:
    for worker in group.workers:
        ray.kill(worker, no_restart=True)
    for placement in group.resource_pool.get_placement_groups():
        ray.util.remove_placement_group(placement)


@ray.remote
class Gate:
    """Holds the trainer's stream back until the test has sent its requests."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self) -> None:
        await self._open.wait()

    async def open(self) -> None:
        self._open.set()


# ---------------------------------------------------------------------- another replica type
class RecordingAdapter(BaseRollout):
    """A rollout server adapter that keeps what verl's rollout worker hands it."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig) -> None:
        super().__init__(config, model_config, device_mesh=None)
        self.global_steps: int | None = None
        self.received: dict[str, torch.Tensor] = {}

    async def resume(self, tags: list[str]) -> None:
        pass

    async def release(self) -> None:
        pass

    async def update_weights(self, weights: Any, **kwargs: Any) -> None:
        self.global_steps, self.received = kwargs.get("global_steps"), {}
        async for name, tensor in weights:
            self.received[name] = tensor.clone()


class RecordingRolloutWorker(CheckpointEngineWorker):
    """verl's own rollout worker, unchanged, around the recording adapter."""

    def __init__(self, rollout_config: RolloutConfig, model_config: HFModelConfig, replica_rank: int = 0) -> None:
        super().__init__(rollout_config, model_config, RecordingAdapter(rollout_config, model_config))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def received(self) -> tuple[int | None, dict[str, torch.Tensor]]:
        return self.server_adapter.global_steps, self.server_adapter.received


class RecordingReplica(RolloutReplica):
    """Stands in for a vLLM/SGLang replica in the pool: one verl rollout worker of its own."""

    async def init_standalone(self) -> None:
        self.group = RayWorkerGroup(
            resource_pool=RayResourcePool([1], use_gpu=False, max_colocate_count=1),
            ray_cls_with_init=RayClassWithInitArgs(ray.remote(RecordingRolloutWorker), rollout_config=self.config,
                                                   model_config=self.model_config),
            device_name="cpu", worker_env=CPU_ENV,
        )
        self.workers = self.group.workers

    async def launch_servers(self) -> None:
        pass
