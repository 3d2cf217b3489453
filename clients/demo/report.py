"""What the demo shows when it ends: a PNG of reward, mismatch and timings, and the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clients.demo.loop import RunResult


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for result in results:
        steps = [m["step"] for m in result.steps]
        axes[0].plot(steps, [m["reward"] for m in result.steps], label=result.mode)
        axes[2].plot(steps, [m["trainer_step_s"] for m in result.steps], label=f"{result.mode}: trainer step")
        axes[2].plot(steps, [m["old_log_prob_s"] for m in result.steps], "--", label=f"{result.mode}: old log-prob")
        if any("mismatch_mean_abs" in m for m in result.steps):
            axes[1].plot(steps, [m.get("mismatch_mean_abs", np.nan) for m in result.steps], label="mean |rollout - server|")
            axes[1].plot(steps, [m.get("mismatch_max_abs", np.nan) for m in result.steps], label="max |rollout - server|")
            axes[1].plot(steps, [m.get("mismatch_kl", np.nan) for m in result.steps], label="KL estimate (k3)")
    axes[0].set(title="reward", xlabel="step")
    axes[1].set(title="rollout vs server log-prob mismatch", xlabel="step", yscale="log")
    axes[2].set(title="timings (s)", xlabel="step")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def comparison(results: dict[str, RunResult]) -> str:
    lines = [f"{'mode':<10}{'trainer step (s)':>18}{'old log-prob (s)':>18}{'samples/s':>12}{'reward first->last':>22}"]
    for mode, result in results.items():
        old = float(np.mean([m["old_log_prob_s"] for m in result.steps]))
        rewards = [m["reward"] for m in result.steps]
        head, tail = np.mean(rewards[:5]), np.mean(rewards[-5:])
        lines.append(f"{mode:<10}{result.trainer_step_s:>18.4f}{old:>18.4f}{result.samples_per_s:>12.2f}{head:>12.2f} -> {tail:.2f}")
    if {"server", "baseline"} <= results.keys():
        server, baseline = results["server"], results["baseline"]
        lines.append(
            f"server / baseline: trainer step time x{baseline.trainer_step_s / server.trainer_step_s:.2f} faster, "
            f"end-to-end samples/s x{server.samples_per_s / baseline.samples_per_s:.2f}"
        )
    return "\n".join(lines)
