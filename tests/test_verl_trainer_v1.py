"""verl's V1 trainer mode `model_engine_server` on real verl objects, on CPU.

Real throughout: verl's shipped Hydra config composed with overrides; the trainer built by its own
`__init__` (what `init()` adds needs a GPU cluster: the tests set `global_steps`, the one piece of
its state the old-log-prob step reads that `init()`'s checkpoint loading would set); TransferQueue
on this session's embedded Ray with verl's `transfer_queue` config; samples put the way
`AgentLoopWorkerTQ._agent_loop_postprocess` puts them (`tests/verl_trainer_v1_samples.py`: real `AgentLoopOutput(...).as_dict()` whose
`extra_fields` hold real server results); a real uvicorn server (HF backend, tiny model, reference
mode); verl's own `TrainingWorker` recompute as the reference (`tests/verl_reference.py`).

The one stand-in is the actor's Ray worker group, for the `recompute` rule: a real one needs GPUs.
It runs verl's `TrainingWorker.infer_batch` through verl's TransferQueue bridge (which reads the
batch from TransferQueue and writes `log_probs`/`entropy` back, as on a worker) and records the
save/restore calls of verl's version-aware path (with one set of weights they are identities).
How `import verl` registers the mode: `tests/test_verl_plugin.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform

if not accelerator_present():
    use_cpu_platform()  # before anything imports verl's trainer: verl resolves its platform once per process

from clients.http_client import SyncHttpLogProbClient  # noqa: E402
from clients.verl import server_fields as sf  # noqa: E402
from model_engine_server.config import load_config  # noqa: E402
from model_engine_server.launch import build_serving  # noqa: E402
from model_engine_server.tiny_model import perturbed_weights  # noqa: E402
from tests.helpers import reference_log_probs, reference_model  # noqa: E402
from tests.test_http_support import ServerThread  # noqa: E402
from tests.verl_reference import left_right_batch, model_path_str, training_worker  # noqa: E402
from tests.verl_trainer_v1_samples import (  # noqa: E402
    InProcessActorGroup, assert_zero_past_responses, make_samples, max_diff, put_like_agent_loop,
    rollout_log_probs, score, scored_batch, verl_recompute, written,
)

TOLERANCE = 1e-5
SECTION = "model_engine_server"
TOKEN = "trainer-v1-admin"


# ---------------------------------------------------------------- fixtures
def server_config(model: Path):
    return load_config(None, [
        f"{SECTION}.model_path={model}", f"{SECTION}.enable_ref_mode=true", f"{SECTION}.device=cpu",
        f"{SECTION}.scheduler.max_wait_ms=1", f"{SECTION}.http.auth_token={TOKEN}",
    ])


@pytest.fixture(scope="module")
def server(tiny_model):
    """The server the scoring agent loop would have used: policy and (frozen) reference, version 0."""
    with ServerThread(build_serving(server_config(tiny_model)).app) as running:
        yield running


@pytest.fixture(scope="module")
def verl_config(tiny_model):
    """verl's shipped `ppo_trainer` config, composed by Hydra with the overrides a user sets."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [
        "trainer.v1.trainer_mode=model_engine_server", "algorithm.rollout_correction.bypass_mode=False",
        f"actor_rollout_ref.model.path={tiny_model}", "actor_rollout_ref.rollout.calculate_log_probs=True",
        # what PPOTrainerSeparateAsync.__init__ checks: a standalone rollout pool and a real sync backend
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
        "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "algorithm.adv_estimator=grpo",
        "+model_engine_server.trainer.join_weight_sync=false",  # an in-process server: these tests deliver no weights
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def transfer_queue(ray_cluster, verl_config):
    """TransferQueue as verl's TaskRunner starts it (`tq.init(config.transfer_queue)`), with one
    storage unit instead of 8: each is a Ray actor process, and this machine has 2 cores."""
    import transfer_queue as tq
    from omegaconf import OmegaConf

    conf = OmegaConf.create(OmegaConf.to_container(verl_config.transfer_queue))
    conf.backend.SimpleStorage.num_data_storage_units = 1
    tq.init(conf)
    yield tq
    tq.close()


@pytest.fixture(scope="module")
def worker(tiny_model):
    return training_worker(model_path_str(tiny_model))


