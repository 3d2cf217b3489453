"""Reference-policy mode: the server built from its config (`enable_ref_mode`) hosts the frozen
reference beside the policy; one request gets both log-probs, computed at the same time; weight
updates reach the policy only. Real uvicorn on 127.0.0.1 and real tiny models, plus fakes that
pin down concurrency and failure handling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from clients.agent_loop import LOG_PROBS_FIELD, REF_LOG_PROBS_FIELD, attach_server_log_probs
from clients.http_client import HttpLogProbClient
from clients.local_client import LocalClient
from model_engine_server.config import ConfigError, load_config
from model_engine_server.errors import InvalidRequest, Overloaded
from model_engine_server.launch import build_service, build_serving, reference_config_for
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.reference import REF_MODE_SETTING, PolicyWithReference
from model_engine_server.tiny_model import perturbed_weights
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread
from tests.test_update_from_disk import assert_log_probs_of, save_perturbed

TOKEN = "ref-admin-token"
TOLERANCE = 1e-5
SECTION = "model_engine_server"


def ref_mode_config(model: Path, *extra: str):
    return load_config(None, [
        f"{SECTION}.model_path={model}", f"{SECTION}.enable_ref_mode=true", f"{SECTION}.device=cpu",
        f"{SECTION}.scheduler.max_wait_ms=1", f"{SECTION}.http.auth_token={TOKEN}", *extra,
    ])


def wire(requests: list[LogProbRequest]) -> list[dict]:
    return [r.model_dump(exclude_none=True) for r in requests]


def with_ref(requests: list[LogProbRequest]) -> list[LogProbRequest]:
    return [r.model_copy(update={"return_ref_log_probs": True}) for r in requests]


@pytest.fixture(scope="module")
def served_ref(tiny_model, tmp_path_factory):
    """Ref mode with the default reference: the policy checkpoint's initial weights; folders
    under the session's temporary folder may be loaded (the tests save checkpoints there)."""
    serving = build_serving(ref_mode_config(tiny_model, f"{SECTION}.weight_roots=[{tmp_path_factory.getbasetemp()}]"))
    with ServerThread(serving.app) as server:
        yield server


# ---------------------------------------------------------------- scoring
def test_one_request_gets_policy_and_reference_log_probs_at_its_temperature(tiny_models):
    policy_dir, ref_dir = tiny_models["qwen2_tied"], tiny_models["qwen3_tied"]
    serving = build_serving(ref_mode_config(policy_dir, f"{SECTION}.ref_model_path={ref_dir}"))
    requests = with_ref(random_requests(6, 512, seed=81, max_len=150))
    with ServerThread(serving.app) as server:
        response = httpx.post(f"{server.url}/v1/logprobs", json={"requests": wire(requests)}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    policy, reference = reference_model(policy_dir), reference_model(ref_dir)
    for request, result in zip(requests, results):
        expected, expected_entropy = reference_log_probs(policy, request)
        expected_ref, _ = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.tensor(result["entropy"]), expected_entropy, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.tensor(result["ref_log_probs"]), expected_ref, atol=TOLERANCE, rtol=0)
        assert result["weight_version"] == 0 and {"ref_compute_ms", "compute_ms"} <= set(result["timings"])


