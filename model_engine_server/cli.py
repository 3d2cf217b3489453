"""`model-engine-server`: one entry point, one module per subcommand under `commands/`.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. Modules are imported lazily by name so `--help` stays fast and a command's
heavy imports (Ray, uvicorn) are paid only by that command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# subcommand name -> module under model_engine_server.commands
COMMANDS: dict[str, str] = {
    "make-tiny-model": "make_tiny_model",
    "serve": "serve",
    "config": "config",
    "demo": "demo",
}


def build_parser(available: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-engine-server", description="Standalone asynchronous log-prob server for fully-async RL.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in (available or COMMANDS).values():
        try:
            module = importlib.import_module(f"model_engine_server.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name == f"model_engine_server.commands.{module_name}":
                continue  # a command not written yet in this checkout
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Hydra takes overrides before and after flags alike (`a=b --config f c=d ~e`); argparse binds a
    # positional list once, so overrides after a flag come back unparsed: they are added here, and
    # Hydra's override parser judges them with the rest
    if extra and (not hasattr(args, "overrides") or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
