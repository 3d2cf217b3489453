"""From a resolved config to a running service and its HTTP app.

`build_service(config)` is the one place that decides where the model runs:
- one single-device replica with no Ray address: a `ModelEngineServer` over an engine in this
  process (`build_local_server`), no Ray at all;
- anything else (several replicas, Megatron model parallelism, several nodes, a Ray address):
  `build_replica_service`, a `ReplicaManager` of `replica/` on an embedded or joined Ray.
Either way the caller gets a `LogProbService` and never learns which. In reference mode
(`enable_ref_mode`) the frozen reference policy gets a service of its own, decided the same way
from the `ref` sizes, and `PolicyWithReference` puts both behind the one service.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_engine_server.config import SECTION, ConfigError, ServerConfig
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService

if TYPE_CHECKING:
    from fastapi import FastAPI

    from model_engine_server.config_loader import LoadedConfig
    from model_engine_server.http.metrics import ServerMetrics
    from model_engine_server.reference import PolicyWithReference
    from replica.config import ReplicaConfig

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-qwen2"


def default_model_dir() -> Path:
    """Where `serve` keeps the small model it makes when no model path is configured."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "model-engine-server" / TINY_MODEL_NAME


def ensure_model_path(config: ServerConfig) -> str:
    """The configured checkpoint, or a tiny random Qwen2 made once into the cache folder, so a
    newcomer sees the server work with no model at hand (nothing is downloaded)."""
    if config.model_path:
        return config.model_path
    target = default_model_dir()
    if (target / "config.json").is_file():
        logger.info("no model path configured (%s.model_path or actor_rollout_ref.model.path): "
                    "serving the tiny default model at %s", SECTION, target)
        return str(target)
    from model_engine_server.tiny_model import make_tiny_model

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=target.parent))
    make_tiny_model(staging, seed=0)
    try:
        staging.rename(target)  # atomic: a concurrent `serve` sees a whole checkpoint or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process made it first
    logger.info("no model path configured: made a tiny random Qwen2 checkpoint at %s and serve it "
                "(set %s.model_path or actor_rollout_ref.model.path to serve a real model)", target, SECTION)
    return str(target)


def build_service(
    config: ServerConfig,
    observer: SchedulerObserver | None = None,
    reference_observer: SchedulerObserver | None = None,
) -> "PolicyWithReference":
    """The service the config describes: the policy, and in reference mode the reference beside
    it (engines loaded; Ray replicas start with the app). `reference_observer` counts the
    reference's scheduler events (`ServerMetrics.reference_observer`)."""
    from model_engine_server.reference import PolicyWithReference

    _warn_about_unused_settings(config)
    model_path = ensure_model_path(config)
    reference_config = reference_config_for(config, model_path) if config.enable_ref_mode else None
    ray_gpus = sum(c.total_gpus for c in (config, reference_config) if c is not None and not c.in_process)
    policy = _build_one(config, model_path, observer, "policy", ray_gpus)
    reference = None
    if reference_config is not None:
        assert reference_config.model_path is not None
        reference = _build_one(reference_config, reference_config.model_path, reference_observer, "reference", ray_gpus)
    return PolicyWithReference(policy, reference, observer)


REPLICA_NAME_PREFIX = {"policy": "replica", "reference": "replica-ref"}


def _build_one(
    config: ServerConfig, model_path: str, observer: SchedulerObserver | None, role: str, ray_gpus: int
) -> LogProbService:
    """One policy's service: in this process, or Ray replicas named after its role."""
    if config.in_process:
        from model_engine_server.engines.base import resolve_device
        from model_engine_server.local import build_local_server

        try:
            resolve_device(config.device)
        except ValueError as error:
            raise ConfigError(f"{SECTION}.device={config.device!r}: {error}") from None
        logger.info("building the %s as one in-process replica: backend=%s, model=%s", role, config.backend, model_path)
        return build_local_server(
            config.engine_spec(model_path), config.backend, config.scheduler, observer, config.initial_weight_version,
            config.batch_timeout_s,
        )
    return build_replica_service(config, model_path, observer, REPLICA_NAME_PREFIX[role], ray_gpus)