def test_ref_mode_from_a_verl_config_and_launch_overrides_scores_at_its_temperature(tiny_models):
    """The trainer's own YAML + launch script, with a KL loss and the section's keys appended
    (with and without `+`): both log-probs at the rollout temperature the config sets (0.7)."""
    fixtures = Path(__file__).parent / "fixtures" / "verl"
    policy_dir, ref_dir = tiny_models["qwen2_tied"], tiny_models["llama_untied"]
    lines = (fixtures / "launch_megatron_16_16_8.args").read_text().splitlines()
    overrides = [line.replace("@MODEL_PATH@", str(policy_dir)) for line in lines if line and not line.startswith("#")]
    overrides += ["actor_rollout_ref.actor.use_kl_loss=True", f"+{SECTION}.enable_ref_mode=true",
                  f"{SECTION}.ref_model_path={ref_dir}", f"{SECTION}.strategy=fsdp", f"{SECTION}.n_gpus_per_node=1",
                  f"+{SECTION}.ref.n_gpus_per_node=1", f"{SECTION}.device=cpu", f"{SECTION}.timeout=0.001"]
    loaded = load_config(fixtures / "fully_async_megatron_shipped.yaml", overrides)
    assert loaded.server.enable_ref_mode and loaded.server.temperature == 0.7
    request = LogProbRequest(input_ids=list(range(20, 70)), response_start=15, temperature=0.7)
    with ServerThread(build_serving(loaded).app) as server:
        body = {"requests": [{"input_ids": request.input_ids, "response_start": 15, "return_ref_log_probs": True}]}
        result = httpx.post(f"{server.url}/v1/logprobs", json=body).json()["results"][0]  # no temperature: the config's
    expected, _ = reference_log_probs(reference_model(policy_dir), request)
    expected_ref, _ = reference_log_probs(reference_model(ref_dir), request)
    torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(torch.tensor(result["ref_log_probs"]), expected_ref, atol=TOLERANCE, rtol=0)


def test_requests_without_the_flag_get_no_ref_log_probs(served_ref):
    [plain] = random_requests(1, 512, seed=82, max_len=40)
    result = httpx.post(f"{served_ref.url}/v1/logprobs", json={"requests": wire([plain])}).json()["results"][0]
    assert result["ref_log_probs"] is None and len(result["log_probs"]) == plain.num_response_tokens


async def test_after_update_from_disk_log_probs_follow_it_and_ref_log_probs_stay_initial(served_ref, tiny_model, tmp_path):
    requests = with_ref(random_requests(4, 512, seed=83, max_len=120))
    new_weights = save_perturbed(tiny_model, tmp_path / "step1", seed=11)
    async with HttpLogProbClient(served_ref.url, admin_token=TOKEN) as client:
        version = (await client.get_status())["weight_version"]
        assert await client.update_weights_from_disk(str(new_weights)) == version + 1
        results = await client.compute_log_probs(requests)
        status = await client.get_status()
    assert {r.weight_version for r in results} == {version + 1}
    assert_log_probs_of(new_weights, requests, results)
    assert_log_probs_of(tiny_model, requests, results, field="ref_log_probs")
    assert status["weight_version"] == version + 1 and status["reference"]["weight_version"] == 0


async def test_weights_sent_by_the_trainer_reach_the_policy_only(served_ref, tiny_model):
    requests = with_ref(random_requests(3, 512, seed=84, max_len=90))
    new = perturbed_weights(dict(reference_model(tiny_model).named_parameters()), seed=12)
    async with HttpLogProbClient(served_ref.url, admin_token=TOKEN) as client:
        version = (await client.get_status())["weight_version"]
        await client.update_weights(((name, t.detach()) for name, t in new.items()), version + 1)
        results = await client.compute_log_probs(requests)
    model = reference_model(tiny_model)
    model.load_state_dict({**model.state_dict(), **new})
    for request, result in zip(requests, results):
        torch.testing.assert_close(torch.from_numpy(result.log_probs), reference_log_probs(model, request)[0],
                                   atol=TOLERANCE, rtol=0)
    assert_log_probs_of(tiny_model, requests, results, field="ref_log_probs")


async def test_a_publisher_sync_through_the_admin_routes_reaches_the_policy_only(served_ref, tiny_model):
    from checkpoint_transport.spec import TransportConfig
    from clients.publisher import WeightPublisher
    from clients.sync_targets import HttpSyncTarget

    requests = with_ref(random_requests(3, 512, seed=87, max_len=90))
    model = reference_model(tiny_model)
    new = perturbed_weights({name: t.detach() for name, t in model.named_parameters()}, seed=13)
    target = HttpSyncTarget(served_ref.url, token=TOKEN, timeout_s=120)
    publisher = WeightPublisher(target, TransportConfig(backend="gloo", timeout_s=60))
    try:
        version = (await target.get_status())["weight_version"]
        assert (await publisher.update_weights(new, version + 1)).ok
    finally:
        await publisher.close()
        await target.close()
    async with HttpLogProbClient(served_ref.url) as client:
        results = await client.compute_log_probs(requests)
    model.load_state_dict({**model.state_dict(), **new})
    assert {r.weight_version for r in results} == {version + 1}
    for request, result in zip(requests, results):
        torch.testing.assert_close(torch.from_numpy(result.log_probs), reference_log_probs(model, request)[0],
                                   atol=TOLERANCE, rtol=0)
    assert_log_probs_of(tiny_model, requests, results, field="ref_log_probs")


