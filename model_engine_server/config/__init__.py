"""The `model_engine_server:` section of a training config: what it may say and how it is read.

- `schema.py`: the pydantic models of a valid, fully resolved section (`ServerConfig` and its
  parts) and the placement check; every model forbids unknown keys.
- `scheduler.py`: `SchedulerConfig`, the scheduler's knobs, kept apart from the scheduler (which
  re-exports it) so the schema never imports the scheduler.
- `loader.py`: `load_config(path, overrides, cli_values)`: YAML -> overrides -> aliases and
  inheritance -> validation, each value remembering where it came from (`LoadedConfig`).
- `overrides.py`: command-line overrides in Hydra's grammar.
- `verl.py`: the reference design's vocabulary: keys accepted without effect, other names for
  ours, and the trainer keys unset values follow.
- `verl_engine.py`: `VerlEngineConfig`, the trainer's model and engine settings `backend: verl`
  builds verl's own worker from (copied from `actor_rollout_ref` by `verl.py`).

The `transport:` part is the one `checkpoint_transport.TransportConfig` (the publisher's knobs),
extended by `ServerTransportConfig` with the server's endpoint allow-list.
"""

from checkpoint_transport.spec import TransportConfig
from model_engine_server.config.scheduler import SchedulerConfig
from model_engine_server.config.schema import (
    SECTION,
    Backend,
    ConfigError,
    HttpConfig,
    MegatronParallelConfig,
    RayConfig,
    RefConfig,
    ServerConfig,
    ServerTransportConfig,
    check_placement,
)
from model_engine_server.config.loader import LoadedConfig, load_config, load_training_config

__all__ = [
    "Backend",
    "check_placement",
    "ConfigError",
    "HttpConfig",
    "load_config",
    "load_training_config",
    "LoadedConfig",
    "MegatronParallelConfig",
    "RayConfig",
    "RefConfig",
    "SchedulerConfig",
    "SECTION",
    "ServerConfig",
    "ServerTransportConfig",
    "TransportConfig",
]