def reference_config_for(config: ServerConfig, model_path: str) -> ServerConfig:
    """The reference policy's own section: `ref_model_path` (default: the policy's checkpoint,
    i.e. its initial weights) on `ref.nnodes` x `ref.n_gpus_per_node` devices (default: the
    policy's), with the policy's backend, parallel layout, precision and scheduler."""
    from pydantic import ValidationError

    ref = config.ref
    ref_path = os.path.expanduser(config.ref_model_path) if config.ref_model_path else model_path
    if not (Path(ref_path) / "config.json").is_file():
        raise ConfigError(f"{SECTION}.ref_model_path={ref_path!r} is not an HF checkpoint folder (no config.json)")
    sized = ref.nnodes is not None or ref.n_gpus_per_node is not None
    values = config.model_dump()
    values.update(
        model_path=ref_path,
        enable_ref_mode=False,
        ref_model_path=None,
        ref={},
        nnodes=ref.nnodes or config.nnodes,
        n_gpus_per_node=ref.n_gpus_per_node or config.n_gpus_per_node,
        num_replicas=None if sized else config.num_replicas,
        initial_weight_version=0,
    )
    try:
        return ServerConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(f"{SECTION}.ref (the reference policy's devices): {message}") from None


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
    from replica.manager import ReplicaManager
    from replica.placement import connect_ray

    replica_config = replica_config_for(config, model_path)
    ray_config = config.ray
    init_kwargs: dict = {"namespace": ray_config.namespace}
    if ray_config.address is None:  # sizes apply to an embedded Ray only
        if ray_config.num_cpus is not None:
            init_kwargs["num_cpus"] = ray_config.num_cpus
        if ray_config.num_gpus is not None:
            init_kwargs["num_gpus"] = ray_config.num_gpus
        if ray_config.object_store_memory_mb is not None:
            init_kwargs["object_store_memory"] = ray_config.object_store_memory_mb << 20
    needed = replica_config.total_gpus if ray_gpus is None else ray_gpus
    connect_ray(ray_config.address, num_gpus_needed=needed, **init_kwargs)
    logger.info(
        "building %d Ray replica(s) %s-* of %d device(s): backend=%s, model=%s",
        replica_config.num_replicas, name_prefix, replica_config.world_size, config.backend, model_path,
    )
    manager = ReplicaManager(replica_config, observer)
    for replica in manager.replicas:  # placement-group names are unique per Ray namespace
        replica.name = f"{name_prefix}-{replica.index}"
    return manager


def replica_config_for(config: ServerConfig, model_path: str) -> "ReplicaConfig":
    """Map the section onto the replica layer's config: one replica per model-parallel group
    (data parallelism = replicas behind the manager), a group filling whole nodes when it is
    larger than a node."""
    from replica.config import ReplicaConfig

    megatron = config.megatron
    if config.backend == "megatron":
        unsupported = {
            "context_parallel_size": megatron.context_parallel_size != 1,
            "expert_model_parallel_size": megatron.expert_model_parallel_size != 1,
            "virtual_pipeline_model_parallel_size": megatron.virtual_pipeline_model_parallel_size is not None,
        }
        named = [f"{SECTION}.megatron.{key}" for key, used in unsupported.items() if used]
        if named:
            raise ConfigError(f"{', '.join(named)}: not supported by this build's Megatron engine (TP and PP are)")
    per_replica, per_node = config.gpus_per_replica, config.gpus_per_node
    nnodes, gpus_per_node = (1, per_replica) if per_replica <= per_node else (per_replica // per_node, per_node)
    return ReplicaConfig(
        backend=config.backend,
        engine=config.engine_spec(model_path),
        nnodes=nnodes,
        n_gpus_per_node=gpus_per_node,
        tensor_model_parallel_size=megatron.tensor_model_parallel_size if config.backend == "megatron" else 1,
        pipeline_model_parallel_size=megatron.pipeline_model_parallel_size if config.backend == "megatron" else 1,
        num_replicas=config.replicas,
        scheduler=config.scheduler,
        initial_weight_version=config.initial_weight_version,
        batch_timeout_s=config.batch_timeout_s,
        weight_bucket_mb=config.transport.bucket_mb,
        ray_address=config.ray.address,
        health_check_interval_s=config.ray.health_check_interval_s,
        auto_restart=config.ray.auto_restart,
        max_restarts=config.ray.max_restarts,
    )


def _warn_about_unused_settings(config: ServerConfig) -> None:
    if not config.enable_standalone:
        logger.warning("%s.enable_standalone is false: the trainer will not use this server, serving anyway", SECTION)
    if not config.enable_old_mode:
        logger.warning("%s.enable_old_mode is false: the policy is hosted anyway (every result carries its "
                       "log-probs; weight syncs go to it)", SECTION)


@dataclass
class Serving:
    """What `serve` runs: the app, the service behind it, and their metrics."""

    app: "FastAPI"
    service: LogProbService
    metrics: "ServerMetrics"
    config: ServerConfig


def build_serving(loaded: "LoadedConfig") -> Serving:
    """Service + metrics + app from a loaded config; the app shuts the service down on exit.
    The admin routes get the transport allow-list and the weight roots (default: the parent
    folder of the served model path) of the config."""
    from model_engine_server.http.app import create_app
    from model_engine_server.http.metrics import ServerMetrics

    config = loaded.server
    metrics = ServerMetrics()
    service = build_service(config, metrics.observer, metrics.reference_observer)
    weight_roots = config.weight_roots or [str(Path(ensure_model_path(config)).expanduser().resolve().parent)]
    app = create_app(service, config.http, metrics, owns_service=True,
                     allowed_endpoints=config.transport.allowed_endpoints, weight_roots=weight_roots)
    return Serving(app, service, metrics, config)
