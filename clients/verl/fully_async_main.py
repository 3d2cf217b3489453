"""verl's fully-async pipeline with the server's π_old: `python -m clients.verl.fully_async_main`.

Same command line as verl's `python -m verl.experimental.fully_async_policy.fully_async_main`
(the same Hydra config, `fully_async_ppo_trainer`, and overrides), plus the settings that make
the server's numbers reach the trainer (checked before anything starts):

- `algorithm.rollout_correction.bypass_mode=False`: decoupled PPO, the only mode with a π_old;
- `actor_rollout_ref.rollout.multi_turn.enable=True`: otherwise verl's rollouter sets every
  sample's `agent_name` to `single_turn_agent` (`detach_utils.prepare_single_generation_data`)
  and the scoring agent loop never runs;
- `actor_rollout_ref.rollout.agent.agent_loop_config_path=$(python -m clients.verl.agent_loop_yaml)` and
  `actor_rollout_ref.rollout.agent.default_agent_loop=model_engine_server_agent` (a scoring
  loop); a dataset `agent_name` column must name scoring loops only, since verl joins the
  samples with `DataProto.concat`, which needs the same fields on every sample (V1 stores
  fields per sample and takes a mix);
- `+model_engine_server.trainer.address=http://HOST:PORT` (or the Ray actor's name).

verl's main hard-codes its trainer class (`fully_async_main.py`, `_create_trainer`) and its task
runner (`main`). Rather than copy either, this module runs verl's own code with those two names
bound to ours while it runs: `ModelEngineServerTaskRunner` is verl's `FullyAsyncTaskRunner`
whose `_create_trainer` sees `ModelEngineServerFullyAsyncTrainer` as `FullyAsyncTrainer`, and
`main` calls verl's `main` with its config while `FullyAsyncTaskRunner` names our runner.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from verl.experimental.fully_async_policy import fully_async_main as verl_main

from clients.verl.agent_loop import AGENT_NAME, ModelEngineServerAgentLoop
from clients.verl.fully_async_trainer import ModelEngineServerFullyAsyncTrainer, check_trainer_config


VERL_CONFIG_DIR = str(Path(verl_main.__file__).parent / "config")
CONFIG_NAME = "fully_async_ppo_trainer"
AGENT_LOOP_TARGET = f"{ModelEngineServerAgentLoop.__module__}.{ModelEngineServerAgentLoop.__qualname__}"
RUNNER_ACTOR_OPTIONS = {"num_cpus": 1}  # what verl's @ray.remote asks for its task runner


@contextlib.contextmanager
def bound(module: ModuleType, name: str, value: Any) -> Iterator[None]:
    """`module.name` is `value` inside the block, its own value again after it."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class ServerLogProbTaskRunner(verl_main.FullyAsyncTaskRunner.__ray_actor_class__):
    """verl's task runner, building our trainer where it builds `FullyAsyncTrainer`."""

    def _create_trainer(self, config: DictConfig) -> None:
        with bound(verl_main, "FullyAsyncTrainer", ModelEngineServerFullyAsyncTrainer):
            super()._create_trainer(config)


ModelEngineServerTaskRunner = ray.remote(**RUNNER_ACTOR_OPTIONS)(ServerLogProbTaskRunner)


def scoring_agent_loops(config: DictConfig) -> set[str]:
    """Agent-loop names that score on the server: ours, and entries of the configured
    `agent_loop_config_path` YAML targeting it."""
    names = {AGENT_NAME}
    path = config.actor_rollout_ref.rollout.agent.get("agent_loop_config_path")
    if path:
        from verl.utils.import_utils import resolve_config_path

        for entry in OmegaConf.load(resolve_config_path(path)):
            if entry.get("_target_") == AGENT_LOOP_TARGET:
                names.add(str(entry.name))
    return names


def check_pipeline_config(config: DictConfig) -> None:
    """Refuse a configuration under which the trainer could not get the server's numbers."""
    check_trainer_config(config)
    rollout = config.actor_rollout_ref.rollout
    if not rollout.multi_turn.enable:
        raise ValueError(
            "actor_rollout_ref.rollout.multi_turn.enable=False makes verl's fully-async rollouter run every sample "
            "through single_turn_agent, so nothing is scored on the server. Set it True (with "
            f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_NAME})."
        )
    default_loop = rollout.agent.default_agent_loop
    if default_loop not in scoring_agent_loops(config):
        raise ValueError(
            f"actor_rollout_ref.rollout.agent.default_agent_loop={default_loop} does not score on the server. verl's "
            "fully-async rollouter joins samples with DataProto.concat, which fails once a scored sample meets an "
            f"unscored one: set it to {AGENT_NAME} (or a loop of agent_loop_config_path targeting it), and let every "
            "dataset agent_name name a scoring loop."
        )


@hydra.main(config_path=VERL_CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    check_pipeline_config(config)
    with bound(verl_main, "FullyAsyncTaskRunner", ModelEngineServerTaskRunner):
        verl_main.main(config)  # hydra runs a decorated main on a config passed in directly


if __name__ == "__main__":
    main()
