"""The fully-async entry point (`python -m clients.verl.fully_async_main`) and the shipped 40-GPU
config, against verl's own entry point, runner and config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform

if not accelerator_present():
    use_cpu_platform()  # before verl is used: verl resolves its platform once per process

from omegaconf import OmegaConf  # noqa: E402
from verl.experimental.fully_async_policy import fully_async_main as verl_main  # noqa: E402
from verl.experimental.fully_async_policy.fully_async_trainer import FullyAsyncTrainer  # noqa: E402

from clients.verl import server_fields as sf  # noqa: E402
from clients.verl.fully_async_main import VERL_CONFIG_DIR, ServerLogProbTaskRunner, check_pipeline_config  # noqa: E402
from clients.verl.fully_async_trainer import TRAINER_ACTOR_OPTIONS, ServerLogProbFullyAsyncTrainer  # noqa: E402


def test_the_shipped_40_gpu_config_passes_the_checks_of_the_entry_point_it_is_for():
    """`deploy/fully-async-megatron-40gpu.yaml`, composed by Hydra as verl composes its configs,
    is one the fully-async entry point accepts (it once left multi_turn off, so nothing would have
    been scored), and its trainer finds the server by the actor `serve` runs."""
    from hydra import compose, initialize_config_dir

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    with initialize_config_dir(config_dir=str(deploy), version_base=None):
        config = compose(config_name="fully-async-megatron-40gpu")
    check_pipeline_config(config)
    rules = sf.trainer_side_config(config)
    assert rules.address is None and (rules.actor_name, rules.ray_namespace) == (
        config.model_engine_server.get("ray", {}).get("actor_name", "model-engine-server"), "model-engine-server")


def test_the_shipped_40_gpu_config_holds_every_key_verls_fully_async_config_adds():
    """verl's fully-async code reads keys its own config adds to ppo_megatron_trainer without a
    fallback (`async_training.use_trainer_do_validate` among them); the shipped file inlines that
    config, so each of its keys must be there (values may differ: that is the deployment)."""
    from hydra import compose, initialize_config_dir

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    with initialize_config_dir(config_dir=str(deploy), version_base=None):
        config = compose(config_name="fully-async-megatron-40gpu")
    verls = OmegaConf.load(Path(VERL_CONFIG_DIR) / "fully_async_ppo_megatron_trainer.yaml")
    added = [key for key in _leaf_keys(OmegaConf.to_container(verls)) if key.split(".")[0] not in ("hydra", "defaults")]
    assert added, "verl's fully-async config adds no keys any more?"
    missing = [key for key in added if OmegaConf.select(config, key, default="<missing>") == "<missing>"]
    assert not missing, missing
    assert config.actor_rollout_ref.rollout.checkpoint_engine.backend == "nccl"  # trainer and rollout GPUs apart


def _leaf_keys(node: object, prefix: str = "") -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix.rstrip(".")]
    return [key for name, value in node.items() for key in _leaf_keys(value, f"{prefix}{name}.")]


def test_the_entry_point_runs_verls_own_code_with_our_classes():
    """verl's main and runner look the two classes up by name when they run, which is what the
    entry point rebinds; the actor classes ask Ray for what verl's own ask for."""
    verl_runner = verl_main.FullyAsyncTaskRunner.__ray_actor_class__
    assert ServerLogProbTaskRunner.__mro__[1] is verl_runner
    assert "FullyAsyncTrainer" in verl_runner._create_trainer.__code__.co_names
    assert "FullyAsyncTaskRunner" in verl_main.main.__wrapped__.__code__.co_names
    assert TRAINER_ACTOR_OPTIONS == FullyAsyncTrainer._default_options
    assert issubclass(ServerLogProbFullyAsyncTrainer, FullyAsyncTrainer.__ray_actor_class__)


def test_the_entry_point_composes_verls_config_with_overrides():
    shown = subprocess.run(
        [sys.executable, "-m", "clients.verl.fully_async_main", "--cfg", "job",
         "+model_engine_server.trainer.address=http://10.0.0.1:8000", "algorithm.rollout_correction.bypass_mode=False"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "address: http://10.0.0.1:8000" in shown.stdout and "trigger_parameter_sync_step" in shown.stdout
