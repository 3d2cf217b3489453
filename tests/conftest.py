"""Shared fixtures: tiny checkpoints made once per test session (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from model_engine_server.tiny_model import TinyModelShape, make_tiny_model  # noqa: E402

TINY_SHAPES = {
    "qwen2_tied": TinyModelShape(arch="qwen2", tie_word_embeddings=True),
    "llama_untied": TinyModelShape(arch="llama", tie_word_embeddings=False),
    "qwen3_tied": TinyModelShape(arch="qwen3", tie_word_embeddings=True),
    "qwen2_untied": TinyModelShape(arch="qwen2", tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make_tiny_model(root / name, shape, seed=index) for index, (name, shape) in enumerate(TINY_SHAPES.items())}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen2_tied"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


EMBEDDED_RAY_ARGS = dict(
    num_cpus=16,
    num_gpus=4,
    include_dashboard=False,
    log_to_driver=False,
    # not the server's default namespace: a lookup that works only inside the actor's own
    # namespace fails here, as it would in a trainer's job
    namespace="model-engine-server-tests",
    runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}},
)


def start_embedded_ray() -> None:
    """The session's embedded Ray; also restarted by `tests/multinode.py` after its own cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(**EMBEDDED_RAY_ARGS)


@pytest.fixture(scope="session")
def ray_cluster():  # -> the `ray` module, initialised once for the whole test run
    """One embedded Ray for every test that needs it (start-up costs seconds on 2 cores).

    It declares 4 logical GPUs and more logical CPUs than the machine has, so placement of
    replicas onto GPU bundles is exercised exactly as on a cluster while engines run on CPU.
    Tests must leave no actors or placement groups behind; each Ray test checks that itself.
    The multi-node tests stop it while their own cluster runs and start it again after.
    """
    import ray

    start_embedded_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def training_yaml(tmp_path: Path) -> Path:
    """A small training config with our section, for the config loader's tests."""
    import yaml

    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"logger": ["console"], "name": "run", "steps": 10},
                                    "model_engine_server": {"nnodes": 1}}))
    return path
