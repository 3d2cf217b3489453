"""`demo`: the main job — a fully-async RL loop scored by the server, then the colocated baseline.

The demo is a client of the server (`clients/demo/`), not part of it: it is imported only when
the command runs, so the CLI and the server core import nothing from `clients`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the fully-async RL demo against the colocated baseline")
    parser.add_argument("--mode", choices=["both", "server", "baseline"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="trainer updates (default: 40; rollout-ahead: 30)")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stale-policy", choices=["drop", "keep"], default=None,
                        help="what to do with stale samples (default: drop; rollout-ahead: keep)")
    parser.add_argument(
        "--staleness-limit", type=int, default=None,
        help="K: samples more than K versions old are stale (default: 2; rollout-ahead: 16)",
    )
    parser.add_argument(
        "--preset", choices=["default", "rollout-ahead"], default="default",
        help="rollout-ahead: rollout outpaces training (samples reach staleness 2+), where the loglinear "
        "proximal approximation really interpolates and its error shows",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from clients.demo.config import DemoConfig, rollout_ahead
    from clients.demo.report import comparison
    from clients.demo.run import run_demo

    given = {"steps": args.steps, "staleness_limit": args.staleness_limit, "stale_policy": args.stale_policy}
    chosen = {key: value for key, value in given.items() if value is not None}
    try:  # what was given beats the preset's own choices
        config = rollout_ahead(seed=args.seed, **chosen) if args.preset == "rollout-ahead" else DemoConfig(seed=args.seed, **chosen)
    except ValidationError as error:  # what is wrong with which flag, no traceback
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg'].lower()}"
                             for e in error.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    modes = ["server", "baseline"] if args.mode == "both" else [args.mode]
    try:  # an output folder that cannot be made: one line, before anything runs
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"error: cannot write the demo's output to {args.output_dir}: {error.strerror or error}", file=sys.stderr)
        return 1
    results = run_demo(config, args.output_dir, modes, show_progress=not args.no_progress)  # type: ignore[arg-type]
    print(comparison(results))
    print(f"per-step metrics: {args.output_dir / 'metrics.jsonl'}; plot: {args.output_dir / 'demo.png'}")
    return 0
