"""`config --config FILE [overrides]`: print the resolved model_engine_server section and exit.

Each line says where its value came from (default, file, override, command line, or inherited
from a named trainer key), so a user sees what `serve` would run before starting anything.
The `--config`/overrides arguments defined here are shared with `serve`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="a fully-async training YAML with a model_engine_server: section")
    parser.add_argument("--config-path", help="Hydra style: folder of the YAML (with --config-name)")
    parser.add_argument("--config-name", help="Hydra style: YAML name in --config-path (.yaml optional)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides in Hydra's grammar, e.g. model_engine_server.megatron.tensor_model_parallel_size=2, "
        "+key=value, ++key=value, ~key, trainer.logger=[console,tensorboard]",
    )


def config_file(args: argparse.Namespace) -> Path | None:
    """`--config FILE`, or `--config-path DIR --config-name NAME` as a verl launch script writes it."""
    if args.config and (args.config_path or args.config_name):
        print("error: give either --config or --config-path/--config-name, not both", file=sys.stderr)
        raise SystemExit(2)
    if args.config:
        return Path(args.config)
    if args.config_name:
        name = args.config_name if args.config_name.endswith((".yaml", ".yml")) else f"{args.config_name}.yaml"
        return Path(args.config_path or ".") / name
    if args.config_path:
        print("error: --config-path needs --config-name", file=sys.stderr)
        raise SystemExit(2)
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="print the resolved model_engine_server section (and where each value came from)"
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model_engine_server.config import ConfigError, load_config

    try:
        loaded = load_config(config_file(args), args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(loaded.describe())
    return 0
