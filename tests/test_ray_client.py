"""The Ray-handle client over the service actor: 2 replicas of 1 worker on logical GPUs.

One deployment serves the whole module (start-up costs seconds on 2 cores); the last test
kills and restarts a replica, and the module's teardown checks nothing is left behind.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import pytest_asyncio
import torch

from clients.base import LogProbClient
from clients.ray_client import RayLogProbClient
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import DeadlineExceeded, InvalidRequest, WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from model_engine_server.config import ServerConfig
from replica.service_actor import start_service_actor, stop_service_actor
from tests._tolerances import assert_distinguishable, assert_scores_close
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_replica import DEADLINE_S, assert_nothing_left

VOCAB = 512
SCHEDULER = SchedulerConfig(max_tokens_per_batch=2048, max_wait_ms=2.0, default_temperature=0.7)
SERVER_NAME = "model-engine-server-test"
DEFAULT_TEMPERATURE = SCHEDULER.default_temperature  # the config's `temperature`, for requests that name none


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(ray_cluster, tiny_model):
    # auto_restart off: the kill test below drives the restart by hand (test_replica tests the monitor's)
    config = ServerConfig(
        model_path=str(tiny_model), runtime="ray", num_replicas=2, n_gpus_per_node=2, scheduler=SCHEDULER,
        temperature=DEFAULT_TEMPERATURE, batch_timeout_s=60.0, ray={"auto_restart": False},
    )
    handle = await start_service_actor(config, name=SERVER_NAME)
    yield handle
    await stop_service_actor(handle, drain=False, timeout_s=10.0)
    await assert_nothing_left()


@pytest.fixture
def client(server) -> RayLogProbClient:
    return RayLogProbClient(server, call_timeout_s=DEADLINE_S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_server(tiny_model):
    """The in-process engine the Ray path must reproduce (same checkpoint, same scheduler)."""
    local = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SCHEDULER)
    yield local
    await local.shutdown(drain=False)


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def one_at_a_time(score, requests: list[LogProbRequest]) -> list[LogProbResult]:
    """Each request alone in its batch, so both sides pack the same rows. With nothing else
    outstanding the manager's tie-break sends each to replica 0. The rows match, but a Ray
    worker runs 1 torch thread and this process 2, and MKL picks other GEMM kernels for some
    row counts, so results agree to `CROSS_PROCESS_ATOL`, not bitwise (tests/_tolerances.py)."""
    return [(await score([request]))[0] for request in requests]


async def test_two_replicas_get_distinct_gpu_bundles(server):
    """Intra-replica data parallelism (several workers per replica) is covered in test_replica.py."""
    placements = await server.worker_placements.remote()
    assert [len(replica) for replica in placements] == [1, 1]
    workers = [worker for replica in placements for worker in replica]
    assert len({tuple(w["gpu_ids"]) for w in workers}) == 2
    assert all(w["bundle_resources"].get("GPU") == 1.0 for w in workers)
    groups = [{w["placement_group_id"] for w in replica} for replica in placements]
    assert all(len(g) == 1 for g in groups) and groups[0] != groups[1]  # one group per replica
    assert len({w["pid"] for w in workers}) == 2
    expected_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert all(w["device"] == expected_device for w in workers)


async def test_results_through_the_ray_client_equal_the_in_process_engine_to_rounding(client, local_server):
    assert isinstance(client, LogProbClient)
    requests = random_requests(12, VOCAB, seed=21, max_len=300)
    through_ray = await one_at_a_time(client.compute_log_probs, requests)
    in_process = await one_at_a_time(local_server.score, requests)
    for request, remote, local in zip(requests, through_ray, in_process):
        assert remote.request_id == request.request_id
        assert_scores_close(remote.log_probs, local.log_probs, what=f"{request.request_id} log-probs")
        assert_scores_close(remote.entropy, local.entropy, what=f"{request.request_id} entropy")
        assert remote.weight_version == local.weight_version


async def test_a_request_naming_no_temperature_is_scored_at_the_configured_one(client, tiny_model):
    ids = list(range(3, 40))
    unnamed, *explicit = await client.compute_log_probs([
        {"input_ids": ids, "response_start": 20},
        {"input_ids": ids, "response_start": 20, "temperature": DEFAULT_TEMPERATURE},
        {"input_ids": ids, "response_start": 20, "temperature": 1.0},
    ])
    reference = reference_model(tiny_model)
    expected, _ = reference_log_probs(reference, LogProbRequest(input_ids=ids, response_start=20, temperature=DEFAULT_TEMPERATURE))
    torch.testing.assert_close(torch.from_numpy(unnamed.log_probs.copy()), expected, atol=1e-5, rtol=0)
    assert not np.allclose(unnamed.log_probs, explicit[1].log_probs, atol=1e-4)  # 1.0 would differ


async def test_batches_split_over_workers_match_the_plain_transformers_reference(client, tiny_model):
    requests = random_requests(24, VOCAB, seed=22, max_len=300)
    results = await client.compute_log_probs(requests)
    reference = reference_model(tiny_model)
    for request, result in zip(requests, results):
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs.copy()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(result.entropy.copy()), expected_entropy, atol=1e-5, rtol=0)


async def test_concurrent_requests_are_spread_over_both_replicas(client):
    before = [r["requests_total"] for r in (await client.get_status())["replicas"]]
    calls = [client.compute_log_probs(random_requests(4, VOCAB, seed=100 + k, max_len=200)) for k in range(8)]
    results = await asyncio.gather(*calls)
    assert sum(len(r) for r in results) == 32
    after = [r["requests_total"] for r in (await client.get_status())["replicas"]]
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == 32
    assert all(count > 0 for count in served), f"per-replica share of 32 requests: {served}"


async def test_a_failed_request_raises_its_typed_error_and_score_returns_it_in_place(client):
    good = random_requests(2, VOCAB, seed=23, max_len=50)
    bad = {"input_ids": [1, 2, VOCAB + 7], "response_start": 1}
    outcomes = await client.score([good[0], bad, good[1]])
    assert isinstance(outcomes[0], LogProbResult) and isinstance(outcomes[2], LogProbResult)
    assert isinstance(outcomes[1], InvalidRequest) and outcomes[1].field == "input_ids"
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as raised:
        await client.compute_log_probs([good[0], bad])
    assert isinstance(raised.value.outcomes[0], LogProbResult)


async def test_request_sent_while_paused_is_answered_after_resume(client):
    await client.pause_serving()
    status = await client.get_status()
    assert status["paused"] and all(r["paused"] for r in status["replicas"])
    pending = asyncio.ensure_future(client.compute_log_probs(random_requests(3, VOCAB, seed=24, max_len=60)))
    end = time.monotonic() + DEADLINE_S
    while (await client.get_status())["queue_depth"] < 3 and time.monotonic() < end:
        await asyncio.sleep(0.02)
    assert (await client.get_status())["queue_depth"] == 3 and not pending.done()
    await client.resume_serving()
    results = await asyncio.wait_for(pending, DEADLINE_S)
    assert len(results) == 3 and not (await client.get_status())["paused"]


async def test_requests_of_a_caller_that_gives_up_leave_the_servers_queue(server):
    await RayLogProbClient(server).pause_serving()
    try:
        # cancelled by its caller (no deadline anywhere): the actor's task is cancelled too
        waiting = asyncio.ensure_future(RayLogProbClient(server).score(random_requests(3, VOCAB, seed=25, max_len=60)))
        await wait_for_queue_depth(RayLogProbClient(server), 3)
        waiting.cancel()
        await wait_for_queue_depth(RayLogProbClient(server), 0)
        # a client's call timeout is the requests' deadline on the server, which answers it
        outcomes = await RayLogProbClient(server, call_timeout_s=2.0).score(random_requests(3, VOCAB, seed=26, max_len=60))
        assert all(isinstance(o, DeadlineExceeded) and "serving paused" in o.message for o in outcomes)
        await wait_for_queue_depth(RayLogProbClient(server), 0)
    finally:
        await RayLogProbClient(server).resume_serving()


async def wait_for_queue_depth(client: RayLogProbClient, depth: int) -> None:
    end = time.monotonic() + DEADLINE_S
    while (await client.get_status())["queue_depth"] != depth and time.monotonic() < end:
        await asyncio.sleep(0.02)
    assert (await client.get_status())["queue_depth"] == depth


async def test_sync_client_works_from_inside_another_ray_actor(server, ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class AgentLoop:  # stands in for a rollout agent loop; finds the server by its actor name
        def __init__(self, server_name: str) -> None:
            self.client = RayLogProbClient.from_name(server_name).sync()

        def score(self, requests):
            return [r.to_wire() for r in self.client.compute_log_probs(requests)]

        def status(self):
            return self.client.get_status()

    agent = AgentLoop.remote(SERVER_NAME)
    try:
        requests = random_requests(5, VOCAB, seed=25, max_len=80)
        wires = await agent.score.remote(requests)
        assert [w["request_id"] for w in wires] == [r.request_id for r in requests]
        assert [len(w["log_probs"]) for w in wires] == [r.num_response_tokens for r in requests]
        assert (await agent.status.remote())["num_replicas"] == 2
    finally:
        ray.kill(agent)


async def test_weight_update_through_the_client_reaches_every_replica(client, local_server):
    engine = local_server.executor.adapter.engine
    new_weights = list(perturbed_weights(dict(engine.export_weights()), seed=3, scale=0.05).items())
    version = (await client.get_status())["weight_version"] + 1
    requests = random_requests(8, VOCAB, seed=26, max_len=200)
    on_old_weights = await one_at_a_time(local_server.score, requests)
    assert await client.update_weights(new_weights, version) == version
    await local_server.update_weights(new_weights, version)

    status = await client.get_status()
    assert status["weight_version"] == version
    assert [r["weight_version"] for r in status["replicas"]] == [version, version]
    through_ray = await asyncio.gather(*(client.compute_log_probs([r]) for r in requests))
    in_process = await one_at_a_time(local_server.score, requests)
    # a replica still on the old weights would be far outside the tolerance, for every request
    assert_distinguishable([r.log_probs for r in in_process], [r.log_probs for r in on_old_weights], "old vs new weights")
    for (remote,), local in zip(through_ray, in_process):
        assert remote.weight_version == version
        assert_scores_close(remote.log_probs, local.log_probs, what=remote.request_id)  # other process, other batches
    served = [r["requests_total"] for r in (await client.get_status())["replicas"]]
    assert all(count > 0 for count in served)  # both replicas answered with the new weights


async def test_an_incomplete_sync_is_refused_and_nothing_is_scored_until_a_complete_one(client, local_server):
    engine = local_server.executor.adapter.engine
    weights = list(perturbed_weights(dict(engine.export_weights()), seed=5, scale=0.05).items())
    version = (await client.get_status())["weight_version"] + 1
    with pytest.raises(WeightSyncError, match=r"is missing 1 of \d+ tensors"):
        await client.update_weights(weights[:-1], version)
    status = await client.get_status()
    assert status["weight_version"] == version - 1 and status["weights_incomplete"]
    waiting = asyncio.ensure_future(client.score(random_requests(2, VOCAB, seed=31, max_len=50), timeout_s=0.5))
    outcomes = await asyncio.wait_for(waiting, DEADLINE_S)
    assert all(isinstance(o, DeadlineExceeded) and "weights incomplete" in o.message for o in outcomes)

    assert await client.update_weights(weights, version) == version
    await local_server.update_weights(weights, version)
    status = await client.get_status()
    assert status["weight_version"] == version and not status["weights_incomplete"]
    (result,) = await client.compute_log_probs(random_requests(1, VOCAB, seed=32, max_len=50))
    assert result.weight_version == version


async def test_a_trainer_publishes_through_the_checkpoint_transport_into_every_worker(server, client, local_server):
    """The publisher streams (gloo broadcast) straight into the 4 workers; the service actor is
    the sync target that drains, and commits only when every worker reports a full stream."""
    from checkpoint_transport.spec import TransportConfig
    from clients.sync_targets import ActorSyncTarget
    from clients.publisher import WeightPublisher

    engine = local_server.executor.adapter.engine
    new_weights = perturbed_weights(dict(engine.export_weights()), seed=4, scale=0.05)
    version = (await client.get_status())["weight_version"] + 1
    requests = random_requests(6, VOCAB, seed=30, max_len=200)
    on_old_weights = await one_at_a_time(local_server.score, requests)
    publisher = WeightPublisher(ActorSyncTarget(server), TransportConfig(backend="gloo", timeout_s=60.0))
    try:
        report = await asyncio.wait_for(publisher.update_weights(new_weights, version), DEADLINE_S)
    finally:
        await publisher.close()
    assert report.ok, report.error
    assert len(report.receives) == 2 and all(r.ok for r in report.receives)  # one worker per replica
    await local_server.update_weights(new_weights.items(), version)
    status = await client.get_status()
    assert [r["weight_version"] for r in status["replicas"]] == [version, version]
    through_ray = await asyncio.gather(*(client.compute_log_probs([r]) for r in requests))
    in_process = await one_at_a_time(local_server.score, requests)
    assert_distinguishable([r.log_probs for r in in_process], [r.log_probs for r in on_old_weights], "old vs new weights")
    for (remote,), local in zip(through_ray, in_process):
        assert remote.weight_version == version
        assert_scores_close(remote.log_probs, local.log_probs, what=remote.request_id)


async def test_killed_worker_loses_no_request_and_restart_brings_the_replica_back(server, client, local_server, ray_cluster, tiny_model):
    """Requests in flight on the dead replica are retried once on the live one; the dead one
    gets nothing new; after restart it serves again with the current weights (copied from its
    peer when the update test ran before)."""
    version = (await client.get_status())["weight_version"]
    requests = random_requests(300, VOCAB, seed=27, min_len=200, max_len=400)
    scoring = asyncio.ensure_future(client.score(requests))
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        first = (await client.get_status())["replicas"][0]
        if first["batches_total"] >= 1 and first["queue_depth"] > 0:
            break
        await asyncio.sleep(0.005)
    workers = await server.worker_handles.remote(0)
    ray_cluster.kill(workers[0], no_restart=True)

    outcomes = await asyncio.wait_for(scoring, DEADLINE_S)
    assert all(isinstance(o, LogProbResult) for o in outcomes), [o for o in outcomes if not isinstance(o, LogProbResult)][:3]
    status = await client.get_status()
    assert status["retried_requests"] > 0
    assert status["live_replicas"] == 1 and status["replicas"][0]["alive"] is False
    assert "worker rank 0 died" in status["replicas"][0]["failure"]  # found by the lost batch or the health monitor

    routed_to_dead = status["replicas"][0]["routed_requests"]
    more = await client.compute_log_probs(random_requests(6, VOCAB, seed=28, max_len=80))
    assert len(more) == 6
    assert (await client.get_status())["replicas"][0]["routed_requests"] == routed_to_dead

    health = await server.health.remote()
    assert [h["alive"] for h in health] == [False, True]

    await asyncio.wait_for(server.restart_replica.remote(0), DEADLINE_S)
    status = await client.get_status()
    assert status["live_replicas"] == 2
    restarted = status["replicas"][0]
    assert restarted["alive"] and restarted["restarts"] == 1 and restarted["weight_version"] == version
    calls = [client.compute_log_probs(random_requests(4, VOCAB, seed=200 + k, max_len=200)) for k in range(8)]
    await asyncio.gather(*calls)
    assert (await client.get_status())["replicas"][0]["requests_total"] > 0
    probe = random_requests(4, VOCAB, seed=29, max_len=150)
    assert [r.weight_version for r in await one_at_a_time(client.compute_log_probs, probe)] == [version] * 4
    # the restarted replica's weights equal the in-process engine's at the same version
    expected = await one_at_a_time(local_server.score, probe)
    from_restarted = await one_at_a_time(client.compute_log_probs, probe)
    if version > 0:  # updated before: a restart that reloaded the checkpoint must fail the comparison
        checkpoint = reference_model(tiny_model)
        on_checkpoint = [reference_log_probs(checkpoint, request)[0].numpy() for request in probe]
        assert_distinguishable([r.log_probs for r in expected], on_checkpoint, "current vs checkpoint weights")
    for got, want in zip(from_restarted, expected):
        assert_scores_close(got.log_probs, want.log_probs, what=got.request_id)
