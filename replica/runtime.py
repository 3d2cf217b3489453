"""The `ray` runtime: a policy served by a `ReplicaManager` of Ray replicas.

Registered with `model_engine_server.runtimes` when this package is imported, so the core picks
it by config without importing the replica layer itself. `replica_config_for` derives each
replica's layout from the section (one replica per model-parallel group; data parallelism is
replicas behind the manager).
"""

from __future__ import annotations

import logging

from model_engine_server.config import ServerConfig
from model_engine_server.runtimes import register_runtime
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService
from replica.config import ReplicaConfig
from replica.manager import ReplicaManager
from replica.placement import connect_ray

logger = logging.getLogger(__name__)


@register_runtime("ray")
def build_replica_service(
    config: ServerConfig,
    model_path: str,
    observer: SchedulerObserver | None = None,
    name_prefix: str = "replica",
    ray_gpus: int | None = None,
) -> LogProbService:
    """The seam to the replica layer (`replica/`): join or start Ray (with `ray_gpus` logical
    GPUs when embedded on a machine without CUDA: both policies' when both run on Ray), then a
    `ReplicaManager` of `config.replicas` replicas named `{name_prefix}-{i}` (started by the
    app's start-up, on the serving event loop)."""
    replica_config = replica_config_for(config, model_path)
    join_ray_for(config, replica_config.total_gpus if ray_gpus is None else ray_gpus)
    logger.info(
        "building %d Ray replica(s) %s-* of %d device(s): backend=%s, model=%s",
        replica_config.num_replicas, name_prefix, replica_config.world_size, config.backend, model_path,
    )
    manager = ReplicaManager(replica_config, observer)
    for replica in manager.replicas:  # placement-group names are unique per Ray namespace
        replica.name = f"{name_prefix}-{replica.index}"
    return manager


def join_ray_for(config: ServerConfig, ray_gpus: int) -> None:
    """Join the configured Ray cluster, or start one here sized by `config.ray` (declaring
    `ray_gpus` logical GPUs on a machine without CUDA), in the configured namespace."""
    ray_config = config.ray
    init_kwargs: dict = {"namespace": ray_config.namespace}
    if ray_config.address is None:  # sizes apply to an embedded Ray only
        if ray_config.num_cpus is not None:
            init_kwargs["num_cpus"] = ray_config.num_cpus
        if ray_config.num_gpus is not None:
            init_kwargs["num_gpus"] = ray_config.num_gpus
        if ray_config.object_store_memory_mb is not None:
            init_kwargs["object_store_memory"] = ray_config.object_store_memory_mb << 20
    connect_ray(ray_config.address, num_gpus_needed=ray_gpus, **init_kwargs)


def replica_config_for(config: ServerConfig, model_path: str) -> ReplicaConfig:
    """Map the section onto the replica layer's config: one replica per model-parallel group
    (data parallelism = replicas behind the manager), a group filling whole nodes when it is
    larger than a node."""
    megatron = config.megatron  # its layout was checked with the section (`config.schema.check_placement`)
    per_replica, per_node = config.gpus_per_replica, config.gpus_per_node
    nnodes, gpus_per_node = (1, per_replica) if per_replica <= per_node else (per_replica // per_node, per_node)
    return ReplicaConfig(
        backend=config.backend,
        engine=config.engine_spec(model_path),
        nodes_per_replica=nnodes,
        gpus_per_replica_node=gpus_per_node,
        tensor_model_parallel_size=megatron.tensor_model_parallel_size if config.backend == "megatron" else 1,
        pipeline_model_parallel_size=megatron.pipeline_model_parallel_size if config.backend == "megatron" else 1,
        num_replicas=config.replicas,
        scheduler=config.scheduler,
        initial_weight_version=config.initial_weight_version,
        batch_timeout_s=config.batch_timeout_s,
        weight_bucket_mb=max(1, config.transport.bucket_bytes >> 20),
        ray_address=config.ray.address,
        health_check_interval_s=config.ray.health_check_interval_s,
        auto_restart=config.ray.auto_restart,
        max_restarts=config.ray.max_restarts,
    )
