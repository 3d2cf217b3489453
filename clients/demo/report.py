"""What the demo shows when it ends: a PNG of reward, mismatch and timings, and the comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clients.demo.loop import RunResult


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(20, 4))
    for result in results:
        steps = [m["step"] for m in result.steps]
        axes[0].plot(steps, [m["reward"] for m in result.steps], label=result.mode)
        axes[2].plot(steps, [m["trainer_step_s"] for m in result.steps], label=f"{result.mode}: trainer step")
        axes[2].plot(steps, [m["old_log_prob_s"] for m in result.steps], "--", label=f"{result.mode}: old log-prob")
        if any("mismatch_mean_abs" in m for m in result.steps):
            axes[1].plot(steps, [m.get("mismatch_mean_abs", np.nan) for m in result.steps], label="mean |rollout - server|")
            axes[1].plot(steps, [m.get("mismatch_max_abs", np.nan) for m in result.steps], label="max |rollout - server|")
            axes[1].plot(steps, [m.get("mismatch_kl", np.nan) for m in result.steps], label="KL estimate (k3)")
        if result.mode == "server":
            _plot_approximation(axes[3], result)
    axes[0].set(title="reward", xlabel="step")
    axes[1].set(title="rollout vs server log-prob mismatch", xlabel="step", yscale="log")
    axes[2].set(title="timings (s)", xlabel="step")
    for axis in axes:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_approximation(axis, result: RunResult) -> None:
    """loglinear proximal approximation against the server's exact values, per step."""
    steps = [m["step"] for m in result.steps]
    axis.plot(steps, [m.get("prox_approx_mean_abs", np.nan) for m in result.steps], label="mean |approx - exact|")
    axis.plot(steps, [m.get("prox_approx_p99_abs", np.nan) for m in result.steps], label="p99 |approx - exact|")
    axis.plot(steps, [m.get("prox_approx_max_abs", np.nan) for m in result.steps], label="max |approx - exact|")
    axis.plot(steps, [m.get("prox_approx_clip_flip_fraction", np.nan) for m in result.steps], "--",
              label="clip decision flipped (fraction)")
    axis.set(title="loglinear proximal approximation vs exact (server)", xlabel="step", yscale="symlog")
    axis.set_yscale("symlog", linthresh=1e-6)


def approximation_summary(result: RunResult) -> str:
    """The run's loglinear approximation error by staleness, pooled over steps: token-weighted
    mean |error| and clip-flip share, the largest step p99 and the largest |error|."""
    pooled: dict[str, list[dict]] = {}
    for metrics in result.steps:
        for staleness, error in metrics.get("prox_approx_by_staleness", {}).items():
            pooled.setdefault(staleness, []).append(error)
    lines = [f"{'staleness':<10}{'tokens':>9}{'mean |err|':>12}{'max step p99':>14}{'max |err|':>11}{'clip flips':>12}"]
    for staleness in sorted(pooled, key=lambda key: 1 << 30 if key == "interior" else int(key)):
        errors = pooled[staleness]
        tokens = sum(e["tokens"] for e in errors)
        mean = sum(e["mean_abs"] * e["tokens"] for e in errors) / tokens
        flips = sum(e["clip_flip_fraction"] * e["tokens"] for e in errors) / tokens
        lines.append(f"{staleness:<10}{tokens:>9}{mean:>12.3g}{max(e['p99_abs'] for e in errors):>14.3g}"
                     f"{max(e['max_abs'] for e in errors):>11.3g}{flips:>12.2%}")
    return "\n".join(lines)


def comparison(results: dict[str, RunResult]) -> str:
    lines = [f"{'mode':<10}{'trainer step (s)':>18}{'old log-prob (s)':>18}{'samples/s':>12}{'reward first->last':>22}"]
    for mode, result in results.items():
        old = float(np.mean([m["old_log_prob_s"] for m in result.steps]))
        rewards = [m["reward"] for m in result.steps]
        head, tail = np.mean(rewards[:5]), np.mean(rewards[-5:])
        lines.append(f"{mode:<10}{result.trainer_step_s:>18.4f}{old:>18.4f}{result.samples_per_s:>12.2f}{head:>12.2f} -> {tail:.2f}")
    if {"server", "baseline"} <= results.keys():
        server, baseline = results["server"], results["baseline"]
        speedup = baseline.trainer_step_s / server.trainer_step_s
        lines.append(
            f"server / baseline: trainer step time x{speedup:.2f} ({'faster' if speedup >= 1 else 'slower'}), "
            f"end-to-end samples/s x{server.samples_per_s / baseline.samples_per_s:.2f}"
        )
    if "server" in results and any("prox_approx_by_staleness" in m for m in results["server"].steps):
        lines += ["", "AReaL loglinear proximal approximation vs the server's exact old log-probs (server run):",
                  approximation_summary(results["server"])]
    return "\n".join(lines)