def trainer_for(verl_config, server_url: str, temperature: float = 1.0, global_steps: int = 1, **rules: Any):
    """Our trainer from a copy of the composed config, built by its own `__init__`."""
    from omegaconf import OmegaConf, open_dict

    from clients.verl.trainer_v1 import PPOTrainerModelEngineServer

    config = OmegaConf.create(OmegaConf.to_container(verl_config))
    OmegaConf.set_struct(config, True)
    with open_dict(config):
        config.actor_rollout_ref.rollout.temperature = temperature
        config[SECTION] = {"trainer": {"address": server_url, "join_weight_sync": False, **rules}}
    trainer = PPOTrainerModelEngineServer(config)
    trainer.global_steps = global_steps  # set by init()'s checkpoint loading (0 from scratch, +1 in fit)
    trainer.actor_rollout_wg = InProcessActorGroup(worker=None)  # records snapshots; a recompute needs a worker
    return trainer


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_old_log_probs_and_entropy_equal_verls_own_recompute(transfer_queue, server, verl_config, worker, temperature):
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

    samples = make_samples(f"exact{int(temperature * 10)}", seed=int(temperature * 10))
    batch, _ = scored_batch(transfer_queue, server.url, samples, temperature)
    # what _balance_batch does first: verl's synthetic padding samples up to a multiple of 4
    batch = upsample_batch_to_divisible_size(batch, 4, eos_token_id=2)
    assert len(batch) == 8
    trainer = trainer_for(verl_config, server.url, temperature, on_missing="fail", on_stale="fail")
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(batch, metrics)

    got = written(transfer_queue, batch, "old_log_probs", "entropy")
    expected_log_probs, expected_entropy = verl_recompute(worker, samples, temperature)
    n = len(samples)
    diffs = max_diff(got["old_log_probs"], expected_log_probs, n), max_diff(got["entropy"], expected_entropy, n)
    print(f"T={temperature}: max |server - verl TrainingWorker| log-probs {diffs[0]:.2e}, entropy {diffs[1]:.2e}")
    assert max(diffs) <= TOLERANCE
    assert_zero_past_responses(got["old_log_probs"], samples)
    assert_zero_past_responses(got["entropy"], samples)
    assert torch.count_nonzero(got["old_log_probs"][n:]) == 0 and torch.count_nonzero(got["entropy"][n:]) == 0

    mask = left_right_batch([s.prompt for s in samples], [s.response for s in samples])["response_mask"]
    mask[2, 4:8] = 0  # the tool span of sample 2
    expected_agg = agg_loss(loss_mat=expected_entropy, loss_mask=mask, loss_agg_mode="token-mean").item()
    assert metrics["actor/entropy"] == pytest.approx(expected_agg, abs=TOLERANCE)
    assert metrics["training/rollout_probs_diff_valid"] == 1
    assert metrics["model_engine_server/samples_from_server_total"] == n
    assert metrics["model_engine_server/fraction_from_server"] == 1.0
    assert metrics["model_engine_server/weight_version_lag_max"] == 0
    assert metrics["model_engine_server/rollout_vs_server/log_prob_abs_diff_max"] == pytest.approx(0.03, abs=1e-6)

    # verl's next step consumes what was written: rollout correction (decoupled) and advantages
    trainer._compute_advantage(batch, metrics)
    assert written(transfer_queue, batch, "advantages")["advantages"].shape == (8, max(len(s.response) for s in samples))
    assert "rollout_corr/log_ppl_diff" in metrics


def test_ref_log_prob_from_the_servers_reference_equals_verls_recompute(transfer_queue, server, verl_config, worker):
    samples = make_samples("ref", seed=3)
    batch, _ = scored_batch(transfer_queue, server.url, samples, 1.0)
    trainer = trainer_for(verl_config, server.url, score_ref=True, on_missing="fail")
    metrics: dict[str, Any] = {}
    trainer._compute_ref_log_prob(batch, metrics)
    got = written(transfer_queue, batch, "ref_log_prob")["ref_log_prob"]
    expected, _ = verl_recompute(worker, samples, 1.0)  # the reference is the initial checkpoint
    assert max_diff(got, expected, len(samples)) <= TOLERANCE
    assert_zero_past_responses(got, samples)
    assert metrics["model_engine_server/ref/samples_from_server_total"] == len(samples)


# ---------------------------------------------------------------- rules
def test_a_missing_sample_fails_naming_it(transfer_queue, server, verl_config):
    samples = make_samples("missing", seed=4)
    results = score(server.url, samples, 1.0)
    extra = [sf.result_fields(r) for r in results]
    extra[1] = sf.error_fields("WorkerFailed: the server was restarting")
    batch = put_like_agent_loop(transfer_queue, samples, extra, rollout_log_probs(results))
    trainer = trainer_for(verl_config, server.url, on_missing="fail")
    with pytest.raises(sf.ServerLogProbsUnusable, match=rf"{samples[1].key}: not scored \(WorkerFailed: the server was restarting\)"):
        trainer._compute_old_log_prob(batch, {})


def test_a_missing_reference_fails_naming_it(transfer_queue, server, verl_config):
    samples = make_samples("noref", seed=5)
    results = score(server.url, samples, 1.0)
    extra = [sf.result_fields(r) for r in results]
    extra[3][sf.REF_LOG_PROBS] = None
    batch = put_like_agent_loop(transfer_queue, samples, extra, rollout_log_probs(results))
    trainer = trainer_for(verl_config, server.url, score_ref=True, on_missing="fail")
    with pytest.raises(sf.ServerLogProbsUnusable, match=rf"{samples[3].key}: no server reference log-probs"):
        trainer._compute_ref_log_prob(batch, {})


def test_a_missing_sample_is_recomputed_by_verls_own_path(transfer_queue, server, verl_config, worker):
    samples = make_samples("recompute", seed=6)
    results = score(server.url, samples, 1.0)
    extra = [sf.result_fields(r) for r in results]
    extra[2] = sf.error_fields("DeadlineExceeded: no answer within 600 s")
    batch = put_like_agent_loop(transfer_queue, samples, extra, rollout_log_probs(results))
    trainer = trainer_for(verl_config, server.url, on_missing="recompute")
    trainer.actor_rollout_wg = InProcessActorGroup(worker)
    trainer.local_trigger_step = 0
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(batch, metrics)

    got = written(transfer_queue, batch, "old_log_probs", "entropy")
    expected_log_probs, expected_entropy = verl_recompute(worker, samples, 1.0)
    assert max_diff(got["old_log_probs"], expected_log_probs, len(samples)) <= TOLERANCE
    assert max_diff(got["entropy"], expected_entropy, len(samples)) <= TOLERANCE
    for row in (0, 1, 3, 4):  # the server's numbers, unchanged, for every row it scored
        assert torch.equal(got["old_log_probs"][row, : len(samples[row].response)], torch.from_numpy(results[row].log_probs))
    assert trainer.actor_rollout_wg.calls == [("save_model_to_cpu", 0)]  # π_old is the current weights at step 0
    assert metrics["model_engine_server/samples_recomputed_total"] == 1
    assert metrics["model_engine_server/samples_from_server_total"] == 4


def test_a_later_mini_batchs_recompute_restores_pi_old_saved_at_mini_batch_0_even_when_the_server_scored_it(
    transfer_queue, server, verl_config, worker
):
    samples = make_samples("cycle", seed=9)
    results = score(server.url, samples, 1.0)
    trainer = trainer_for(verl_config, server.url, on_missing="recompute")
    trainer.actor_rollout_wg = InProcessActorGroup(worker)
    trainer.parameter_sync_step = 2
    trainer.local_trigger_step = 0  # every sample scored: verl's own path (which saves π_old) is skipped
    trainer._compute_old_log_prob(put_like_agent_loop(transfer_queue, samples, [sf.result_fields(r) for r in results],
                                                      rollout_log_probs(results)), {})
    assert trainer.actor_rollout_wg.calls == [("save_model_to_cpu", 0)]
    extra = [sf.result_fields(r) for r in results]
    extra[1] = sf.error_fields("WorkerFailed: the server was restarting")
    trainer.local_trigger_step = 1  # the weights were updated after mini-batch 0; π_old is snapshot 0
    trainer._compute_old_log_prob(put_like_agent_loop(transfer_queue, samples, extra, rollout_log_probs(results)), {})
    assert trainer.actor_rollout_wg.calls == [
        ("save_model_to_cpu", 0), ("save_model_to_cpu", 1), ("restore_model_from_cpu", 0),
        ("restore_model_from_cpu", 1), ("clear_cpu_model", 1),
    ]
    single = trainer_for(verl_config, server.url, on_missing="recompute")
    single.actor_rollout_wg, single.parameter_sync_step, single.local_trigger_step = InProcessActorGroup(worker), 1, 0
    single._compute_old_log_prob(put_like_agent_loop(transfer_queue, samples, [sf.result_fields(r) for r in results],
                                                     rollout_log_probs(results)), {})
    assert single.actor_rollout_wg.calls == []  # one mini-batch per cycle: nothing to keep


