"""Where a policy's engines run, chosen by config: a registry, as engine backends are.

`in_process` (one engine in this process, no Ray) is built in; the Ray runtime of `replica/`
registers itself as `ray` when that package is importable, so this core never imports the
replica layer at module level.
"""

from __future__ import annotations

from typing import Callable

from model_engine_server.config import ServerConfig
from model_engine_server.registry import Registry
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import LogProbService

# (config, model path, observer, name prefix of the replicas, logical GPUs Ray must declare)
RuntimeFactory = Callable[[ServerConfig, str, "SchedulerObserver | None", str, int], LogProbService]


def _load_builtin_runtimes() -> None:
    import model_engine_server.local  # noqa: F401  (registers "in_process")

    try:
        import replica.runtime  # noqa: F401  (registers "ray")
    except ImportError:
        pass


RUNTIMES: Registry[RuntimeFactory] = Registry("runtime", _load_builtin_runtimes)
register_runtime = RUNTIMES.register


def runtime_name(config: ServerConfig) -> str:
    return "in_process" if config.in_process else "ray"


def build_runtime(
    config: ServerConfig, model_path: str, observer: SchedulerObserver | None, name_prefix: str, ray_gpus: int
) -> LogProbService:
    """One policy's service on the runtime the config asks for; an unavailable one says why."""
    return RUNTIMES.get(runtime_name(config))(config, model_path, observer, name_prefix, ray_gpus)
