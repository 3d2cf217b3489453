"""Approximated proximal log-probs against exact ones: the math, apart from the loop that feeds it.

Decoupled PPO needs log p_prox, the log-prob under a proximal policy between the behaviour policy
(the rollout's, version v_behav) and the policy being trained (v_theta). A trainer without a
scoring server can either recompute it (a forward pass) or, as AReaL's `loglinear` method does,
interpolate in log space by version:

    log p_prox ~= log p_behav + alpha * (log p_theta - log p_behav),
    alpha = (v_prox - v_behav) / (v_theta - v_behav), clamped to [0, 1], and 0 where v_theta <= v_behav.

The server gives the exact value at a known version, so the demo can measure what the
approximation costs: its |error| per token and how often it flips the PPO clip decision, grouped
by staleness
(v_theta - v_behav). The clip decision is verl's `pg_clipfrac` rule: a token is clipped when
the clipped term is the one the loss takes, i.e. the ratio r = p_theta / p_prox is past 1 + eps
with a positive advantage or below 1 - eps with a negative one (a ratio out of range on the other
side changes no gradient). Where v_prox equals v_behav (alpha = 0) or v_theta (alpha = 1) the
interpolation is exact up to numerics by construction; the informative tokens lie in between.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def interpolation_weight(v_behav: np.ndarray, v_prox: np.ndarray, v_theta: np.ndarray | int) -> np.ndarray:
    """alpha per token (versions broadcast): how far the proximal version lies from the
    behaviour version towards the current one."""
    v_behav = np.asarray(v_behav, dtype=np.float64)
    span = np.asarray(v_theta, dtype=np.float64) - v_behav
    gap = np.asarray(v_prox, dtype=np.float64) - v_behav
    alpha = np.divide(gap, span, out=np.zeros(np.broadcast(gap, span).shape), where=span > 0)
    return np.clip(alpha, 0.0, 1.0)


def loglinear_proximal(behav_logp: np.ndarray, theta_logp: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The log-space interpolation between the behaviour and the current log-probs."""
    return behav_logp + alpha * (theta_logp - behav_logp)


def clipped(theta_logp: np.ndarray, prox_logp: np.ndarray, advantage: np.ndarray, eps: float) -> np.ndarray:
    """Whether PPO's clipped term binds at each token (verl's `pg_clipfrac`)."""
    ratio = np.exp(theta_logp - prox_logp)
    return ((advantage > 0) & (ratio > 1 + eps)) | ((advantage < 0) & (ratio < 1 - eps))


@dataclass(frozen=True)
class ApproxError:
    """How far the approximation is from the exact proximal log-probs over a set of tokens."""

    tokens: int
    mean_abs: float
    p99_abs: float
    max_abs: float
    clip_flip_fraction: float  # share of tokens whose clip decision differs

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def approximation_error(
    exact: np.ndarray, approx: np.ndarray, theta_logp: np.ndarray, advantage: np.ndarray, eps: float
) -> ApproxError:
    """|approx - exact| statistics and clip-decision flips over the given tokens (non-empty)."""
    if exact.size == 0:
        raise ValueError("no tokens to compare")
    error = np.abs(approx - exact)
    flips = clipped(theta_logp, exact, advantage, eps) != clipped(theta_logp, approx, advantage, eps)
    return ApproxError(int(exact.size), float(error.mean()), float(np.quantile(error, 0.99)),
                       float(error.max()), float(flips.mean()))


@dataclass(frozen=True)
class SampleLogProbs:
    """One sample's response tokens: the three log-prob sets and the versions behind them."""

    behav: np.ndarray  # rollout log-probs, version v_behav
    exact: np.ndarray  # the server's log-probs, version v_prox
    theta: np.ndarray  # the trainer's current log-probs, version v_theta
    v_behav: int
    v_prox: int
    v_theta: int
    advantage: float  # the sample's (GRPO: every token's)

    def alpha(self) -> np.ndarray:
        return interpolation_weight(np.array(self.v_behav), np.array(self.v_prox), self.v_theta)


def _pooled_error(chosen: list[SampleLogProbs], eps: float) -> ApproxError:
    exact = np.concatenate([s.exact for s in chosen])
    theta = np.concatenate([s.theta for s in chosen])
    approx = np.concatenate([loglinear_proximal(s.behav, s.theta, s.alpha()) for s in chosen])
    advantage = np.concatenate([np.full(s.exact.shape, s.advantage) for s in chosen])
    return approximation_error(exact, approx, theta, advantage, eps)


def errors_by_staleness(samples: list[SampleLogProbs], eps: float) -> dict[str, ApproxError]:
    """`ApproxError` over all tokens (key "all"), per staleness v_theta - v_behav ("0", "1", ...)
    and over the samples whose alpha lies strictly inside (0, 1) ("interior"), if any."""
    groups: dict[str, list[SampleLogProbs]] = {}
    for sample in samples:
        groups.setdefault(str(sample.v_theta - sample.v_behav), []).append(sample)
    out = {"all": _pooled_error(samples, eps)}
    out.update({key: _pooled_error(groups[key], eps) for key in sorted(groups, key=int)})
    interior = [s for s in samples if 0.0 < float(s.alpha()) < 1.0]
    if interior:
        out["interior"] = _pooled_error(interior, eps)
    return out


def step_metrics(samples: list[SampleLogProbs], eps: float) -> dict[str, object]:
    """The demo's per-step metrics: flat keys over all tokens, and the same by staleness (plus
    "interior": the samples the interpolation actually interpolates)."""
    errors = errors_by_staleness(samples, eps)
    overall = errors.pop("all")
    return {
        **{f"prox_approx_{name}": value for name, value in overall.as_dict().items() if name != "tokens"},
        "prox_approx_by_staleness": {key: error.as_dict() for key, error in errors.items()},
    }
