"""Replicas on Ray, in the caller's process: placement, dead workers, manager routing, cleanup.

Engines run on CPU inside logical-GPU bundles of the session's embedded Ray (4 GPUs). The
server-actor path and the Ray-handle client are in `test_ray_client.py`.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch

from model_engine_server.engines.base import EngineSpec, ModelInfo, build_engine
from model_engine_server.errors import WorkerFailed
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.service import LogProbService
from model_engine_server.tiny_model import perturbed_weights
from replica.config import ReplicaConfig
from replica.executor import RayWorkerExecutor, split_by_tokens, split_for_data_parallel
from replica.manager import ReplicaManager
from replica.placement import PlacementTimeout
from replica.replica import ModelEngineReplica
from replica.routing import PromptAffinity, pick_replica
from replica.worker import WorkerInfo, default_data_parallel_rank
from tests.helpers import assert_matches_reference, random_requests

REPLICA_ACTOR_CLASSES = ("ModelEngineWorker", "LogProbServiceActor")
DEADLINE_S = 120.0


# ---------------------------------------------------------------------- helpers shared with test_ray_client
def live_replica_actors() -> list[str]:
    """Worker and server actors that are not DEAD (state API when the dashboard runs, else the GCS table)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "!=", "DEAD")], limit=10_000, raise_on_missing_output=False)
        return [f"{a.class_name}:{a.state}" for a in actors if a.class_name in REPLICA_ACTOR_CLASSES]
    except Exception:  # the session's Ray runs without the dashboard the state API needs
        import ray._private.state

        return [
            f"{a['ActorClassName']}:{a['State']}"
            for a in ray._private.state.actors().values()
            if a["State"] != "DEAD" and a["ActorClassName"] in REPLICA_ACTOR_CLASSES
        ]


def live_replica_placement_groups() -> list[str]:
    import ray

    return [
        f"{group['name']}:{group['state']}"
        for group in ray.util.placement_group_table().values()
        if group["state"] != "REMOVED" and group["name"].startswith("replica-")
    ]


async def assert_nothing_left(deadline_s: float = 30.0) -> None:
    """Actor deaths are asynchronous in Ray: wait until they are recorded, then assert."""
    end = time.monotonic() + deadline_s
    while (live_replica_actors() or live_replica_placement_groups()) and time.monotonic() < end:
        await asyncio.sleep(0.2)
    assert live_replica_actors() == []
    assert live_replica_placement_groups() == []


def replica_config(model_path, **overrides) -> ReplicaConfig:
    fields = dict(
        engine=EngineSpec(model_path=str(model_path)),
        scheduler=SchedulerConfig(max_tokens_per_batch=2048, max_wait_ms=2.0),
        start_timeout_s=60.0,
        init_timeout_s=180.0,
        batch_timeout_s=60.0,
    )
    fields.update(overrides)
    return ReplicaConfig(**fields)