def test_a_bad_folder_is_400_and_both_policies_keep_serving(served_ref, tiny_models):
    headers = {"authorization": f"Bearer {TOKEN}"}
    probe = {"requests": [{"input_ids": list(range(30, 70)), "response_start": 9, "return_ref_log_probs": True}]}
    before = httpx.post(f"{served_ref.url}/v1/logprobs", json=probe).json()["results"][0]
    for folder in (tiny_models["llama_untied"].parent / "no-such-checkpoint", tiny_models["llama_untied"]):
        refused = httpx.post(f"{served_ref.url}/v1/update_weights_from_disk", json={"model_path": str(folder)},
                             headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "model_path", refused.text
    after = httpx.post(f"{served_ref.url}/v1/logprobs", json=probe).json()["results"][0]
    assert after["weight_version"] == before["weight_version"]
    assert after["log_probs"] == before["log_probs"] and after["ref_log_probs"] == before["ref_log_probs"]


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_status_and_metrics_show_both_policies(served_ref):
    ok = "{code=,outcome=ok}"
    before = _metrics(served_ref.url)
    requests = random_requests(3, 512, seed=85, max_len=60)
    httpx.post(f"{served_ref.url}/v1/logprobs", json={"requests": wire(with_ref(requests[:2]) + requests[2:])})
    after = _metrics(served_ref.url)
    status = httpx.get(f"{served_ref.url}/v1/status").json()
    assert status["ref_mode"] is True and status["reference"]["weight_version"] == 0
    assert after["model_engine_server_ref_mode"] == 1
    assert after[f"model_engine_server_requests_total{ok}"] - before.get(f"model_engine_server_requests_total{ok}", 0) == 3
    ref_ok = f"model_engine_server_ref_requests_total{ok}"
    assert after[ref_ok] - before.get(ref_ok, 0) == 2
    assert after["model_engine_server_ref_weight_version"] == 0 and "model_engine_server_ref_queue_depth" in after


def test_without_ref_mode_a_ref_request_is_400_naming_the_setting(tiny_model):
    loaded = load_config(None, [f"{SECTION}.model_path={tiny_model}", f"{SECTION}.device=cpu"])
    serving = build_serving(loaded)
    body = {"requests": [{"input_ids": [3, 4, 5, 6], "response_start": 2, "return_ref_log_probs": True}]}
    with ServerThread(serving.app) as server:
        refused = httpx.post(f"{server.url}/v1/logprobs", json=body)
        body["requests"][0]["return_ref_log_probs"] = False
        served = httpx.post(f"{server.url}/v1/logprobs", json=body)
        status = httpx.get(f"{server.url}/v1/status").json()
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert REF_MODE_SETTING in error["message"] and error["field"] == "requests[0].return_ref_log_probs"
    assert served.status_code == 200 and status["ref_mode"] is False and "reference" not in status


async def test_the_agent_loop_hook_writes_ref_log_probs_under_the_verl_name(tiny_model):
    service = build_service(ref_mode_config(tiny_model).server)
    await service.start()
    sample = {"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10], "uid": "s1"}
    await attach_server_log_probs(LocalClient(service), sample, temperature=0.8, return_ref_log_probs=True)
    await service.shutdown()
    assert sample[REF_LOG_PROBS_FIELD].dtype == np.float32 and sample[REF_LOG_PROBS_FIELD].shape == (3,)
    np.testing.assert_array_equal(sample[REF_LOG_PROBS_FIELD], sample[LOG_PROBS_FIELD])  # same weights, same math

    # stacked into a batch under that name, verl's own KL-in-reward step reads it
    pytest.importorskip("verl")
    from verl import DataProto
    from verl.trainer.ppo.core_algos import FixedKLController
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty

    ref = torch.from_numpy(sample[REF_LOG_PROBS_FIELD])[None]
    batch = DataProto.from_dict({REF_LOG_PROBS_FIELD: ref, "old_log_probs": ref + 0.5,
                                 "token_level_scores": torch.zeros(1, 3), "response_mask": torch.ones(1, 3)})
    batch, metrics = apply_kl_penalty(batch, FixedKLController(kl_coef=0.1), kl_penalty="kl")
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.5)


# ---------------------------------------------------------------- the composite, with fakes
class _Half:
    """A fake service that records what it scored; `gate` makes it wait for the other half."""

    def __init__(self, gate: asyncio.Barrier | None = None, fail_with: Exception | None = None, value: float = -1.0):
        self.gate, self.fail_with, self.value = gate, fail_with, value
        self.seen: list[LogProbRequest] = []
        self.paused = False

    async def score(self, requests, timeout_s=None):
        self.seen.extend(requests)
        if self.gate is not None:  # returns only once both halves are inside score() together
            await asyncio.wait_for(self.gate.wait(), timeout=10)
        if self.fail_with is not None:
            return [self.fail_with for _ in requests]
        return [LogProbResult(r.request_id, np.full(r.num_response_tokens, self.value, np.float32), 7,
                              timings={"compute_ms": 1.0}) for r in requests]

    async def pause_serving(self):
        self.paused = True

    async def resume_serving(self):
        self.paused = False

    async def get_status(self):
        return {"weight_version": 7, "accepting": True}


async def test_the_two_halves_of_a_request_are_scored_at_the_same_time():
    gate = asyncio.Barrier(2)
    policy, reference = _Half(gate, value=-1.0), _Half(gate, value=-2.0)
    request = LogProbRequest(input_ids=[1, 2, 3, 4], response_start=1, temperature=0.5, return_entropy=True,
                             return_ref_log_probs=True, min_weight_version=7, rollout_log_probs=[-1.0, -1.0, -1.0])
    [result] = await PolicyWithReference(policy, reference).score([request])
    assert isinstance(result, LogProbResult), result
    assert result.weight_version == 7 and result.ref_log_probs.tolist() == [-2.0] * 3
    [to_policy], [to_reference] = policy.seen, reference.seen
    assert not to_policy.return_ref_log_probs and to_policy.min_weight_version == 7 and to_policy.return_entropy
    assert to_reference.temperature == 0.5 and to_reference.input_ids == request.input_ids
    assert not (to_reference.return_entropy or to_reference.rollout_log_probs or to_reference.min_weight_version)


async def test_a_failed_reference_half_fails_only_its_request_with_the_reason():
    policy, reference = _Half(), _Half(fail_with=Overloaded("queue full", retry_after_s=2.0))
    both, plain = random_requests(2, 50, seed=86, max_len=20)
    outcomes = await PolicyWithReference(policy, reference).score([both.model_copy(update={"return_ref_log_probs": True}), plain])
    assert isinstance(outcomes[0], Overloaded) and outcomes[0].message == "reference policy: queue full"
    assert outcomes[0].retry_after_s == 2.0 and isinstance(outcomes[1], LogProbResult)


async def test_a_half_refused_at_once_answers_at_once_and_withdraws_the_other_half():
    from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
    from tests.fakes import FakeExecutor
    from tests.fakes import request as request_of

    policy = ModelEngineServer(FakeExecutor(), SchedulerConfig(request_timeout_s=60))
    reference = ModelEngineServer(FakeExecutor(), SchedulerConfig(max_tokens_per_batch=8, max_queued_tokens=8))
    await policy.pause_serving()  # the policy half would wait ...
    await reference.pause_serving()
    filler = asyncio.ensure_future(reference.submit(request_of(8)))  # ... and the reference's queue is full
    await asyncio.sleep(0.01)
    request = LogProbRequest(input_ids=[1, 2, 3, 4], response_start=1, return_ref_log_probs=True)
    [outcome] = await asyncio.wait_for(PolicyWithReference(policy, reference).score([request]), 5.0)
    assert isinstance(outcome, Overloaded) and outcome.message.startswith("reference policy:")  # ... not held for it
    await asyncio.sleep(0)
    assert policy.status()["queue_depth"] == 0  # and its half left the policy's queue
    filler.cancel()
    await policy.shutdown(drain=False)
    await reference.shutdown(drain=False)


async def test_when_both_halves_fail_together_the_policys_error_answers():
    policy, reference = _Half(fail_with=Overloaded("queue full")), _Half(fail_with=InvalidRequest("too long"))
    request = LogProbRequest(input_ids=[1, 2, 3], response_start=1, return_ref_log_probs=True)
    for _ in range(20):
        [outcome] = await PolicyWithReference(policy, reference).score([request])
        assert isinstance(outcome, Overloaded) and outcome.message == "queue full"


async def test_pause_holds_both_policies_and_resume_releases_both():
    policy, reference = _Half(), _Half()
    service = PolicyWithReference(policy, reference)
    await service.pause_serving()
    assert policy.paused and reference.paused
    await service.resume_serving()
    assert not (policy.paused or reference.paused)


async def test_without_a_reference_the_flag_is_refused_before_the_policy_sees_it():
    policy = _Half()
    [outcome] = await PolicyWithReference(policy).score([{"input_ids": [1, 2], "response_start": 1, "return_ref_log_probs": True}])
    assert isinstance(outcome, InvalidRequest) and REF_MODE_SETTING in outcome.message and policy.seen == []


# ---------------------------------------------------------------- the reference's own section
def test_the_reference_defaults_to_the_policys_checkpoint_and_devices(tiny_model, tiny_models):
    config = ref_mode_config(tiny_model, f"{SECTION}.num_replicas=2", f"{SECTION}.runtime=ray").server
    ref = reference_config_for(config, str(tiny_model))
    assert ref.model_path == str(tiny_model) and ref.replicas == 2 and not ref.enable_ref_mode
    sized = ref_mode_config(tiny_model, f"{SECTION}.ref_model_path={tiny_models['qwen3_tied']}",
                            f"{SECTION}.ref.n_gpus_per_node=3").server
    ref = reference_config_for(sized, str(tiny_model))
    assert ref.model_path == str(tiny_models["qwen3_tied"]) and ref.replicas == 3 and sized.replicas == 1


def test_reference_settings_that_cannot_work_are_config_errors_naming_them(tiny_model, tmp_path):
    missing = ref_mode_config(tiny_model, f"{SECTION}.ref_model_path={tmp_path / 'nothing'}").server
    with pytest.raises(ConfigError, match="ref_model_path=.*not an HF checkpoint"):
        reference_config_for(missing, str(tiny_model))
    tp4 = ref_mode_config(tiny_model, f"{SECTION}.backend=megatron", f"{SECTION}.n_gpus_per_node=4",
                          f"{SECTION}.megatron.tensor_model_parallel_size=4", f"{SECTION}.ref.n_gpus_per_node=2").server
    with pytest.raises(ConfigError, match=r"model_engine_server\.ref .*tensor_model_parallel_size=4"):
        reference_config_for(tp4, str(tiny_model))


def test_the_benchmark_reads_concurrency_from_the_halves_compute_intervals():
    from bench.ref import compute_window, overlap_fraction

    halves = [LogProbResult("a", np.zeros(1, np.float32), 0, timings={"queue_ms": 2.0, "compute_ms": 8.0,
                                                                       "ref_queue_ms": 5.0, "ref_compute_ms": 20.0})]
    assert compute_window(halves) == (2.0, 10.0) and compute_window(halves, "ref_") == (5.0, 25.0)
    assert overlap_fraction((2.0, 10.0), (5.0, 25.0)) == pytest.approx(5.0 / 8.0)
    assert overlap_fraction((0.0, 10.0), (10.0, 20.0)) == 0.0  # one after the other
    assert overlap_fraction((0.0, 30.0), (5.0, 25.0)) == 1.0
