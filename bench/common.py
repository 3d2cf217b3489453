"""What every benchmark shares: machine facts, targets, peak-memory probes, tables.

Benchmarks print ratios measured side by side in one run, because this machine is shared
and noisy: an absolute figure from one run says little, a ratio of two paths timed
back-to-back says what we want to know.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


# the CPU flags that decide fp32/bf16 GEMM speed (why two CPUs of this project differ)
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    try:
        cpuinfo = open("/proc/cpuinfo").read()
        cpu_model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        info["cpu_model"] = cpu_model.group(1).strip() if cpu_model else platform.processor()
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        present = set(flags.group(1).split()) if flags else set()
        info["cpu_flags"] = [flag for flag in MATRIX_FLAGS if flag in present]
    except OSError:
        info["cpu_model"] = platform.processor()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    info["code"] = code_revision()
    return info


def code_revision() -> str:
    """The commit the benchmark ran from (`+changes` when the tree differed from it), so a
    record can be told from one made by older code; "unknown" outside a git checkout. Every
    record carries it through `machine_info` (records older than it render "not recorded")."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def lookup(figures: dict[str, Any], dotted_key: str) -> Any:
    value: Any = figures
    for part in dotted_key.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Target:
    """A promise a benchmark makes, checked against its own figures (never asserted in tests)."""

    key: str  # dotted path into the figures
    op: str  # ">=" or "<="
    threshold: float | str  # a number, or the dotted key of another figure
    factor: float = 1.0  # threshold multiplier, e.g. 1.1 for "transfer + 10%"

    def describe(self) -> str:
        bound = self.threshold if isinstance(self.threshold, (int, float)) else f"{self.factor:g} x {self.threshold}"
        return f"{self.key} {self.op} {bound}"

    def check(self, figures: dict[str, Any]) -> dict[str, Any]:
        try:
            measured = float(lookup(figures, self.key))
            bound = self.threshold if isinstance(self.threshold, (int, float)) else lookup(figures, self.threshold)
            bound = float(bound) * self.factor
        except (KeyError, TypeError):
            return {"target": self.describe(), "measured": None, "met": False, "why": "figure not measured"}
        met = measured >= bound if self.op == ">=" else measured <= bound
        return {"target": self.describe(), "measured": measured, "bound": bound, "met": met}


def fixed_targets(targets: list[Target]) -> Callable[[dict[str, Any]], list[Target]]:
    """A benchmark's `targets(figures)` when its targets do not depend on what ran. Every
    benchmark module exposes `run(quick, ...)` and `targets(figures)` (`bench/__main__.py`)."""
    return lambda figures: list(targets)


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read())
    if not match:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def measure_peak_bytes(step: Callable[[], Any]) -> tuple[Any, int]:
    """Run `step` and return (its result, the extra memory it needed at its peak).

    On CUDA: `torch.cuda.max_memory_allocated` above what was allocated before. On CPU torch's
    allocator bypasses tracemalloc, so we read the process's peak resident set (VmHWM), reset
    to the current RSS just before the step through /proc/self/clear_refs (Linux).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _proc_status_bytes("VmRSS")
    result = step()
    return result, _proc_status_bytes("VmHWM") - before


def timed_best(step: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Least wall time of `repeats` runs (the least is the least disturbed by other load), and
    the last run's result, so correctness is checked on the very outputs that were timed."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():  # the warm-up's queued kernels are not the first run's
        torch.cuda.synchronize()
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def alternating_best(steps: dict[str, Callable[[], Any]], repeats: int,
                     between: Callable[[], None] | None = None) -> dict[str, tuple[float, Any]]:
    """`timed_best` for several paths at once, one run of each per round, rounds repeated: a
    burst of load from another job then slows every path of that round, not one path's runs.
    Each round starts one path later (as `bench/serving.py` rotates its paths), so no path
    always runs first, right after the untimed set-up.
    No warm-up here: the caller warms every path first (`scoring._measure` does; the cause split
    runs on the engines those paths warmed).
    `between` runs untimed before every step (the scoring benchmarks hand a kept heap back
    there, so one path's freed blocks do not stay resident under the next path's)."""
    times: dict[str, float] = {}
    results: dict[str, Any] = {}
    names = list(steps)
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            if between is not None:
                between()
            seconds, results[name] = timed_best(step, 1, warmup=0)  # outputs of the latest timed run
            times[name] = min(seconds, times.get(name, float("inf")))
    return {name: (times[name], results[name]) for name in steps}


def best_time(step: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return timed_best(step, repeats, warmup)[0]


def format_table(rows: list[tuple[str, Any]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)]
    for name, value in rows:
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{name.ljust(width)}  {shown}")
    return "\n".join(lines)


def flatten(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows.extend(flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows
