"""The acceptance check of the v0 fully-async integration: π_old from the server equals verl's own.

A batch of real `AgentLoopOutput`s (varied prompt and response lengths, two with tool tokens
masked 0 in `response_mask`) is scored through the scoring agent loop's own function on a real
server (uvicorn on 127.0.0.1, HF backend, ref mode on), assembled exactly as verl assembles it
(a real `AgentLoopWorker`'s `_agent_loop_postprocess` + `_postprocess` per sample, the
rollouter's uid, `assemble_batch_from_rollout_samples` as the trainer calls it, the temperature
`_fit_generate` sets) and handed to `ServerLogProbFullyAsyncTrainer._compute_old_log_prob`,
whose `old_log_probs` / `entropys` must equal verl's own `TrainingWorker` recompute of the same
batch (`tests/verl_reference.py`) within 1e-5 in fp32, with exact zeros past every response, at
two temperatures. Then the rules: missing -> recompute (verl's own save/restore path, its rows
only) / rescore / fail naming the samples; stale -> rescore (waiting for the version, bounded) /
accept / recompute / fail; and the reference log-probs with `score_ref`.

How the trainer is built: through its real `__init__` (verl's `FullyAsyncTrainer.__init__`
included) from verl's composed Hydra config. `init_workers` is not called: it builds Ray
resource pools of GPU bundles and one worker process per rank, which this CPU machine cannot
host. Its one product `_compute_old_log_prob` needs, `actor_rollout_wg`, is set to a real
`DetachActorWorker` (the class verl's fully-async main uses for the actor) built in this process,
behind a one-rank forwarding group (`tests/verl_pipeline.py`). verl's reference worker cannot run
on CPU (its forward-only engine forces pinned memory), so the reference's recompute path is not
exercised here; its server path is. The entry point and the shipped config:
`tests/test_verl_fully_async_entry.py`.
"""

from __future__ import annotations

import asyncio
import copy
import random
from pathlib import Path
from typing import Any

from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform

if not accelerator_present():
    use_cpu_platform()  # before verl is used: verl resolves its platform once per process

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl.utils.debug.metrics import calculate_debug_metrics  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerClient  # noqa: E402

from clients.http_client import HttpLogProbClient  # noqa: E402
from clients.verl import server_fields as sf  # noqa: E402
from clients.verl.agent_loop import attach_server_fields  # noqa: E402
from clients.verl.fully_async_main import check_pipeline_config  # noqa: E402
from clients.verl.fully_async_trainer import (  # noqa: E402
    ServerLogProbFullyAsyncTrainer,
    VerlFullyAsyncTrainer,
)
from model_engine_server.protocol import LogProbRequest  # noqa: E402
from model_engine_server.tiny_model import make_tiny_model, perturbed_weights  # noqa: E402
from tests.verl_pipeline import (  # noqa: E402
    RESPONSE_LENGTH,
    InProcessWorkerGroup,
    assemble,
    compose_fully_async,
    cpu_overrides,
    detach_actor_worker,
    sample,
    save_tokenizer,
    served,
    with_settings,
)
from tests.verl_reference import model_path_str, recompute, training_worker  # noqa: E402

TOLERANCE = 1e-5
TEMPERATURES = (1.0, 0.6)
RULES = "model_engine_server.trainer"
# (prompt length, response segments): "gen" tokens sampled from the model, "tool" tokens masked 0
SHAPES = [
    (5, [("gen", 3)]), (17, [("gen", 9)]), (30, [("gen", 4), ("tool", 5), ("gen", 6)]),
    (9, [("gen", 20)]), (12, [("gen", 2), ("tool", 3), ("gen", 1)]), (24, [("gen", 11)]),
]
UNSCORED_ROWS = (1, 4)
VERL_LAYOUT = ("prompts", "responses", "input_ids", "attention_mask", "response_mask", "position_ids")
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = make_tiny_model(tmp_path_factory.mktemp("verl_fully_async") / "model")
    save_tokenizer(model)
    return model


@pytest.fixture(scope="module")
def server(model_dir):
    with served(model_dir, ref_mode=True) as running:
        yield running


@pytest.fixture(scope="module")
def config(model_dir, server):
    return compose_fully_async(cpu_overrides(model_dir, server.url, TEMPERATURES[0]))


@pytest.fixture(scope="module")
def agent_worker(config):
    return AgentLoopWorker(config, LLMServerClient(config))  # postprocessing only: it generates nothing


@pytest.fixture(scope="module")
def actor_worker(config):
    return detach_actor_worker(config)


