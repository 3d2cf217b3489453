"""Serving on Ray: per-GPU `ModelEngineWorker` actors, a `ModelEngineReplica` per
model-parallel copy, the `ReplicaManager` that routes across replicas, and the
`LogProbServiceActor` a Ray-handle client talks to, and the `ray` runtime (`runtime.py`)."""

from replica.config import ReplicaConfig
from replica.executor import RayWorkerExecutor
from replica.manager import ReplicaManager
from replica.placement import PlacementTimeout, connect_ray
from replica.replica import ModelEngineReplica
from replica.service_actor import LogProbServiceActor, start_service_actor, stop_service_actor
from replica.worker import ModelEngineWorker, WorkerInfo

__all__ = [
    "ModelEngineReplica",
    "LogProbServiceActor",
    "ModelEngineWorker",
    "PlacementTimeout",
    "RayWorkerExecutor",
    "ReplicaConfig",
    "ReplicaManager",
    "WorkerInfo",
    "connect_ray",
    "start_service_actor",
    "stop_service_actor",
]
