"""The loglinear proximal approximation and its error measures, on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from clients.demo.proximal_approx import (
    SampleLogProbs,
    approximation_error,
    clipped,
    errors_by_staleness,
    interpolation_weight,
    loglinear_proximal,
    step_metrics,
)


def test_alpha_is_the_proximal_versions_place_between_behaviour_and_current():
    alpha = interpolation_weight(np.array([0, 0, 2, 1]), np.array([1, 0, 3, 3]), np.array([2, 4, 4, 3]))
    np.testing.assert_allclose(alpha, [0.5, 0.0, 0.5, 1.0])


def test_alpha_is_zero_for_fresh_samples_and_clamped_outside_the_span():
    assert interpolation_weight(np.array([3]), np.array([3]), 3)[0] == 0.0  # v_theta == v_behav: no span
    assert interpolation_weight(np.array([1]), np.array([5]), 3)[0] == 1.0  # proximal past current: clamped
    assert interpolation_weight(np.array([2]), np.array([0]), 4)[0] == 0.0  # proximal before behaviour: clamped


def test_loglinear_interpolates_in_log_space_and_hits_both_ends():
    behav, theta = np.array([-2.0, -1.0]), np.array([-1.0, -3.0])
    np.testing.assert_allclose(loglinear_proximal(behav, theta, np.array(0.25)), [-1.75, -1.5])
    np.testing.assert_array_equal(loglinear_proximal(behav, theta, np.array(0.0)), behav)
    np.testing.assert_array_equal(loglinear_proximal(behav, theta, np.array(1.0)), theta)


def test_clip_decision_is_verls_pg_clipfrac_the_clipped_term_binding_for_the_advantages_sign():
    prox = np.zeros(4)
    theta = np.log(np.array([0.7, 0.9, 1.1, 1.3]))
    np.testing.assert_array_equal(clipped(theta, prox, np.full(4, 1.0), 0.2), [False, False, False, True])
    np.testing.assert_array_equal(clipped(theta, prox, np.full(4, -1.0), 0.2), [True, False, False, False])
    np.testing.assert_array_equal(clipped(theta, prox, np.zeros(4), 0.2), [False] * 4)


def test_clip_decision_agrees_with_verls_own_pg_clipfrac():
    torch = pytest.importorskip("torch")
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    rng = np.random.default_rng(0)
    theta, prox = rng.normal(-2, 0.3, (4, 16)), rng.normal(-2, 0.3, (4, 16))
    advantage = np.repeat(rng.normal(size=(4, 1)), 16, axis=1)
    mask = torch.ones(4, 16)
    ratio = torch.from_numpy(np.exp(theta - prox))
    adv = torch.from_numpy(advantage)
    losses_unclipped, losses_clipped = -adv * ratio, -adv * ratio.clamp(0.8, 1.2)
    verl_fraction = core_algos.agg_loss(torch.gt(losses_clipped, losses_unclipped).float(), mask, "token-mean")
    assert clipped(theta, prox, advantage, 0.2).mean() == pytest.approx(float(verl_fraction))


def test_error_counts_flipped_clip_decisions():
    theta = np.log(np.array([1.0, 1.0, 1.0, 1.0]))
    exact = np.log(np.array([1.0, 1.0, 1.0, 1.0]))  # ratio 1: never clipped
    approx = np.log(np.array([1.0, 1.0, 2.0, 2.0]))  # ratio 0.5: clipped where the advantage is negative
    error = approximation_error(exact, approx, theta, np.array([1.0, 1.0, 1.0, -1.0]), eps=0.2)
    assert error.tokens == 4 and error.clip_flip_fraction == 0.25
    assert error.max_abs == pytest.approx(np.log(2.0)) and error.mean_abs == pytest.approx(np.log(2.0) / 2)


def test_error_of_empty_token_set_is_refused():
    with pytest.raises(ValueError, match="no tokens"):
        approximation_error(np.array([]), np.array([]), np.array([]), np.array([]), eps=0.2)


def _sample(v_behav: int, v_prox: int, v_theta: int, exact: float) -> SampleLogProbs:
    return SampleLogProbs(np.full(3, -2.0), np.full(3, exact), np.full(3, -1.0), v_behav, v_prox, v_theta, 1.0)


def test_errors_are_grouped_by_staleness_with_an_interior_group():
    samples = [
        _sample(2, 2, 2, exact=-2.0),  # staleness 0: alpha 0, approx = behaviour = exact
        _sample(1, 2, 2, exact=-1.0),  # staleness 1, scored at current version: alpha 1, exact
        _sample(0, 1, 2, exact=-1.2),  # staleness 2, alpha 0.5: approx -1.5, error 0.3
    ]
    errors = errors_by_staleness(samples, eps=0.2)
    assert list(errors) == ["all", "0", "1", "2", "interior"]
    assert errors["0"].max_abs == 0.0 and errors["1"].max_abs == 0.0
    assert errors["2"].max_abs == pytest.approx(0.3) and errors["interior"].tokens == 3
    assert errors["all"].tokens == 9 and errors["all"].mean_abs == pytest.approx(0.1)


def test_step_metrics_have_flat_overall_keys_and_per_staleness_details():
    metrics = step_metrics([_sample(0, 1, 2, exact=-1.2)], eps=0.2)
    assert metrics["prox_approx_max_abs"] == pytest.approx(0.3)
    assert set(metrics) >= {"prox_approx_mean_abs", "prox_approx_p99_abs", "prox_approx_clip_flip_fraction"}
    assert set(metrics["prox_approx_by_staleness"]) == {"2", "interior"}