@pytest.fixture(scope="module")
def reference(model_dir):
    return training_worker(model_path_str(model_dir))


# ---------------------------------------------------------------- the batch, as verl builds it
def trajectories(model: torch.nn.Module, temperature: float, seed: int = 0) -> list[AgentLoopOutput]:
    rng = random.Random(seed)
    outputs = []
    for index, (prompt_length, segments) in enumerate(SHAPES):
        prompt = [rng.randrange(3, 250) for _ in range(prompt_length)]
        response, mask, log_probs = [], [], []
        for kind, count in segments:
            if kind == "gen":
                tokens, values = sample(model, prompt + response, temperature, count, seed * 100 + index)
            else:  # a tool's answer: part of the sequence, not generated (verl logs 0.0 for it)
                tokens, values = [rng.randrange(3, 250) for _ in range(count)], [0.0] * count
            response += tokens
            mask += [1 if kind == "gen" else 0] * count
            log_probs += values
        outputs.append(AgentLoopOutput(
            prompt_ids=prompt, response_ids=response, response_mask=mask, response_logprobs=log_probs,
            num_turns=2 + 2 * sum(kind == "tool" for kind, _ in segments), metrics=AgentLoopMetrics(),
            extra_fields={"min_global_steps": 0, "max_global_steps": 0},
        ))
    return outputs


async def score_all(outputs: list[AgentLoopOutput], temperature: float, rules: sf.TrainerSideConfig,
                    unscored: sf.TrainerSideConfig) -> None:
    """The agent loop's scoring of each finished trajectory; `UNSCORED_ROWS` meet a dead server."""
    await asyncio.gather(*(attach_server_fields(output, temperature, unscored if row in UNSCORED_ROWS else rules)
                           for row, output in enumerate(outputs)))