def test_a_missing_sample_is_rescored_on_the_server(transfer_queue, server, verl_config, worker):
    samples = make_samples("rescore", seed=7)
    results = score(server.url, samples, 0.7)
    extra = [sf.result_fields(r) for r in results]
    extra[0] = sf.error_fields("Overloaded: queue full")
    batch = put_like_agent_loop(transfer_queue, samples, extra, rollout_log_probs(results))
    trainer = trainer_for(verl_config, server.url, temperature=0.7, on_missing="rescore")
    metrics: dict[str, Any] = {}
    trainer._compute_old_log_prob(batch, metrics)
    got = written(transfer_queue, batch, "old_log_probs", "entropy")
    expected_log_probs, expected_entropy = verl_recompute(worker, samples, 0.7)
    assert max_diff(got["old_log_probs"], expected_log_probs, len(samples)) <= TOLERANCE
    assert max_diff(got["entropy"], expected_entropy, len(samples)) <= TOLERANCE
    assert metrics["model_engine_server/samples_rescored_total"] == 1


def test_stale_samples_are_accepted_or_fail_as_configured(transfer_queue, server, verl_config):
    samples = make_samples("stale", seed=8)
    batch, results = scored_batch(transfer_queue, server.url, samples, 1.0)  # scored under version 0
    # step 2: π_old is the weights verl synced after step 1, version 1
    with pytest.raises(sf.ServerLogProbsUnusable, match=rf"{samples[0].key}: scored under weight version 0, the old policy is version 1"):
        trainer_for(verl_config, server.url, global_steps=2, on_stale="fail")._compute_old_log_prob(batch, {})

    metrics: dict[str, Any] = {}
    trainer_for(verl_config, server.url, global_steps=2, on_stale="accept")._compute_old_log_prob(batch, metrics)
    got = written(transfer_queue, batch, "old_log_probs")["old_log_probs"]
    for row, result in enumerate(results):
        assert torch.equal(got[row, : len(result.log_probs)], torch.from_numpy(result.log_probs))
    assert metrics["model_engine_server/samples_accepted_stale_total"] == len(samples)
    assert metrics["model_engine_server/weight_version_lag_max"] == 1

    metrics = {}  # within max_version_lag a sample counts as current
    trainer_for(verl_config, server.url, global_steps=2, on_stale="fail", max_version_lag=1)._compute_old_log_prob(batch, metrics)
    assert metrics["model_engine_server/samples_from_server_total"] == len(samples)


