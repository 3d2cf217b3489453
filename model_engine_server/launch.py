"""From a resolved config to a running service and its HTTP app.

`build_service(config)` is the one place that decides where the model runs:
- one single-device replica with no Ray address: a `ModelEngineServer` over an engine in this
  process (`build_local_server`), no Ray at all;
- anything else (several replicas, Megatron model parallelism, several nodes, a Ray address):
  the `ray` runtime of `replica/runtime.py`, a `ReplicaManager` on an embedded or joined Ray.
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
from model_engine_server.runtimes import build_runtime, runtime_name
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService

if TYPE_CHECKING:
    from fastapi import FastAPI

    from model_engine_server.config import LoadedConfig
    from model_engine_server.http.metrics import ServerMetrics
    from model_engine_server.reference import PolicyWithReference

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-qwen2"


def default_model_dir() -> Path:
    """Where `serve` keeps the small model it makes when no model path is configured."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "model-engine-server" / TINY_MODEL_NAME


_ANNOUNCED: set[str] = set()


def ensure_model_path(config: ServerConfig) -> str:
    """The configured checkpoint, or a tiny random Qwen2 made once into the cache folder, so a
    newcomer sees the server work with no model at hand (nothing is downloaded)."""
    if config.model_path:
        return config.model_path
    target = default_model_dir()
    if (target / "config.json").is_file():
        if str(target) not in _ANNOUNCED:  # asked for by several parts of one start-up: said once
            _ANNOUNCED.add(str(target))
            logger.info("no model path configured (%s.model_path or actor_rollout_ref.model.path): "
                        "serving the tiny default model at %s", SECTION, target)
        return str(target)
    from model_engine_server.tiny_model import make_tiny_model

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}-", dir=target.parent))
    make_tiny_model(staging, seed=0, tokenizer=True)  # text prompts on /v1/completions work too
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
    ray_gpus = _ray_gpus(config, reference_config)
    policy = _build_one(config, model_path, observer, "policy", ray_gpus)
    reference = None
    if reference_config is not None:
        assert reference_config.model_path is not None
        reference = _build_one(reference_config, reference_config.model_path, reference_observer, "reference", ray_gpus)
    return PolicyWithReference(policy, reference, observer)


def _ray_gpus(config: ServerConfig, reference_config: ServerConfig | None) -> int:
    return sum(c.total_gpus for c in (config, reference_config) if c is not None and not c.in_process)


def ray_gpus_for(config: ServerConfig) -> int:
    """The logical GPUs the config's services take on Ray (the policy's and the reference's)."""
    reference_config = reference_config_for(config, ensure_model_path(config)) if config.enable_ref_mode else None
    return _ray_gpus(config, reference_config)


REPLICA_NAME_PREFIX = {"policy": "replica", "reference": "replica-ref"}


def _build_one(
    config: ServerConfig, model_path: str, observer: SchedulerObserver | None, role: str, ray_gpus: int
) -> LogProbService:
    """One policy's service on its runtime (`runtimes.py`): in this process, or Ray replicas
    named after its role."""
    logger.info("building the %s on the %s runtime: backend=%s, model=%s", role, runtime_name(config), config.backend, model_path)
    return build_runtime(config, model_path, observer, REPLICA_NAME_PREFIX[role], ray_gpus)


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


def _warn_about_unused_settings(config: ServerConfig) -> None:
    if not config.enable_standalone:
        logger.warning("%s.enable_standalone is false: the trainer will not use this server, serving anyway", SECTION)
    if not config.enable_old_mode:
        logger.warning("%s.enable_old_mode is false: the policy is hosted anyway (every result carries its "
                       "log-probs; weight syncs go to it)", SECTION)


def weight_roots_for(config: ServerConfig) -> list[str]:
    """The folders `update_weights_from_disk` may read: the configured roots, else the parent
    folder of the served model path."""
    return list(config.weight_roots) or [str(Path(ensure_model_path(config)).expanduser().resolve().parent)]


@dataclass
class Serving:
    """What `serve` runs: the app, the service behind it, and their metrics."""

    app: "FastAPI"
    service: LogProbService
    metrics: "ServerMetrics"
    config: ServerConfig


def build_serving(loaded: "LoadedConfig") -> Serving:
    """Service + metrics + app from a loaded config; the app shuts the service down on exit."""
    return build_serving_for(loaded.server)


def build_serving_for(config: ServerConfig, owns_service: bool = True) -> Serving:
    """Service + metrics + app; with `owns_service` the app starts the service and shuts it
    down on exit (else its holder does, e.g. the Ray service actor). The admin routes get the
    transport allow-list and the weight roots (default: the parent folder of the served model
    path) of the config."""
    from model_engine_server.http.app import create_app
    from model_engine_server.http.metrics import ServerMetrics

    metrics = ServerMetrics()
    service = build_service(config, metrics.observer, metrics.reference_observer)
    app = create_app(service, config.http, metrics, owns_service=owns_service,
                     allowed_endpoints=config.transport.allowed_endpoints, weight_roots=weight_roots_for(config),
                     model_path=ensure_model_path(config))
    return Serving(app, service, metrics, config)
