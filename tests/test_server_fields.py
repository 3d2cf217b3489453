"""The trainer-side rules on their own (`clients.verl.server_fields`): which rows a trainer may
take from the server, on hand-made samples; the verl trainers are tested end to end in
test_verl_fully_async.py and test_verl_trainer_v1.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clients.verl import server_fields as sf
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.protocol import LogProbResult

RULES = TrainerSideConfig(on_missing="recompute", on_stale="rescore", max_version_lag=1)


def _sample(log_probs, entropy=None, version=4, ref=None) -> sf.SampleScores:
    entropy = [1.0] * len(log_probs) if entropy is None else entropy
    return sf.SampleScores(log_probs=log_probs, entropy=entropy, version=version, ref_log_probs=ref, error=None)


@pytest.mark.parametrize("sample, why", [
    (_sample([-1.0, math.nan, -2.0]), "log-probs hold nan at response token 1"),
    (_sample([-1.0, -math.inf, -2.0]), "log-probs hold -inf"),
    (_sample([-1.0, 0.7, 3.0]), "log-probs hold 0.7 at response token 1 (2 such values)"),
    (_sample([-1.0, -2.0, -3.0], entropy=[1.0, math.nan, 0.5]), "entropy hold nan"),
    (_sample([-1.0, -2.0, -3.0], entropy=[1.0, -0.5, 0.5]), "entropy hold -0.5"),
])
def test_values_no_log_prob_can_take_count_as_missing(sample, why):
    plan = sf.plan_batch([sample], [3], 4, RULES)
    assert plan.recompute == [0] and plan.use_server == [] and why in plan.reasons[0]


def test_rounding_on_the_wrong_side_of_zero_is_still_a_log_prob():
    plan = sf.plan_batch([_sample([-1.0, 2e-7, -3.0], entropy=[1.0, -1e-7, 0.0])], [3], 4, RULES)
    assert plan.use_server == [0]


def test_reference_log_probs_are_checked_when_the_trainer_needs_them():
    sample = _sample([-1.0, -2.0], ref=[-1.0, math.inf])
    assert sf.plan_batch([sample], [2], 4, RULES).use_server == [0]
    plan = sf.plan_batch([sample], [2], 4, RULES, need_ref=True)
    assert plan.recompute == [0] and "reference log-probs hold inf" in plan.reasons[0]


def test_a_sample_newer_than_the_old_policy_is_stale_whatever_the_lag():
    behind, current, ahead = (_sample([-1.0], version=v) for v in (3, 4, 5))
    plan = sf.plan_batch([behind, current, ahead], [1, 1, 1], 4, RULES)
    assert plan.use_server == [0, 1] and plan.rescore == [2]
    assert "scored under weight version 5, the old policy is version 4" in plan.reasons[2]


def _result(log_probs, version=4, entropy=True) -> LogProbResult:
    values = np.asarray(log_probs, dtype=np.float32)
    return LogProbResult(request_id="r", log_probs=values, weight_version=version,
                         entropy=np.ones_like(values) if entropy else None)


def test_rescored_answers_are_held_to_the_same_rules():
    good = _result([-1.0, -2.0, -3.0, -4.0])
    assert sf.rescored_results([good], ["a"], [4], 4, RULES) == [good]
    for outcome, why in [(_result([-1.0, -2.0]), "cover 2 tokens, the response has 4"),
                         (_result([-1.0, -2.0, -3.0, -4.0], entropy=False), "no server entropy"),
                         (_result([-1.0, np.nan, -3.0, -4.0]), "log-probs hold nan"),
                         (_result([-1.0, -2.0, -3.0, -4.0], version=5), "rescored under weight version 5")]:
        with pytest.raises(sf.ServerLogProbsUnusable, match="sample-b") as raised:
            sf.rescored_results([good, outcome], ["sample-a", "sample-b"], [4, 4], 4, RULES)
        assert why in str(raised.value) and "sample-a" not in str(raised.value)


def test_a_sample_no_request_can_be_made_of_is_named():
    with pytest.raises(sf.ServerLogProbsUnusable, match="uid-2: cannot be rescored"):
        sf.rescore_requests(["uid-1", "uid-2"], [[1, 2], [3, 4]], [[5], []], 1.0, 4)


def test_the_trainer_finds_the_actor_the_sections_ray_part_names_unless_told_otherwise():
    served = {"ray": {"actor_name": "scorer-a", "namespace": "team-a"}}
    rules = sf.trainer_side_config({"model_engine_server": served})
    assert (rules.actor_name, rules.ray_namespace) == ("scorer-a", "team-a")
    told = sf.trainer_side_config({"model_engine_server": {**served, "trainer": {"actor_name": "other"}}})
    assert (told.actor_name, told.ray_namespace) == ("other", "team-a")
    assert (sf.trainer_side_config({}).actor_name, sf.trainer_side_config({}).ray_namespace) == (
        "model-engine-server", "model-engine-server")


@pytest.mark.parametrize("value", ["rules", 5])
def test_a_trainer_part_that_is_not_a_mapping_is_refused_by_name(value):
    with pytest.raises(ValueError, match="model_engine_server.trainer must be a mapping"):
        sf.trainer_side_config({"model_engine_server": {"trainer": value}})
