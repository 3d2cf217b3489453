"""Build a scheduler over an engine in this very process: tests, benchmarks, one-device serving."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_engine_server import cpu_heap
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.executor import InProcessExecutor
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.runtimes import register_runtime
from model_engine_server.scheduler_state import SchedulerObserver

if TYPE_CHECKING:
    from model_engine_server.config import ServerConfig


def build_local_server(
    spec: EngineSpec,
    backend: str = "hf",
    scheduler: SchedulerConfig | None = None,
    observer: SchedulerObserver | None = None,
    initial_weight_version: int = 0,
    batch_timeout_s: float = 600.0,
) -> ModelEngineServer:
    """An engine on a worker thread behind a `ModelEngineServer`; the scheduler's token budget
    is also the adapter's micro-batch budget, so one batch is one forward. A batch running past
    `batch_timeout_s` fails, and the engine takes no more work (as a replica's workers)."""
    scheduler = scheduler or SchedulerConfig()
    cpu_heap.apply(spec.cpu_heap, owns_process=False)  # this may be a trainer's process: only if asked
    engine = build_engine(backend, spec)
    adapter = ModelEngineServerAdapter(engine, scheduler.max_tokens_per_batch, spec.logprob_chunk_mb)
    return ModelEngineServer(InProcessExecutor(adapter, batch_timeout_s), scheduler, observer, initial_weight_version)


@register_runtime("in_process")
def build_in_process_service(
    config: "ServerConfig", model_path: str, observer: SchedulerObserver | None, name_prefix: str = "", ray_gpus: int = 0
) -> ModelEngineServer:
    """The `in_process` runtime: one engine on this machine's device, no Ray."""
    from model_engine_server.config import SECTION, ConfigError
    from model_engine_server.engines.base import resolve_device

    try:
        resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(f"{SECTION}.device={config.device!r}: {error}") from None
    return build_local_server(
        config.engine_spec(model_path), config.backend, config.scheduler, observer, config.initial_weight_version,
        config.batch_timeout_s,
    )