async def wait_until(predicate, what: str, deadline_s: float = 60.0, interval_s: float = 0.005) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------------- pure parts (no Ray)
def test_split_by_tokens_balances_shares_and_keeps_every_request_once():
    counts = [400, 10, 300, 250, 90, 80, 70, 5]
    shares = split_by_tokens(counts, 2)
    assert sorted(i for share in shares for i in share) == list(range(len(counts)))
    loads = [sum(counts[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(counts)
    assert all(share == sorted(share) for share in shares)


def test_data_parallel_split_keeps_a_prompt_group_on_one_rank_where_prompts_are_shared():
    def sample(prompt: int, response: int) -> LogProbRequest:
        return LogProbRequest(input_ids=[prompt] * 40 + [1] * response, response_start=40)

    # three groups (two samples of prompt 7, two of 8, two of 9), interleaved as they finished
    requests = [sample(7, 60), sample(8, 10), sample(7, 60), sample(8, 10), sample(9, 30), sample(9, 30)]
    shares = split_for_data_parallel(requests, 2, shares_prompts=True)
    prompt_of = [r.input_ids[0] for r in requests]
    for share in shares:
        for prompt in (7, 8, 9):
            members = [i for i, p in enumerate(prompt_of) if p == prompt]
            assert set(members) <= set(share) or not set(members) & set(share)
    # weighed with each prompt once: group 7 (40 + 2 x 60) against groups 8 and 9 (40 + 2 x 10, 40 + 2 x 30)
    assert sorted(map(sorted, shares)) == [[0, 2], [1, 3, 4, 5]]
    # engines that run every sequence whole are split request by request
    assert split_for_data_parallel(requests, 2, shares_prompts=False) == split_by_tokens(
        [r.num_tokens for r in requests], 2)
    # fewer groups than ranks: split by request, so both ranks work
    assert all(split_for_data_parallel([sample(7, 60), sample(7, 60)], 2, shares_prompts=True))
    # a group above a fair share is cut so the other rank takes part of it
    big = [sample(7, 60) for _ in range(6)] + [sample(8, 10)]
    shares = split_for_data_parallel(big, 2, shares_prompts=True)
    assert all(any(prompt_of_big == 7 for prompt_of_big in (big[i].input_ids[0] for i in share)) for share in shares)


def test_split_by_tokens_leaves_extra_groups_empty_for_a_single_request():
    assert split_by_tokens([7], 3) == [[0], [], []]


def test_config_rejects_a_world_size_not_divisible_by_model_parallel_size():
    with pytest.raises(ValueError, match="not a multiple"):
        ReplicaConfig(backend="megatron", gpus_per_replica_node=3, tensor_model_parallel_size=2)


def test_config_rejects_model_parallelism_with_the_hf_backend():
    with pytest.raises(ValueError, match="hf backend"):
        ReplicaConfig(gpus_per_replica_node=2, tensor_model_parallel_size=2)


def test_config_layout_and_engine_kwargs_for_a_model_parallel_backend():
    config = ReplicaConfig(backend="megatron", nodes_per_replica=2, gpus_per_replica_node=4, tensor_model_parallel_size=2,
                           pipeline_model_parallel_size=2, num_replicas=3)
    assert (config.world_size, config.model_parallel_size, config.data_parallel_size, config.total_gpus) == (8, 4, 2, 24)
    assert config.build_engine_kwargs() == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert ReplicaConfig().build_engine_kwargs() == {}


def test_default_data_parallel_rank_follows_megatron_rank_order():
    # tp=2, dp=2, pp=2: ranks 0,1 -> dp0; 2,3 -> dp1; 4,5 -> dp0 (next pipeline stage); 6,7 -> dp1
    assert [default_data_parallel_rank(r, 2, 2) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


def _info(rank: int, dp_rank: int, returns: bool) -> WorkerInfo:
    return WorkerInfo(rank, 4, dp_rank, returns, "127.0.0.1", "n", 1, "cpu", "gloo")


def test_executor_needs_exactly_one_result_rank_per_data_parallel_group():
    model = ModelInfo("Fake", 10, 10, 8, 1, "float32", "cpu", False)
    infos = [_info(0, 0, False), _info(1, 0, True), _info(2, 1, False), _info(3, 1, True)]
    executor = RayWorkerExecutor("r", [None] * 4, infos, model, {})
    assert executor.groups == [[0, 1], [2, 3]]
    bad = [_info(0, 0, True), _info(1, 0, True)]
    with pytest.raises(RuntimeError, match="exactly one"):
        RayWorkerExecutor("r", [None] * 2, bad, model, {})


# ---------------------------------------------------------------------- Ray: placement
async def test_more_gpus_than_the_cluster_has_fails_clearly_within_the_timeout(ray_cluster, tiny_model):
    config = replica_config(tiny_model, gpus_per_replica_node=5, start_timeout_s=2.0)
    replica = ModelEngineReplica(config)
    started = time.monotonic()
    with pytest.raises(PlacementTimeout) as raised:
        await replica.start()
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert "1 node(s) x 5 bundle(s)" in message and "5 GPUs" in message
    assert "Cluster total: GPU=4" in message and "available now: GPU=" in message
    assert elapsed < 2.0 + 10.0  # the configured timeout plus clean-up, never a hang
    await assert_nothing_left()


# ---------------------------------------------------------------------- Ray: one replica, a dead worker
async def test_dead_worker_fails_its_batch_with_worker_failed_and_marks_the_replica_dead(ray_cluster, tiny_model):
    import ray

    replica = ModelEngineReplica(replica_config(tiny_model, gpus_per_replica_node=1), index=7)
    assert isinstance(replica, LogProbService)
    await replica.start()
    try:
        infos = await replica.worker_placements()
        assert [(i.rank, i.data_parallel_rank, i.returns_results) for i in infos] == [(0, 0, True)]
        assert infos[0].dist_backend == ("nccl" if torch.cuda.is_available() else "gloo")
        served = await replica.score(random_requests(4, 512, seed=5, max_len=100))
        assert all(isinstance(o, LogProbResult) for o in served)

        requests = random_requests(300, 512, seed=6, min_len=200, max_len=400)
        scoring = asyncio.ensure_future(replica.score(requests))
        await wait_until(lambda: replica.status()["batches_total"] >= 1 and replica.status()["queue_depth"] > 0,
                         "a first batch done with more queued")
        ray.kill(replica.workers[0], no_restart=True)
        outcomes = await asyncio.wait_for(scoring, DEADLINE_S)

        failed = [o for o in outcomes if not isinstance(o, LogProbResult)]
        assert failed, "requests queued behind the killed worker cannot all have been served"
        assert all(isinstance(o, WorkerFailed) for o in failed)
        assert any("replica-7: worker rank 0 died" in o.message for o in failed)
        assert not replica.alive
        assert (await replica.health())["alive"] is False
        late = await asyncio.wait_for(replica.score(random_requests(2, 512, seed=7, max_len=50)), DEADLINE_S)
        assert all(isinstance(o, WorkerFailed) for o in late)
    finally:
        await replica.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


def test_a_prompt_follows_its_replica_while_that_replica_is_within_the_slack():
    affinity = PromptAffinity(capacity=2)
    assert pick_replica({0: 0, 1: 0}, affinity.preferred("a"), 100) == 0
    affinity.record("a", 1)
    assert pick_replica({0: 0, 1: 100}, affinity.preferred("a"), 100) == 1  # within the slack
    assert pick_replica({0: 0, 1: 101}, affinity.preferred("a"), 100) == 0  # too busy: the least busy
    assert pick_replica({0: 5}, affinity.preferred("a"), 100) == 0  # its replica is not a candidate
    affinity.record("b", 0)
    affinity.record("c", 0)
    assert affinity.preferred("a") is None and affinity.preferred("c") == 0  # the oldest is forgotten
    assert affinity.preferred(None) is None


async def test_the_manager_keeps_each_grpo_group_on_one_replica_and_stays_exact(ray_cluster, tiny_model):
    """Two groups sent interleaved (5 and 3 samples): by load alone the replicas would get 4
    each; with prompt affinity each group goes whole to one replica."""
    manager = ReplicaManager(replica_config(tiny_model, num_replicas=2))
    await manager.start()
    try:
        rng = random.Random(4)
        prompts = {name: [rng.randrange(512) for _ in range(60)] for name in "ab"}
        order = ["a", "b", "a", "b", "a", "b", "a", "a"]
        requests = [LogProbRequest(input_ids=prompts[g] + [rng.randrange(512) for _ in range(40)], response_start=60,
                                   temperature=1.0, return_entropy=True) for g in order]
        outcomes = await asyncio.wait_for(manager.score(requests), DEADLINE_S)
        assert sorted(manager.routed_requests) == [3, 5]
        assert manager.replicas[0].shares_prompts
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    assert_matches_reference(tiny_model, requests, outcomes)
    await assert_nothing_left()


async def score_while_replica_0_dies(manager: ReplicaManager, requests: list[LogProbRequest]) -> list:
    """Score `requests`; once replica 0 has a batch running and more queued, kill its worker."""
    import ray

    scoring = asyncio.ensure_future(manager.score(requests))
    first = manager.replicas[0]
    await wait_until(lambda: first.status()["batches_total"] >= 1 and first.status()["queue_depth"] > 0,
                     "replica 0 busy with more queued")
    ray.kill(first.workers[0], no_restart=True)
    return await asyncio.wait_for(scoring, DEADLINE_S)


def requests_counted(metrics: ServerMetrics, outcome: str) -> float:
    """`requests_total` for one outcome, over every error code."""
    return sum(sample.value for family in metrics.registry.collect() if family.name == "model_engine_server_requests"
               for sample in family.samples if sample.name.endswith("_total") and sample.labels["outcome"] == outcome)


# ---------------------------------------------------------------------- Ray: manager without retry
async def test_manager_without_retry_fails_lost_requests_and_stops_routing_to_the_dead_replica(ray_cluster, tiny_model):
    import ray

    config = replica_config(
        tiny_model, num_replicas=2, retry_on_worker_failure=False, health_check_interval_s=0.5, auto_restart=False
    )
    metrics = ServerMetrics()
    manager = ReplicaManager(config, metrics.observer)
    assert isinstance(manager, LogProbService)
    await manager.start()
    try:
        outcomes = await score_while_replica_0_dies(manager, random_requests(300, 512, seed=8, min_len=200, max_len=400))

        lost = [o for o in outcomes if not isinstance(o, LogProbResult)]
        assert lost and all(isinstance(o, WorkerFailed) and "replica-0" in o.message for o in lost)
        assert any(isinstance(o, LogProbResult) for o in outcomes)  # replica 1 kept serving
        # each request counted once: a lost one as failed (by the manager), never also by its replica
        assert requests_counted(metrics, "failed") == len(lost)
        assert requests_counted(metrics, "ok") == len(outcomes) - len(lost)
        status = manager.status()
        assert status["live_replicas"] == 1 and status["replicas"][0]["alive"] is False

        routed_before = manager.routed_requests[0]
        later = await asyncio.wait_for(manager.score(random_requests(6, 512, seed=9, max_len=80)), DEADLINE_S)
        assert all(isinstance(o, LogProbResult) for o in later)
        assert manager.routed_requests[0] == routed_before

        ray.kill(manager.replicas[1].workers[0], no_restart=True)  # idle: only the health monitor can notice
        await wait_until(lambda: not manager.replicas[1].alive, "the monitor marking replica 1 dead", interval_s=0.05)
        (outcome,) = await manager.score(random_requests(1, 512, seed=12, max_len=40))
        assert isinstance(outcome, WorkerFailed) and "no live replica" in outcome.message
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


# ---------------------------------------------------------------------- Ray: automatic restart
async def test_the_monitor_restarts_a_dead_replica_with_the_current_weights_up_to_max_restarts(ray_cluster, tiny_model):
    import ray

    config = replica_config(tiny_model, num_replicas=2, health_check_interval_s=0.3, max_restarts=1)
    manager = ReplicaManager(config)
    await manager.start()
    try:
        await manager.update_weights(list(_new_weights(tiny_model, seed=30).items()), 1)
        probe = random_requests(3, 512, seed=31, max_len=120)
        before = [await manager.replicas[0].submit(r) for r in probe]

        ray.kill(manager.replicas[1].workers[0], no_restart=True)  # idle: only the monitor notices
        await wait_until(lambda: manager.replicas[1].restarts == 1 and manager.status()["live_replicas"] == 2
                         and 1 not in manager._joining, "the monitor restarting replica 1", deadline_s=DEADLINE_S)
        restarted = manager.replicas[1]
        assert restarted.weight_version == 1  # copied from the live peer, not the model path's version 0
        for request, expected in zip(probe, before):
            got = await restarted.submit(request)
            assert got.weight_version == 1
            np.testing.assert_array_equal(got.log_probs, expected.log_probs)

        ray.kill(restarted.workers[0], no_restart=True)  # max_restarts=1: this time it stays dead
        await wait_until(lambda: not manager.replicas[1].alive, "the monitor marking replica 1 dead", deadline_s=DEADLINE_S)
        await asyncio.sleep(1.5)  # several monitor rounds
        assert manager.replicas[1].restarts == 1 and not manager.replicas[1].alive
        outcomes = await manager.score(random_requests(4, 512, seed=32, max_len=60))
        assert all(isinstance(o, LogProbResult) and o.weight_version == 1 for o in outcomes)
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


def _new_weights(model_path, seed: int) -> dict[str, torch.Tensor]:
    engine = build_engine("hf", EngineSpec(model_path=str(model_path)))
    return perturbed_weights(dict(engine.export_weights()), seed=seed, scale=0.05)


async def test_a_begun_update_nobody_finishes_is_aborted_and_the_next_one_lands(ray_cluster, tiny_model):
    """The publisher vanishes after begin: past weight_update_timeout_s the manager lets go of the
    update (no lock held forever, no "already in progress" for every later publisher)."""
    scheduler = SchedulerConfig(max_tokens_per_batch=2048, max_wait_ms=2.0, weight_update_timeout_s=1.0)
    manager = ReplicaManager(replica_config(tiny_model, scheduler=scheduler))
    await manager.start()
    try:
        await manager.begin_weight_update(1)  # ... and nothing more
        await wait_until(lambda: not manager.status()["updating_weights"], "the deadline aborting the update", deadline_s=30)
        await manager.update_weights(list(_new_weights(tiny_model, seed=41).items()), 2)
        (outcome,) = await manager.score(random_requests(1, 512, seed=40, max_len=50))
        assert isinstance(outcome, LogProbResult) and outcome.weight_version == 2
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


# ---------------------------------------------------------------------- real GPUs (skipped without CUDA)
@pytest.mark.gpu
async def test_two_workers_on_real_gpus_form_an_nccl_group_and_score(ray_cluster, tiny_model):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    replica = ModelEngineReplica(replica_config(tiny_model, gpus_per_replica_node=2), index=8)
    await replica.start()
    try:
        infos = await replica.worker_placements()
        assert all(i.dist_backend == "nccl" and i.device.startswith("cuda") for i in infos)
        assert len({tuple(i.gpu_ids) for i in infos}) == 2
        outcomes = await replica.score(random_requests(8, 512, seed=10, max_len=200))
        assert all(isinstance(o, LogProbResult) for o in outcomes)
    finally:
        await replica.shutdown()
    await assert_nothing_left()


# ---------------------------------------------------------------------- Megatron plugs in unchanged
async def test_megatron_pipeline_replica_takes_results_from_its_last_stage(ray_cluster, tiny_model):
    """Two workers, pipeline-parallel size 2: the process group is formed before the engine,
    only the last stage (rank 1) returns results, and they match plain transformers."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("mbridge")
    from tests.helpers import assert_matches_reference

    config = replica_config(tiny_model, backend="megatron", gpus_per_replica_node=2, pipeline_model_parallel_size=2)
    replica = ModelEngineReplica(config, index=9)
    await replica.start()
    try:
        infos = await replica.worker_placements()
        assert [(i.rank, i.data_parallel_rank, i.returns_results) for i in infos] == [(0, 0, False), (1, 0, True)]
        assert replica.executor is not None and replica.executor.groups == [[0, 1]]
        requests = random_requests(8, 512, seed=11, max_len=300)
        outcomes = await asyncio.wait_for(replica.score(requests), DEADLINE_S)
        assert_matches_reference(tiny_model, requests, outcomes)
    finally:
        await replica.shutdown()
    await assert_nothing_left()