@pytest.fixture(scope="module")
def batches(model_dir, config, agent_worker, unused_tcp_port_factory):
    """`batches(temperature)`: the scored batch (rows `UNSCORED_ROWS` carry error fields), built once."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rules = sf.trainer_side_config(config).model_copy(update={"score_ref": True})
    dead = rules.model_copy(update={"address": f"http://127.0.0.1:{unused_tcp_port_factory()}", "timeout_s": 1.0})
    built: dict[float, DataProto] = {}

    async def build(temperature: float) -> DataProto:
        outputs = trajectories(model, temperature)
        await score_all(outputs, temperature, rules, dead)
        return await assemble(agent_worker, config, outputs, temperature)

    def get(temperature: float) -> DataProto:
        if temperature not in built:
            built[temperature] = asyncio.run(build(temperature))
        return copy.deepcopy(built[temperature])

    return get


def make_trainer(config, actor_worker, version: int = 0, **rules: Any) -> ServerLogProbFullyAsyncTrainer:
    trainer = ServerLogProbFullyAsyncTrainer(
        config=with_settings(config, {f"{RULES}.{key}": value for key, value in rules.items()}), tokenizer=None,
        role_worker_mapping={}, resource_pool_manager=None, device_name="cpu",
    )
    trainer.actor_rollout_wg = InProcessWorkerGroup(actor_worker)  # module docstring: what init_workers builds
    trainer.current_param_version = version
    return trainer


def verl_recompute(reference, batch: DataProto, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return recompute(reference, batch.batch.select(*VERL_LAYOUT), temperature)


def beyond_responses(batch: DataProto) -> torch.Tensor:
    return ~batch.batch["attention_mask"][:, batch.batch["prompts"].shape[1]:].bool()


def server_column(batch: DataProto, name: str, row: int) -> torch.Tensor:
    values = torch.tensor(batch.non_tensor_batch[name][row], dtype=torch.float32)
    return torch.nn.functional.pad(values, (0, RESPONSE_LENGTH - values.numel()))


def scored_rows(batch: DataProto) -> list[int]:
    return [row for row in range(len(batch)) if row not in UNSCORED_ROWS]


# ---------------------------------------------------------------- equality with verl's recompute
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_old_log_probs_from_the_server_equal_verls_recompute(batches, config, actor_worker, reference, temperature):
    batch = batches(temperature)
    trainer = make_trainer(config, actor_worker, on_missing="recompute")
    old, mfu = trainer._compute_old_log_prob(batch)
    expected_log_probs, expected_entropy = verl_recompute(reference, batch, temperature)

    log_probs, entropy = old.batch["old_log_probs"], old.batch["entropys"]
    assert log_probs.dtype == entropy.dtype == torch.float32
    assert log_probs.shape == entropy.shape == (len(SHAPES), RESPONSE_LENGTH)
    rows = scored_rows(batch)
    MEASURED[f"T={temperature} log_probs"] = float((log_probs[rows] - expected_log_probs[rows]).abs().max())
    MEASURED[f"T={temperature} entropy"] = float((entropy[rows] - expected_entropy[rows]).abs().max())
    torch.testing.assert_close(log_probs, expected_log_probs, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=TOLERANCE, rtol=0)
    padding = beyond_responses(batch)
    assert torch.all(log_probs[padding] == 0) and torch.all(entropy[padding] == 0)
    tool_tokens = (batch.batch["response_mask"] == 0) & ~padding
    assert tool_tokens.any() and torch.all(log_probs[tool_tokens] != 0)  # scored like verl scores them
    for row in rows:  # the scored rows are the server's numbers, bit for bit
        assert torch.equal(log_probs[row], server_column(batch, sf.LOG_PROBS, row))
    print(f"\nmax |server - verl recompute| at T={temperature}: log_probs "
          f"{MEASURED[f'T={temperature} log_probs']:.3g}, entropy {MEASURED[f'T={temperature} entropy']:.3g}")


def test_verls_log_prob_step_logs_its_metrics_and_ours(batches, config, actor_worker, reference):
    temperature = TEMPERATURES[0]
    batch = batches(temperature)
    trainer = make_trainer(config, actor_worker, on_missing="recompute")
    trained_on = trainer._fit_compute_log_prob(batch)  # verl's own caller of _compute_old_log_prob
    expected_log_probs, expected_entropy = verl_recompute(reference, batch, temperature)
    torch.testing.assert_close(trained_on.batch["old_log_probs"], expected_log_probs, atol=TOLERANCE, rtol=0)

    actor = config.actor_rollout_ref.actor
    expected_entropy_metric = agg_loss(loss_mat=expected_entropy, loss_mask=batch.batch["response_mask"],
                                       loss_agg_mode=actor.loss_agg_mode, loss_scale_factor=actor.loss_scale_factor)
    metrics = trainer.metrics
    assert metrics["actor/entropy"] == pytest.approx(float(expected_entropy_metric), abs=TOLERANCE)
    verl_view = copy.deepcopy(batch)
    verl_view.batch["old_log_probs"] = expected_log_probs
    for key, value in calculate_debug_metrics(verl_view).items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-4), key
    prefix = sf.METRIC_PREFIX
    assert metrics[f"{prefix}/samples_from_server_total"] == len(SHAPES) - len(UNSCORED_ROWS)
    assert metrics[f"{prefix}/samples_recomputed_total"] == len(UNSCORED_ROWS)
    assert metrics[f"{prefix}/weight_version_lag_max"] == 0
    assert f"{prefix}/rollout_vs_server/kl_k3" in metrics


def test_a_fully_scored_batch_runs_no_trainer_forward_and_copies_no_weights(batches, config, actor_worker):
    batch = batches(TEMPERATURES[0])
    scored = batch.select_idxs(scored_rows(batch))
    trainer = make_trainer(config, actor_worker, on_missing="fail")
    _, mfu = trainer._compute_old_log_prob(scored)
    assert trainer.actor_rollout_wg.calls == [] and mfu == 0.0


def test_a_later_local_step_recomputes_with_the_old_weights_saved_at_step_1(batches, config, actor_worker, reference):
    """Step 1 of a sync cycle is scored wholly on the server, an optimizer step changes the actor,
    then step 2 recomputes its missing samples: verl's path restores the weights of step 1, which
    this trainer saved for it (verl's own path saves them only when step 1 recomputes)."""
    temperature = TEMPERATURES[0]
    batch = batches(temperature)
    trainer = make_trainer(config, actor_worker, on_missing="recompute")
    assert trainer.trigger_parameter_sync_step > 1
    trainer._compute_old_log_prob(batch.select_idxs(scored_rows(batch)))
    assert trainer.actor_rollout_wg.calls == ["save_model_to_cpu"]
    with torch.no_grad():
        for parameter in actor_worker.actor.engine.module.parameters():
            parameter.mul_(1.2)  # the actor moves on, as after update_actor
    trainer.local_trigger_step = 2
    try:
        old, _ = trainer._compute_old_log_prob(batch)
    finally:
        actor_worker.restore_model_from_cpu(1)  # the other tests expect the initial weights
    expected, _ = verl_recompute(reference, batch, temperature)
    torch.testing.assert_close(old.batch["old_log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert trainer.actor_rollout_wg.calls[1:] == [
        "save_model_to_cpu", "restore_model_from_cpu", "compute_log_prob", "restore_model_from_cpu", "clear_cpu_model"]


# ---------------------------------------------------------------- missing samples
def test_missing_samples_are_recomputed_by_verls_own_path_for_their_rows_only(batches, config, actor_worker):
    batch = batches(TEMPERATURES[0])
    trainer = make_trainer(config, actor_worker, on_missing="recompute")
    old, _ = trainer._compute_old_log_prob(batch)
    assert trainer.actor_rollout_wg.calls == ["save_model_to_cpu", "compute_log_prob"]  # verl's path, step 1
    verl_old, _ = VerlFullyAsyncTrainer._compute_old_log_prob(make_trainer(config, actor_worker), batch)
    for row in range(len(batch)):
        if row in UNSCORED_ROWS:
            assert torch.equal(old.batch["old_log_probs"][row], verl_old.batch["old_log_probs"][row])
            assert torch.equal(old.batch["entropys"][row], verl_old.batch["entropys"][row])
        else:
            assert torch.equal(old.batch["old_log_probs"][row], server_column(batch, sf.LOG_PROBS, row))


def test_missing_samples_fail_naming_them(batches, config, actor_worker):
    trainer = make_trainer(config, actor_worker, on_missing="fail")
    with pytest.raises(sf.ServerLogProbsUnusable) as failure:
        trainer._compute_old_log_prob(batches(TEMPERATURES[0]))
    message = str(failure.value)
    assert "2 of 6 samples" in message and "on_missing=fail" in message
    for row in UNSCORED_ROWS:
        assert f"uid_sample_0_{row} (row {row})" in message
    assert "unreachable" in message
    assert trainer.actor_rollout_wg.calls == []


def test_missing_samples_are_rescored_on_the_server(batches, config, actor_worker, reference):
    temperature = TEMPERATURES[1]
    batch = batches(temperature)
    trainer = make_trainer(config, actor_worker, on_missing="rescore")
    old, _ = trainer._compute_old_log_prob(batch)
    expected, _ = verl_recompute(reference, batch, temperature)
    torch.testing.assert_close(old.batch["old_log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/samples_rescored_total"] == len(UNSCORED_ROWS)
    assert trainer.actor_rollout_wg.calls == []


# ---------------------------------------------------------------- stale samples
def test_stale_samples_fail_naming_them(batches, config, actor_worker):
    batch = batches(TEMPERATURES[0]).select_idxs(scored_rows(batches(TEMPERATURES[0])))
    trainer = make_trainer(config, actor_worker, version=1, on_stale="fail")
    with pytest.raises(sf.ServerLogProbsUnusable, match="scored under weight version 0, the old policy is version 1"):
        trainer._compute_old_log_prob(batch)


def test_stale_samples_are_accepted_as_scored(batches, config, actor_worker):
    batch = batches(TEMPERATURES[0]).select_idxs(scored_rows(batches(TEMPERATURES[0])))
    trainer = make_trainer(config, actor_worker, version=1, on_stale="accept")
    old, _ = trainer._compute_old_log_prob(batch)
    for row in range(len(batch)):
        assert torch.equal(old.batch["old_log_probs"][row], server_column(batch, sf.LOG_PROBS, row))
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/samples_accepted_stale_total"] == len(batch)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/weight_version_lag_max"] == 1


def test_stale_samples_within_max_version_lag_count_as_current(batches, config, actor_worker):
    batch = batches(TEMPERATURES[0]).select_idxs(scored_rows(batches(TEMPERATURES[0])))
    trainer = make_trainer(config, actor_worker, version=1, on_stale="fail", max_version_lag=1)
    trainer._compute_old_log_prob(batch)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/samples_from_server_total"] == len(batch)


def test_stale_samples_are_recomputed(batches, config, actor_worker, reference):
    batch = batches(TEMPERATURES[0])
    trainer = make_trainer(config, actor_worker, version=1, on_stale="recompute", on_missing="recompute")
    old, _ = trainer._compute_old_log_prob(batch)
    expected, _ = verl_recompute(reference, batch, TEMPERATURES[0])
    torch.testing.assert_close(old.batch["old_log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/samples_recomputed_total"] == len(batch)


def test_stale_samples_are_rescored_once_the_server_holds_the_old_version(batches, config, actor_worker, model_dir):
    batch = batches(TEMPERATURES[0]).select_idxs(scored_rows(batches(TEMPERATURES[0])))
    with served(model_dir) as fresh:  # its own server: this test moves it to version 1
        settings = {"address": fresh.url, "on_stale": "rescore"}
        waiting = make_trainer(config, actor_worker, version=1, timeout_s=1.0, **settings)
        with pytest.raises(sf.ServerLogProbsUnusable, match="uid_sample_0_0 \\(row 0\\)") as failure:
            waiting._compute_old_log_prob(batch)  # the server is at version 0: waits 1 s, then says so
        assert "DeadlineExceeded" in str(failure.value) or "deadline" in str(failure.value)

        expected = asyncio.run(push_version_1_and_score(fresh.url, model_dir, batch, TEMPERATURES[0]))
        trainer = make_trainer(config, actor_worker, version=1, **settings)
        old, _ = trainer._compute_old_log_prob(batch)
    torch.testing.assert_close(old.batch["old_log_probs"], expected, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(old.batch["old_log_probs"], server_column_matrix(batch), atol=1e-3)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/samples_rescored_total"] == len(batch)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/weight_version_lag_max"] == 0


async def push_version_1_and_score(url: str, model_dir: Path, batch: DataProto, temperature: float) -> torch.Tensor:
    """Send new weights as version 1, then the server's own answers for the batch at version 1."""
    weights = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict())
    async with HttpLogProbClient(url) as client:
        assert await client.update_weights(perturbed_weights(weights, seed=3, scale=0.05).items(), 1) == 1
        from clients.verl.dataproto_fields import token_ids

        prompts, responses = token_ids(batch, range(len(batch)))
        requests = [LogProbRequest(input_ids=p + r, response_start=len(p), temperature=temperature, return_entropy=True)
                    for p, r in zip(prompts, responses)]
        results = await client.compute_log_probs(requests)
    assert all(result.weight_version == 1 for result in results)
    return sf.pad_rows([result.log_probs for result in results], RESPONSE_LENGTH)


def server_column_matrix(batch: DataProto) -> torch.Tensor:
    return torch.stack([server_column(batch, sf.LOG_PROBS, row) for row in range(len(batch))])


# ---------------------------------------------------------------- the reference policy
def test_reference_log_probs_come_from_the_server(batches, config, actor_worker, reference):
    temperature = TEMPERATURES[0]
    batch = batches(temperature)
    trainer = make_trainer(config, actor_worker, score_ref=True, on_missing="rescore")
    ref = trainer._compute_ref_log_prob(batch).batch["ref_log_prob"]
    expected, _ = verl_recompute(reference, batch, temperature)  # the server's reference: the initial weights
    torch.testing.assert_close(ref, expected, atol=TOLERANCE, rtol=0)
    assert torch.all(ref[beyond_responses(batch)] == 0)
    assert trainer.metrics[f"{sf.METRIC_PREFIX}/ref/samples_rescored_total"] == len(UNSCORED_ROWS)
    with pytest.raises(sf.ServerLogProbsUnusable, match="uid_sample_0_1"):
        make_trainer(config, actor_worker, score_ref=True, on_missing="fail")._compute_ref_log_prob(batch)


# ---------------------------------------------------------------- configuration and the entry point
def test_settings_that_would_ignore_the_server_are_refused(config, actor_worker):
    with pytest.raises(ValueError, match="bypass_mode=False"):
        make_trainer(with_settings(config, {"algorithm.rollout_correction.bypass_mode": True}), actor_worker)
    with pytest.raises(ValueError, match="calculate_sum_pi_squared=True needs the trainer's own forward"):
        make_trainer(with_settings(config, {"actor_rollout_ref.actor.calculate_sum_pi_squared": True}), actor_worker)
    with pytest.raises(ValueError, match="router replay R2"):
        make_trainer(with_settings(config, {"actor_rollout_ref.actor.megatron.router_replay.mode": "R2"}), actor_worker)
    with pytest.raises(ValueError, match="multi_turn.enable=False makes"):
        check_pipeline_config(with_settings(config, {"actor_rollout_ref.rollout.multi_turn.enable": False}))
    with pytest.raises(ValueError, match="default_agent_loop=single_turn_agent does not score"):
        check_pipeline_config(with_settings(config, {"actor_rollout_ref.rollout.agent.default_agent_loop": "single_turn_agent"}))
    check_pipeline_config(with_settings(config, {"actor_rollout_ref.rollout.agent.default_agent_loop": "model_engine_server_agent"}))
