"""`ModelEngineServerActor`: the replica manager inside an async Ray actor, so any Ray actor
(rollout agent loop, trainer) reaches the server through a handle (`clients.ray_client`).

A thin shell: every method translates to the manager and returns wire-plain values (results
as `LogProbResult.to_wire()` dicts with numpy arrays, errors as their `to_wire()` dicts), so
the Ray-handle client rebuilds exactly what the HTTP client does. The manager's placement
groups and workers are owned by this actor; `shutdown()` removes them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import ray
import torch

from model_engine_server.errors import ModelEngineError
from model_engine_server.protocol import LogProbRequest, LogProbResult
from replica.config import ReplicaConfig
from replica.manager import ReplicaManager

DEFAULT_ACTOR_NAME = "model-engine-server"


def outcome_to_wire(outcome: LogProbResult | ModelEngineError) -> dict[str, Any]:
    if isinstance(outcome, ModelEngineError):
        return {"error": outcome.to_wire()}
    return {"result": outcome.to_wire()}


class ModelEngineServerActor:
    """Holds a `ReplicaManager`; created by `start_server_actor`."""

    def __init__(self, config: ReplicaConfig | dict[str, Any]) -> None:
        """Requests that name no temperature are scored at `config.scheduler.default_temperature`."""
        self.config = ReplicaConfig.model_validate(config)
        self.manager = ReplicaManager(self.config)

    async def start(self, timeout_s: float | None = None) -> dict[str, Any]:
        await self.manager.start(timeout_s)
        return self.manager.status()

    async def ping(self) -> bool:
        return True

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        return [outcome_to_wire(o) for o in await self.manager.score(requests, timeout_s)]

    async def pause_serving(self) -> None:
        await self.manager.pause_serving()

    async def resume_serving(self) -> None:
        await self.manager.resume_serving()

    async def begin_weight_update(self, version: int) -> int:
        return await self.manager.begin_weight_update(version)

    async def load_weight_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> list[str]:
        return await self.manager.load_weight_bucket(bucket)

    async def load_weight_bucket_ref(self, bucket_refs: list["ray.ObjectRef"]) -> list[str]:
        """The bucket stays in the caller's object store; workers fetch it from there."""
        names: list[str] = []
        for ref in bucket_refs:
            names += await self.manager.load_weight_bucket(ref)
        return names

    async def receive_weights(self, spec: dict[str, Any], version: int) -> list[dict[str, Any]]:
        """The `checkpoint_transport` target side (`ActorSyncTarget`): reports as dicts."""
        from checkpoint_transport.spec import TransportSpec

        reports = await self.manager.receive_weights(TransportSpec.model_validate(spec), version)
        return [report.to_dict() for report in reports]

    async def commit_weight_update(self, version: int) -> None:
        await self.manager.commit_weight_update(version)

    async def abort_weight_update(self, reason: str) -> None:
        await self.manager.abort_weight_update(reason)

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        return await self.manager.update_weights(named_tensors, version)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        """Check an HF checkpoint folder on this actor's node fits, then load it as `version`."""
        from model_engine_server.weights_from_disk import update_weights_from_disk

        return await update_weights_from_disk(self.manager, model_path, version)

    async def get_status(self) -> dict[str, Any]:
        return self.manager.status()

    async def health(self) -> list[dict[str, Any]]:
        return await self.manager.health()

    async def restart_replica(self, index: int, timeout_s: float | None = None) -> None:
        await self.manager.restart_replica(index, timeout_s)

    async def worker_placements(self) -> list[list[dict[str, Any]]]:
        """Per replica, per rank: where the worker runs (GPU ids, placement group, node)."""
        return [[asdict(info) for info in replica.worker_infos] for replica in self.manager.replicas]

    async def worker_handles(self, replica_index: int) -> list[Any]:
        """The worker actor handles of one replica, by rank (operations and fault drills)."""
        return list(self.manager.replicas[replica_index].workers)

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        await self.manager.shutdown(drain, timeout_s)


async def start_server_actor(
    config: ReplicaConfig,
    name: str | None = DEFAULT_ACTOR_NAME,
    namespace: str | None = None,
    timeout_s: float | None = None,
) -> Any:  # -> ray.actor.ActorHandle
    """Create the server actor (named, so other actors can look it up), start its replicas and
    return its handle; if start-up fails the actor is killed and the error raised."""
    actor_class = ray.remote(ModelEngineServerActor)
    handle = actor_class.options(name=name, namespace=namespace, num_cpus=0, max_concurrency=10_000).remote(config)
    try:
        await handle.start.remote(timeout_s)
    except BaseException:
        ray.kill(handle, no_restart=True)
        raise
    return handle


async def stop_server_actor(handle: Any, drain: bool = True, timeout_s: float = 30.0) -> None:
    """Shut the replicas down (no actor or placement group left), then end the actor."""
    try:
        await handle.shutdown.remote(drain, timeout_s)
    finally:
        ray.kill(handle, no_restart=True)
