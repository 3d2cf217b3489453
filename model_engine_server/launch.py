"""From a resolved config to a running service and its HTTP app.

`build_service(config)` is the one place that decides where the model runs:
- one single-device replica with no Ray address: a `ModelEngineServer` over an engine in this
  process (`build_local_server`), no Ray at all;
- anything else (several replicas, Megatron model parallelism, several nodes, a Ray address):
  `build_replica_service`, the seam where the replica manager of `replica/` plugs in.
Either way the caller gets a `LogProbService` and never learns which.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model_engine_server.config import SECTION, ConfigError, RayConfig, ServerConfig
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService

if TYPE_CHECKING:
    from fastapi import FastAPI

    from model_engine_server.config_loader import LoadedConfig
    from model_engine_server.http.metrics import ServerMetrics

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


def build_service(config: ServerConfig, observer: SchedulerObserver | None = None) -> LogProbService:
    """The service the config describes, ready to score (engines loaded)."""
    _warn_about_later_features(config)
    model_path = ensure_model_path(config)
    if config.in_process:
        from model_engine_server.engines.base import resolve_device
        from model_engine_server.local import build_local_server

        try:
            resolve_device(config.device)
        except ValueError as error:
            raise ConfigError(f"{SECTION}.device={config.device!r}: {error}") from None
        logger.info("building one in-process replica: backend=%s, model=%s", config.backend, model_path)
        return build_local_server(
            config.engine_spec(model_path), config.backend, config.scheduler, observer, config.initial_weight_version
        )
    return build_replica_service(config, model_path, observer)


def build_replica_service(
    config: ServerConfig, model_path: str, observer: SchedulerObserver | None = None
) -> LogProbService:
    """SEAM for the replica layer (`replica/`): start or join Ray (`init_ray(config.ray)`), place
    `config.replicas` replicas of `config.gpus_per_replica` devices each (Megatron sizes in
    `config.megatron`), and return the replica manager, which is a `LogProbService`.
    Until that layer is wired in, a config that needs it is refused with the reason."""
    raise ConfigError(
        f"this config needs Ray replicas ({config.replicas} replica(s) x {config.gpus_per_replica} device(s), "
        f"{SECTION}.nnodes={config.nnodes}, ray.address={config.ray.address!r}), and the replica layer is not "
        f"wired into `serve` in this build; use one single-device replica ({SECTION}.runtime=in_process)"
    )


def init_ray(ray_config: RayConfig) -> None:
    """Join the cluster at `address`, or start an embedded Ray sized by the config."""
    import ray

    if ray.is_initialized():
        return
    if ray_config.address:
        logger.info("joining Ray at %s", ray_config.address)
        ray.init(address=ray_config.address, namespace=ray_config.namespace)
        return
    object_store = ray_config.object_store_memory_mb * (1 << 20) if ray_config.object_store_memory_mb else None
    logger.info("starting an embedded Ray (num_cpus=%s, num_gpus=%s)", ray_config.num_cpus, ray_config.num_gpus)
    ray.init(
        num_cpus=ray_config.num_cpus,
        num_gpus=ray_config.num_gpus,
        object_store_memory=object_store,
        namespace=ray_config.namespace,
        include_dashboard=False,
    )


def _warn_about_later_features(config: ServerConfig) -> None:
    if not config.enable_standalone:
        logger.warning("%s.enable_standalone is false: the trainer will not use this server, serving anyway", SECTION)
    if config.enable_ref_mode:
        logger.warning("%s.enable_ref_mode is accepted but reference-policy serving is not in this build; "
                       "requests asking for ref log-probs get a 400", SECTION)


@dataclass
class Serving:
    """What `serve` runs: the app, the service behind it, and their metrics."""

    app: "FastAPI"
    service: LogProbService
    metrics: "ServerMetrics"
    config: ServerConfig


def build_serving(loaded: "LoadedConfig") -> Serving:
    """Service + metrics + app from a loaded config; the app shuts the service down on exit."""
    from model_engine_server.http.app import create_app
    from model_engine_server.http.metrics import ServerMetrics

    config = loaded.server
    metrics = ServerMetrics()
    service = build_service(config, metrics.observer)
    app = create_app(service, config.http, metrics, default_temperature=config.temperature, owns_service=True)
    return Serving(app, service, metrics, config)
