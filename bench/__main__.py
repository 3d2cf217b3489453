"""`python -m bench NAME [--quick] [--json FILE]`, NAME one of the registered benchmarks or `all`.

A benchmark module exposes `run(quick: bool, **options) -> dict` of figures (the options it
takes are listed in `OPTIONS`) and `targets(figures)` (a list of `bench.common.Target`). This
entry point adds the command, the machine and the target checks, prints a table and writes
JSON; `python -m bench.report` turns JSON files into RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import flatten, format_table, machine_info
from bench.shapes import MEASURED

BENCHMARKS: dict[str, str] = {
    "scoring": "bench.scoring",
    "memory": "bench.memory",
    "serving": "bench.serving",
    "sync": "bench.sync",
    "sync_multinode": "bench.sync_multinode",
    "ref": "bench.ref",
    "profile": "bench.profile",
    "trainer_savings": "bench.trainer_savings",
}

OPTIONS: dict[str, set[str]] = {  # the benchmarks that take options beyond --quick and --json
    "scoring": {"shape", "max_tokens", "group_size", "cpu_heap"},
    "profile": {"shape", "max_tokens", "cpu_heap"},
}


def run_benchmark(name: str, quick: bool, **options: Any) -> dict[str, Any]:
    """`options` (e.g. `shape`, `max_tokens`) go to the benchmark's `run` where given."""
    module = importlib.import_module(BENCHMARKS[name])
    started = time.time()
    figures = module.run(quick=quick, **{key: value for key, value in options.items() if value is not None})
    targets = [target.check(figures) for target in module.targets(figures)]
    return {
        "benchmark": name,
        "command": "python -m bench " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]),
        "quick": quick,
        "machine": machine_info(),
        "started_unix": started,
        "wall_s": time.time() - started,
        "figures": figures,
        "targets": targets,
    }


def print_record(record: dict[str, Any]) -> None:
    print(format_table(flatten(record["figures"]), f"{record['benchmark']} ({'quick' if record['quick'] else 'full'})"))
    for target in record["targets"]:
        verdict = "not measured" if target["measured"] is None else "met" if target["met"] else "MISSED"
        measured = "n/a" if target["measured"] is None else f"{target['measured']:.4g}"
        print(f"  target {target['target']}: {verdict} (measured {measured})")
    print()


def build_parser() -> argparse.ArgumentParser:
    """The command line; the report parses a record's stated command with it too, to tell what
    that command runs today (`bench/report_scoring.py`)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="fewer timings (scoring: the toy's mix smaller, each path timed once; "
                        "every shape takes ~14 minutes on 2 cores, --shape toy ~2)")
    parser.add_argument("--json", type=Path, help="write the figures here (for `all`: one file per benchmark, NAME inserted; `all` "
                        "takes no other option, so its scoring runs every shape)")
    parser.add_argument("--shape", action="append", choices=list(MEASURED),
                        help="scoring and profile, repeatable: model shapes to run (default: every one for scoring, the toy for profile)")
    parser.add_argument("--max-tokens", type=int, help="scoring and profile: scale the real shapes' length mix to ~this many tokens "
                        "(default: 4096)")
    parser.add_argument("--group-size", type=int, help="scoring only: samples per prompt (GRPO groups sharing a prompt)")
    parser.add_argument("--cpu-heap", choices=["keep", "system"],
                        help="scoring and profile: keep freed CPU memory for reuse, as a server process does (default), "
                        "or glibc's default; every path runs under the same one")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {"shape": args.shape, "max_tokens": args.max_tokens, "group_size": args.group_size,
               "cpu_heap": args.cpu_heap}
    given = {name for name, value in options.items() if value is not None}
    if given - OPTIONS.get(args.name, set()):
        parser.error("--shape, --max-tokens and --cpu-heap apply to the scoring and profile benchmarks only, "
                     "--group-size to scoring only")
    if args.group_size is not None and args.group_size < 1:
        parser.error("--group-size must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        record = run_benchmark(name, args.quick, **options)
        print_record(record)
        if args.json:
            path = args.json if len(names) == 1 else args.json.with_name(f"{args.json.stem}-{name}{args.json.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
