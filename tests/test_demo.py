"""The main job: the fully-async loop learns, and its old log-probs are those of their version."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from clients.agent_loop import ENTROPY_FIELD, LOG_PROBS_FIELD, MISMATCH_FIELD, VERSION_FIELD, attach_server_log_probs
from clients.demo.config import DemoConfig, DemoModel
from clients.demo.loop import DemoLoop, write_jsonl
from clients.demo.report import comparison, plot
from clients.demo.message_queue import MessageQueue
from clients.demo.run import make_policy, run_mode
from clients.local_client import LocalClient
from model_engine_server.engines.base import EngineSpec
from model_engine_server.local import build_local_server
from tests.helpers import reference_model

STALL_S = 150.0
SMALL = DemoConfig(
    steps=24, prompts_per_step=8, group_size=4, prompt_len=8, response_len=16, target_vocab=16,
    model=DemoModel(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2), seed=0,
)


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    return make_policy(SMALL, tmp_path_factory.mktemp("demo") / "policy")


def test_reward_rises_with_server_log_probs(policy_path, tmp_path):
    result = asyncio.run(run_mode(SMALL, policy_path, "server"))
    rewards = [m["reward"] for m in result.steps]
    assert len(rewards) == SMALL.steps
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.15, rewards
    # the first batch was sampled and scored under the same weights: only numerics differ
    assert result.steps[0]["numeric_mismatch_max_abs"] < 1e-4
    assert all(m["old_log_prob_s"] == 0.0 for m in result.steps)  # the trainer never recomputed
    # every update went through the transport publisher, each sync inside its pause window
    assert all(0 < m["transfer_s"] <= m["pause_window_s"] for m in result.steps)
    assert result.steps[-1]["version"] == SMALL.steps
    for metrics in result.steps:  # the share scored behind the trainer agrees with the largest lag
        assert (metrics["old_log_prob_behind_share"] > 0) == (metrics["old_log_prob_version_lag_max"] > 0)
        assert 0 <= metrics["old_log_prob_behind_share"] <= 1
    _assert_proximal_approximation_reported(result, tmp_path)


def _assert_proximal_approximation_reported(result, folder):
    """Every step carries the loglinear approximation's error beside the exact values, by
    staleness; the log, the plot and the printed comparison show it."""
    for metrics in result.steps:
        assert {"prox_approx_mean_abs", "prox_approx_p99_abs", "prox_approx_max_abs",
                "prox_approx_clip_flip_fraction"} <= metrics.keys()
        assert 0 <= metrics["prox_approx_mean_abs"] <= metrics["prox_approx_max_abs"]
        staleness = {str(s) for s in range(metrics["staleness_max"] + 1)}
        assert set(metrics["prox_approx_by_staleness"]) - {"interior"} <= staleness
    # first step: sampled, scored and trained under version 0, so the approximation is exact
    assert result.steps[0]["prox_approx_max_abs"] < 1e-4
    write_jsonl(folder / "metrics.jsonl", result)
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("prox_approx_by_staleness" in line for line in logged)
    plot([result], folder / "demo.png")
    assert (folder / "demo.png").stat().st_size > 0
    assert "loglinear proximal approximation" in comparison({"server": result})


def test_old_log_probs_equal_reference_of_their_version(policy_path):
    config = SMALL.model_copy(update={"steps": 4})
    weights_by_version: dict[int, dict[str, torch.Tensor]] = {}
    seen: list[dict] = []

    async def main() -> None:
        client = LocalClient(build_local_server(EngineSpec(model_path=str(policy_path))))
        loop = DemoLoop(config, policy_path, "server", client)
        weights_by_version[0] = dict(loop.trainer.export_weights())
        export = loop.trainer.export_weights

        def recording_export():
            weights = export()
            weights_by_version[loop.trainer.version] = dict(weights)
            return weights

        loop.trainer.export_weights = recording_export
        await loop.run(on_step=lambda metrics, groups: seen.extend(s for g in groups for s in g))
        await client.service.shutdown()

    async def bounded() -> None:  # a hang fails the test instead of the CI run
        async with asyncio.timeout(STALL_S):
            await main()

    asyncio.run(bounded())
    versions = {s[VERSION_FIELD] for s in seen}
    assert len(versions) >= 2, "the run should have scored samples under several versions"
    reference = reference_model(policy_path)
    for version in sorted(versions):
        reference.load_state_dict({**reference.state_dict(), **weights_by_version[version]})
        for sample in [s for s in seen if s[VERSION_FIELD] == version][:4]:
            ids = torch.tensor([sample["prompt_ids"] + sample["response_ids"]])
            with torch.no_grad():
                logits = reference(ids).logits[0, len(sample["prompt_ids"]) - 1 : -1] / config.temperature
            expected = torch.log_softmax(logits, -1).gather(1, ids[0, len(sample["prompt_ids"]) :, None])[:, 0]
            np.testing.assert_allclose(sample[LOG_PROBS_FIELD], expected.numpy(), atol=1e-5, rtol=0)


def test_a_dead_rollouter_stops_the_loop_with_its_error(policy_path):
    loop = DemoLoop(SMALL.model_copy(update={"steps": 2}), policy_path, "baseline", None)

    def broken_generate():
        raise RuntimeError("generate exploded")

    loop.rollouter.generate_group = broken_generate

    async def bounded() -> None:
        async with asyncio.timeout(30):
            await loop.run()

    with pytest.raises(RuntimeError, match="generate exploded"):
        asyncio.run(bounded())


def test_a_server_that_refuses_every_group_stops_the_loop_with_its_reason(policy_path):
    """A server shut down before the run answers every sample `shutting_down`: the loop stops
    after `max_failed_groups_in_a_row` groups, naming the error, instead of waiting forever."""
    config = SMALL.model_copy(update={"steps": 2, "max_failed_groups_in_a_row": 2})

    async def main() -> None:
        client = LocalClient(build_local_server(EngineSpec(model_path=str(policy_path))))
        await client.service.shutdown()
        loop = DemoLoop(config, policy_path, "server", client)
        try:
            async with asyncio.timeout(STALL_S):
                await loop.run()
        finally:
            assert loop.failed_samples >= 2 * config.group_size

    with pytest.raises(RuntimeError, match="2 groups in a row.*shut"):
        asyncio.run(main())


def test_baseline_recomputes_on_the_trainer(policy_path):
    result = asyncio.run(run_mode(SMALL.model_copy(update={"steps": 3}), policy_path, "baseline"))
    assert all(m["old_log_prob_s"] > 0 for m in result.steps)
    assert all("mismatch_mean_abs" not in m for m in result.steps)


async def test_agent_loop_hook_attaches_verl_field_names(tiny_model):
    client = LocalClient(build_local_server(EngineSpec(model_path=str(tiny_model))))
    sample = {"prompt_ids": [5, 6, 7], "response_ids": [8, 9], "rollout_log_probs": [-1.0, -2.0], "uid": "s1"}
    await attach_server_log_probs(client, sample, temperature=0.8)
    assert sample[LOG_PROBS_FIELD].shape == (2,) and sample[ENTROPY_FIELD].shape == (2,)
    assert sample[VERSION_FIELD] == 0
    expected_gap = np.abs(sample[LOG_PROBS_FIELD] - np.array([-1.0, -2.0])).mean()
    assert sample[MISMATCH_FIELD]["mean_abs_diff"] == pytest.approx(expected_gap, rel=1e-5)
    await client.service.shutdown()


@pytest.mark.parametrize("policy,expected_groups", [("drop", 1), ("keep", 2)])
async def test_message_queue_staleness_policy(policy, expected_groups):
    queue = MessageQueue(max_groups=4, staleness_limit=1, stale_policy=policy)
    await queue.put([{"rollout_version": 0}])  # 3 versions old at trainer version 3: stale
    await queue.put([{"rollout_version": 2}])
    if policy == "drop":
        batch = await queue.get_batch(1, trainer_version=3)
        assert batch.dropped_stale == 1 and batch.groups[0][0]["rollout_version"] == 2
    else:
        batch = await queue.get_batch(2, trainer_version=3)
        assert batch.dropped_stale == 0
    assert len(batch.groups) == expected_groups


def test_the_cli_imports_the_demo_only_when_it_runs():
    code = ("import sys; from model_engine_server.cli import build_parser; "
            "args = build_parser().parse_args(['demo', '--steps', '3']); assert args.steps == 3; "
            "loaded = [name for name in sys.modules if name == 'clients' or name.startswith('clients.')]; "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_demo_command_preset_rollout_ahead_builds_that_loop(monkeypatch, tmp_path):
    """`demo --preset rollout-ahead` runs `rollout_ahead()`'s loop (stale samples kept), with the
    flags given on top; the default preset keeps the plain config."""
    import clients.demo.report
    import clients.demo.run
    from clients.demo.config import DemoConfig, rollout_ahead
    from model_engine_server.cli import main

    seen: list[DemoConfig] = []
    monkeypatch.setattr(clients.demo.run, "run_demo", lambda config, *args, **kwargs: seen.append(config) or {})
    monkeypatch.setattr(clients.demo.report, "comparison", lambda results: "")
    assert main(["demo", "--preset", "rollout-ahead", "--steps", "3", "--output-dir", str(tmp_path)]) == 0
    assert main(["demo", "--steps", "3", "--output-dir", str(tmp_path)]) == 0
    assert seen[0] == rollout_ahead(steps=3, seed=0)
    assert seen[0].stale_policy == "keep" and seen[1].stale_policy == "drop"
    assert seen[1] == DemoConfig(steps=3, seed=0)
    # a flag given beats the preset's own choice (it was once dropped); a bad one is a clean error
    assert main(["demo", "--preset", "rollout-ahead", "--stale-policy", "drop", "--output-dir", str(tmp_path)]) == 0
    assert seen[2] == rollout_ahead(stale_policy="drop", seed=0)
    assert main(["demo", "--steps", "0", "--output-dir", str(tmp_path)]) == 2
    assert len(seen) == 3


def test_an_output_folder_the_demo_cannot_make_is_one_line_not_a_traceback(tmp_path, capsys):
    from model_engine_server.cli import main

    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    assert main(["demo", "--steps", "1", "--output-dir", str(taken)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot write the demo's output to {taken}") and "Traceback" not in error
