"""How the report shows scoring records that older code made, by rules computed from each record.

The records stay as they were measured; these rules keep the rendered page from presenting an
old record's figures as what today's code and command give:

- `predicted_speedup_vs_verl_cpu_rates` from a record whose source shape lacks
  `masked_row_attention_flops` was computed by scaling verl's masked attention with the
  per-sequence FLOPs, the method `bench/scoring_predict.py` replaced (it overstated verl at 7B
  and 32B): such a value is marked "superseded method", not shown as a current prediction;
- a record whose stated command runs other shapes or draws another mix today (the commands
  stayed, the defaults moved: `--quick` once ran the toy alone, real shapes once drew the quick
  toy's 10 requests) gets a line naming what today's command runs;
- `speedup_vs_verl_without_attention` (`scoring_causes.without_attention`) is derived beside
  `speedup_vs_verl` where a record predates it, and labelled as derived wherever it is shown.
"""

from __future__ import annotations

import contextlib
import io
import shlex
from typing import Any

from bench import scoring, shapes
from bench.common import flatten
from bench.scoring_causes import without_attention

SUPERSEDED = ("superseded method: verl's masked attention scaled with the per-sequence FLOPs, "
              "which `bench/scoring_predict.py` no longer does; not a current prediction")
DERIVED = ("derived: `speedup_vs_verl` / `factor_attention`, the GPU-relevant figure: on a GPU verl runs "
           "flash-attn varlen, so the attention cause does not carry over")
DERIVED_KEY = "speedup_vs_verl_without_attention"

Mix = tuple[int | None, int | None]  # (requests, tokens)


def figure_rows(figures: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """`(dotted key, value, remark)` for every figure, with the derived figure added and the
    superseded predictions marked."""
    superseded = predictions_superseded(figures)
    rows = []
    for key, value in flatten(with_derived(figures)):
        remark = ""
        if key.endswith("predicted_speedup_vs_verl_cpu_rates") and superseded:
            remark = SUPERSEDED
        elif key.split(".")[-1].endswith(DERIVED_KEY):
            remark = DERIVED
        rows.append((key, value, remark))
    return rows


def with_derived(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures with `speedup_vs_verl_without_attention` right after `speedup_vs_verl`
    wherever a shape's figures have both factors and lack it."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        out[key] = with_derived(value) if isinstance(value, dict) else value
        if key == "speedup_vs_verl" and DERIVED_KEY not in figures:
            derived = without_attention(figures)
            if derived is not None:
                out[DERIVED_KEY] = derived
    return out


def _shape_figures(figures: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in shapes.MEASURED:
        return {}
    key = shapes.shape_key(name)
    return figures.get(key, {}) if key else figures


def predictions_superseded(figures: dict[str, Any]) -> bool:
    """Whether the CPU-rate predictions came from a shape measured before the masked rows'
    attention was counted (the current `scoring_predict.cpu_rates` returns none from such)."""
    sources = {value.get("cpu_rates_from") for key, value in figures.items()
               if key.startswith("prediction_") and isinstance(value, dict)} - {None}
    return any("masked_row_attention_flops" not in _shape_figures(figures, name) for name in sources)


def command_drift(record: dict[str, Any]) -> str | None:
    """A line saying what the record's command runs today, where that differs from what the
    record holds (shapes, request count or token count); None where they agree or the command
    is not a scoring command this parser reads."""
    today = runs_today(record.get("command", ""))
    if today is None:
        return None
    recorded = recorded_runs(record["figures"])
    if all(recorded.get(name) == mix for name, mix in today.items()):
        return None
    return (f"Recorded with older code: today's command runs {_describe(today)}; "
            f"this record has {_describe(recorded) or 'none of those'}.")


def runs_today(command: str) -> dict[str, Mix] | None:
    """Shape name -> (requests, tokens) that `command` scores with today's code."""
    from bench.__main__ import build_parser

    words = shlex.split(command)
    if "bench" not in words:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(words[words.index("bench") + 1:])
    except SystemExit:
        return None
    if args.name != "scoring":
        return None
    size = scoring.QUICK if args.quick else scoring.FULL
    runs = {}
    for name in args.shape or list(shapes.MEASURED):
        requests = scoring.shape_requests(name, size, args.max_tokens, args.group_size or 1)
        runs[name] = (len(requests), sum(r.num_tokens for r in requests))
    return runs


def recorded_runs(figures: dict[str, Any]) -> dict[str, Mix]:
    """Shape name -> (requests, tokens) of each shape the record measured."""
    runs: dict[str, Mix] = {}
    for name in shapes.MEASURED:
        key = shapes.shape_key(name)
        part = figures.get(key) if key else (figures if "tokens_per_s" in figures else None)
        if isinstance(part, dict):
            runs[name] = (part.get("requests"), part.get("tokens"))
    return runs


def _describe(runs: dict[str, Mix]) -> str:
    return ", ".join(f"{name} ({_count(requests)} requests, {_count(tokens)} tokens)"
                     for name, (requests, tokens) in runs.items())


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
