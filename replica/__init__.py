"""Serving on Ray: per-GPU `ModelEngineWorker` actors, a `ModelEngineReplica` per
model-parallel copy, the `ReplicaManager` that routes across replicas, and the
`ModelEngineServerActor` a Ray-handle client talks to."""

from replica.config import ReplicaConfig
from replica.executor import RayWorkerExecutor
from replica.manager import ReplicaManager
from replica.placement import PlacementTimeout, connect_ray
from replica.replica import ModelEngineReplica
from replica.server_actor import ModelEngineServerActor, start_server_actor, stop_server_actor
from replica.worker import ModelEngineWorker, WorkerInfo

__all__ = [
    "ModelEngineReplica",
    "ModelEngineServerActor",
    "ModelEngineWorker",
    "PlacementTimeout",
    "RayWorkerExecutor",
    "ReplicaConfig",
    "ReplicaManager",
    "WorkerInfo",
    "connect_ray",
    "start_server_actor",
    "stop_server_actor",
]
