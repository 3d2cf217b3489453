"""Where the installed package keeps its agent-loop YAML (`agent_loop.yaml` beside this file).

verl resolves `agent_loop_config_path` against the working directory or its own install, so a
pip-installed user passes the absolute path `python -m clients.verl.agent_loop_yaml` prints.
"""

from __future__ import annotations

from pathlib import Path

AGENT_LOOP_YAML = Path(__file__).with_name("agent_loop.yaml")

if __name__ == "__main__":
    print(AGENT_LOOP_YAML)
