"""`import verl` loads our plugin (verl's entry-point group, or `VERL_USE_EXTERNAL_MODULES`),
which registers the trainer mode and the CPU platform lazily; checked in fresh interpreters,
from a folder outside the repository, as a Ray worker would import it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLUGIN_CHECK = """
import sys
import verl
assert "clients.verl.plugin" in sys.modules, "the plugin was not loaded by import verl"
assert "clients.verl.trainer_v1" not in sys.modules, "the trainer was imported eagerly"
from verl.plugin.platform.platform_manager import PlatformRegistry
assert PlatformRegistry.get("cpu") is not None
from verl.trainer.ppo.v1 import get_trainer_cls
from clients.verl.trainer_v1 import PPOTrainerModelEngineServer
assert get_trainer_cls("model_engine_server") is PPOTrainerModelEngineServer
import verl.trainer.ppo.v1 as v1
assert type(v1.__loader__).__name__ == "SourceFileLoader"
print("registered")
"""


def test_import_verl_registers_the_trainer_mode_through_the_plugin(tmp_path):
    """Through the installed entry point, and through VERL_USE_EXTERNAL_MODULES with entry
    points off; in both, from a folder outside the repository, as a Ray worker would."""
    base = {**os.environ, "VERL_PLATFORM": "cpu", "PYTHONPATH": ""}
    envs = {
        "entry point": base,
        "VERL_USE_EXTERNAL_MODULES": {**base, "VERL_USE_EXTERNAL_PLUGINS": "none",
                                      "VERL_USE_EXTERNAL_MODULES": "clients.verl.plugin"},
    }
    runs = {name: subprocess.Popen([sys.executable, "-c", PLUGIN_CHECK], env=env, cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, env in envs.items()}
    agent_loop_present = (ROOT / "clients" / "verl" / "agent_loop.py").is_file()
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0 and "registered" in stdout, f"{name}:\n{stderr[-3000:]}"
        # our agent loop registers once verl's agent-loop package loads (the trainer imports it);
        # when it cannot, the plugin says so itself
        warned = "clients.verl.agent_loop was not registered" in stderr
        assert warned != agent_loop_present, f"{name}:\n{stderr[-3000:]}"

    off = subprocess.run([sys.executable, "-c", "import sys, verl; print('clients.verl.plugin' in sys.modules)"],
                         env={**base, "VERL_USE_EXTERNAL_PLUGINS": "none"}, cwd=tmp_path, text=True,
                         capture_output=True, timeout=240)
    assert off.stdout.strip() == "False", off.stderr[-3000:]
