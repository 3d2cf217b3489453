"""The report tells what a record is: its command, its verdicts, and where older code made it."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from bench import common, report_scoring, scoring
from bench.common import Target
from bench.report import render


def _record(benchmark: str, command: str, figures: dict[str, Any], targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    record = {
        "benchmark": benchmark,
        "command": command,
        "quick": True,
        "machine": {"cpu_cores": 2, "cpu_model": "cpu", "memory_gib": 24, "gpu": None, "torch": "2.13.0"},
        "started_unix": 0,
        "wall_s": 1.0,
        "figures": figures,
        "targets": targets or [],
        "source": "test_record",  # no bench/notes/test_record.md: only the rendered figures
    }
    return json.loads(json.dumps(record))


def test_report_names_command_figures_and_missed_targets():
    figures = {"memory_ratio": 3.5, "max_abs_diff": 1e-6}
    text = render([_record("memory", "python -m bench memory --json x.json", figures,
                           [Target("memory_ratio", ">=", 8.0).check(figures)])])
    assert "`python -m bench memory --json x.json`" in text
    assert "| `memory_ratio` | 3.5 |" in text
    assert "**missed**" in text


def _predicting_record(source_figures: dict[str, Any]) -> dict[str, Any]:
    figures = {"qwen2_5_1_5b": source_figures,
               "prediction_qwen2_5_7b": {"predicted_speedup_vs_verl_cpu_rates": 1.381, "cpu_rates_from": "qwen2.5-1.5b"}}
    return _record("scoring", "python -m bench scoring --shape qwen2.5-1.5b --json x.json", figures)


def test_cpu_rate_predictions_from_before_the_masked_rows_were_counted_read_superseded():
    """A record whose source shape lacks `masked_row_attention_flops` predicted by the per-FLOP
    scaling `bench/scoring_predict.py` replaced; one that has it, by today's method."""
    old = render([_predicting_record({"body_s": 1.0})])
    current = render([_predicting_record({"body_s": 1.0, "masked_row_attention_flops": 3e12})])
    assert "| `prediction_qwen2_5_7b.predicted_speedup_vs_verl_cpu_rates` | 1.381 (superseded method" in old
    assert "| `prediction_qwen2_5_7b.predicted_speedup_vs_verl_cpu_rates` | 1.381 |" in current


def test_a_record_made_before_todays_command_says_what_the_command_runs_now():
    """Computed from the record: shapes today's command runs that the record lacks, or another
    request count, give a line naming today's runs; a record of today's mix gets none."""
    today = report_scoring.runs_today("python -m bench scoring --quick --shape toy --json x.json")
    assert today is not None and today["toy"][0] == scoring.QUICK.requests
    requests, tokens = today["toy"]
    toy_now = {"tokens_per_s": 1.0, "requests": requests, "tokens": tokens}
    current = _record("scoring", "python -m bench scoring --quick --shape toy --json x.json", toy_now)
    fewer = _record("scoring", "python -m bench scoring --quick --shape toy --json x.json", {**toy_now, "requests": 3})
    toy_only = _record("scoring", "python -m bench scoring --quick --json x.json", toy_now)
    assert "older code" not in render([current])
    assert "this record has toy (3 requests" in render([fewer])
    drift = report_scoring.command_drift(toy_only)
    assert drift is not None and "qwen2.5-1.5b (40 requests" in drift and drift in render([toy_only])
    assert report_scoring.command_drift(_record("memory", "python -m bench memory", {})) is None


def test_the_report_derives_the_ratio_without_the_attention_cause():
    """`speedup_vs_verl / factor_attention`, labelled derived, for a record that predates the
    figure; none where the cause split did not run."""
    with_causes = render([_record("scoring", "python -m bench scoring --shape toy",
                                  {"tokens_per_s": 1.0, "speedup_vs_verl": 1.5, "factor_attention": 1.25})])
    without = render([_record("scoring", "python -m bench scoring --shape toy",
                              {"tokens_per_s": 1.0, "speedup_vs_verl": 1.5})])
    assert "| `speedup_vs_verl_without_attention` | 1.2 (derived" in with_causes
    assert "without_attention" not in without


def test_a_record_made_outside_git_says_its_code_revision_is_unknown(monkeypatch):
    def no_git(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert common.code_revision() == "unknown"
    assert common.machine_info()["code"] == "unknown"