def test_stale_samples_are_rescored_at_the_old_policys_version(transfer_queue, verl_config, tiny_model):
    """The server moves to version 1 (the weights after step 1); samples scored at version 0 are
    rescored there, and what the trainer writes is the new weights' log-probs."""
    samples = make_samples("stalerescore", seed=9)
    new_weights = perturbed_weights(dict(reference_model(tiny_model).named_parameters()), seed=21, scale=0.05)
    with ServerThread(build_serving(server_config(tiny_model)).app) as fresh:
        batch, stale = scored_batch(transfer_queue, fresh.url, samples, 1.0)
        with SyncHttpLogProbClient(fresh.url, admin_token=TOKEN) as admin:
            admin.update_weights(((name, t.detach()) for name, t in new_weights.items()), version=1)
        metrics: dict[str, Any] = {}
        trainer_for(verl_config, fresh.url, global_steps=2, on_stale="rescore")._compute_old_log_prob(batch, metrics)
    got = written(transfer_queue, batch, "old_log_probs", "entropy")
    model = reference_model(tiny_model)
    model.load_state_dict({**model.state_dict(), **new_weights})
    for row, sample in enumerate(samples):
        expected, expected_entropy = reference_log_probs(model, sample.request(1.0))
        n = len(sample.response)
        torch.testing.assert_close(got["old_log_probs"][row, :n], expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(got["entropy"][row, :n], expected_entropy, atol=TOLERANCE, rtol=0)
    assert float((got["old_log_probs"][0, :9] - torch.from_numpy(stale[0].log_probs)).abs().max()) > 1e-3
    assert metrics["model_engine_server/samples_rescored_total"] == len(samples)
    assert metrics["model_engine_server/weight_version_lag_max"] == 0


def test_a_rescore_the_server_cannot_answer_in_time_fails_naming_the_samples(transfer_queue, server, verl_config):
    samples = make_samples("never", seed=10)
    batch, _ = scored_batch(transfer_queue, server.url, samples, 1.0)
    # step 6: π_old is version 5, which this server never reaches
    trainer = trainer_for(verl_config, server.url, global_steps=6, on_stale="rescore", timeout_s=1.0)
    with pytest.raises(sf.ServerLogProbsUnusable, match=rf"{samples[0].key}: rescoring failed: DeadlineExceeded"):
        trainer._compute_old_log_prob(batch, {})

    unreachable = trainer_for(verl_config, "http://127.0.0.1:9", global_steps=6, on_stale="rescore", timeout_s=1.0)
    with pytest.raises(sf.ServerLogProbsUnusable, match=rf"could not rescore 5 samples.*{samples[4].key}"):
        unreachable._compute_old_log_prob(batch, {})


# ---------------------------------------------------------------- configuration
def test_settings_the_server_cannot_serve_are_refused_at_once_and_an_instance_in_bypass_keeps_verls_path(transfer_queue, server, verl_config):
    from omegaconf import OmegaConf, open_dict

    from clients.verl.trainer_v1 import PPOTrainerModelEngineServer

    bypass = OmegaConf.create(OmegaConf.to_container(verl_config))
    bypass.algorithm.rollout_correction.bypass_mode = True
    with pytest.raises(ValueError, match="bypass_mode=False"):
        PPOTrainerModelEngineServer(bypass)
    joining = OmegaConf.create(OmegaConf.to_container(verl_config))
    joining.model_engine_server.trainer.join_weight_sync = True  # the default
    with pytest.raises(RuntimeError, match="no Ray actor 'model-engine-server'.*join_weight_sync=false"):
        PPOTrainerModelEngineServer(joining)  # at once: before verl builds workers or rollout servers
    for key, value, refusal in [("actor_rollout_ref.actor.calculate_sum_pi_squared", True, "calculate_sum_pi_squared"),
                                ("actor_rollout_ref.actor.megatron.router_replay.mode", "R2", "router replay R2")]:
        needs_forward = OmegaConf.create(OmegaConf.to_container(verl_config))
        OmegaConf.update(needs_forward, key, value, force_add=True)
        with pytest.raises(ValueError, match=refusal):  # the forward these need is the one skipped
            PPOTrainerModelEngineServer(needs_forward)

    samples = make_samples("bypass", seed=11)
    batch, results = scored_batch(transfer_queue, server.url, samples, 1.0)
    trainer = trainer_for(verl_config, server.url)
    with open_dict(trainer.config):
        trainer.config.algorithm.rollout_correction.bypass_mode = True
    trainer._compute_old_log_prob(batch, {})
    got = written(transfer_queue, batch, "old_log_probs")["old_log_probs"]
    for row, rollout in enumerate(rollout_log_probs(results)):  # verl's bypass: π_old = the rollout's numbers
        assert torch.equal(got[row, : len(rollout)], torch.tensor(rollout, dtype=torch.float32))


def test_the_mode_reads_its_settings_from_separate_async(verl_config):
    from omegaconf import OmegaConf, open_dict

    from clients.verl.trainer_v1 import PPOTrainerModelEngineServer

    from model_engine_server.config.trainer_side import TrainerSideConfig

    assert sf.trainer_side_config(verl_config) == TrainerSideConfig(join_weight_sync=False)  # the fixture's one key; the rest default
    trainer = trainer_for(verl_config, "http://127.0.0.1:9")
    assert trainer.server_rules.address == "http://127.0.0.1:9"
    assert trainer.parameter_sync_step == verl_config.trainer.v1.separate_async.parameter_sync_step == 4
    assert trainer.config.trainer.v1.model_engine_server == verl_config.trainer.v1.separate_async

    conflicting = OmegaConf.create(OmegaConf.to_container(verl_config))
    with open_dict(conflicting):
        conflicting.trainer.v1.model_engine_server = {"parameter_sync_step": 2}
    with pytest.raises(ValueError, match="trainer.v1.separate_async"):
        PPOTrainerModelEngineServer(conflicting)

    typo = OmegaConf.create(OmegaConf.to_container(verl_config))
    with open_dict(typo):
        typo[SECTION] = {"trainer": {"on_stale": "ignore"}}
    with pytest.raises(ValueError, match="model_engine_server.trainer"):
        PPOTrainerModelEngineServer(typo)
    for section, message in [({"trainr": {"address": "http://x"}}, r"unknown key\(s\) \['trainr'\]"),
                             ("http://x", "must be a mapping")]:  # once silently the defaults
        with open_dict(typo):
            typo[SECTION] = section
        with pytest.raises(ValueError, match=message):
            sf.trainer_side_config(typo)
    with open_dict(typo):  # the server's own keys, aliases and ignored verl keys sit beside `trainer`
        typo[SECTION] = {"backend": "hf", "enable": True, "rollout_n": 4, "trainer": {"on_stale": "accept"}}
    assert sf.trainer_side_config(typo).on_stale == "accept"
