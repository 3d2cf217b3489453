"""The update session on Ray replicas: the manager enforces it whatever calls arrive.

Before the session existed, an empty update committed a new version on a Ray-backed server
(completeness was decided from "were any buckets loaded"), the receiver count was read before
begin (a replica lost in between made the rendezvous hang to its timeout), and a second begin
queued on the manager's lock instead of being refused.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import ray

from checkpoint_transport.spec import TransportConfig
from clients.publisher import WeightPublisher
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import WeightSyncError
from model_engine_server.protocol import LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from replica.manager import ReplicaManager
from tests.helpers import random_requests
from tests.test_replica import assert_nothing_left, replica_config

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
SCHEDULER = SchedulerConfig(max_tokens_per_batch=2048, max_wait_ms=2.0, request_timeout_s=60)


async def _started_manager(tiny_model) -> ReplicaManager:
    manager = ReplicaManager(replica_config(tiny_model, num_replicas=2, gpus_per_replica_node=2, scheduler=SCHEDULER,
                                            auto_restart=False))
    await manager.start()
    return manager


async def _stop(manager: ReplicaManager) -> None:
    await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_manager(ray_cluster, tiny_model):
    """Two replicas of two workers for every test here: four worker starts are most of this
    module's time. Each test finds them serving with no update open; the last kills a replica."""
    manager = await _started_manager(tiny_model)
    yield manager
    await _stop(manager)


@pytest_asyncio.fixture(loop_scope="module")
async def manager(shared_manager):
    status = shared_manager.status()
    assert status["live_replicas"] == 2 and not status["updating_weights"] and status["weights_incomplete"] is None
    assert not shared_manager.updates.lock.locked(), "an earlier test left the update lock held"
    return shared_manager


def _new_weights(tiny_model, seed: int):
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model)))
    return perturbed_weights(dict(engine.export_weights()), seed=seed, scale=0.05)


async def _served_version(manager: ReplicaManager) -> int:
    outcomes = await manager.score(random_requests(4, 512, seed=3, max_len=40))
    assert all(isinstance(o, LogProbResult) for o in outcomes), outcomes
    versions = {o.weight_version for o in outcomes}
    assert len(versions) == 1
    return versions.pop()


async def test_an_empty_update_is_refused_on_ray_replicas_and_the_version_stays(manager):
    before = manager.weight_version
    with pytest.raises(WeightSyncError, match="is missing"):
        await manager.update_weights([], before + 5)
    status = manager.status()
    assert manager.weight_version == before and status["weights_incomplete"] is None and not status["updating_weights"]
    assert await _served_version(manager) == before


async def test_a_partial_bucket_load_is_refused_at_commit_naming_what_is_missing(manager, tiny_model):
    weights = list(_new_weights(tiny_model, seed=5).items())
    before = manager.weight_version
    version = before + 1
    await manager.begin_weight_update(version)
    await manager.load_weights(weights[:2], version)
    with pytest.raises(WeightSyncError,
                       match=rf"replica-\d: weights of version {version} did not arrive complete: rank-0 is missing"):
        await manager.commit_weight_update(version)
    assert manager.weight_version == before and manager.status()["weights_incomplete"]
    await manager.update_weights(weights, version)  # a complete sync lands afterwards
    assert await _served_version(manager) == version


async def test_a_second_begin_is_refused_at_once_even_while_the_first_waits_for_the_lock(manager):
    before = manager.weight_version
    await manager.updates.lock.acquire()  # a restart's weight copy holds the lock
    first = asyncio.ensure_future(manager.begin_weight_update(before + 1))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(WeightSyncError, match="already in progress"):
        await manager.begin_weight_update(before + 2)
    assert time.monotonic() - started < 1.0
    manager.updates.lock.release()
    assert await asyncio.wait_for(first, 30) == sum(len(r.workers) for r in manager.replicas)  # every worker receives
    await manager.abort_weight_update("test")
    assert await _served_version(manager) == before


class _KillsAReplicaAfterBegin:
    """A target that loses a replica between begin and the stream (the publisher saw the count
    begin returned, so the broadcast group would wait forever for the dead replica's worker)."""

    def __init__(self, manager: ReplicaManager) -> None:
        self.manager = manager

    async def begin_weight_update(self, version: int) -> int:
        receivers = await self.manager.begin_weight_update(version)
        ray.kill(self.manager.replicas[1].workers[0], no_restart=True)
        await asyncio.wait_for(_await_death(self.manager), 30)  # the health check notices
        return receivers

    async def receive_weights(self, spec, version):
        return await self.manager.receive_weights(spec, version)

    async def commit_weight_update(self, version: int) -> None:
        await self.manager.commit_weight_update(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.manager.abort_weight_update(reason, version)

    async def get_status(self):
        return self.manager.status()


async def _await_death(manager: ReplicaManager) -> None:
    while manager.replicas[1].alive:
        await manager.health()
        await asyncio.sleep(0.1)


async def test_a_replica_lost_between_begin_and_the_stream_fails_the_sync_at_once(manager, tiny_model):
    """Last in the module: it leaves replica-1 dead."""
    before = manager.weight_version
    target = _KillsAReplicaAfterBegin(manager)
    timeout_s = 60.0
    publisher = WeightPublisher(target, TransportConfig(backend="gloo", timeout_s=timeout_s))
    started = time.monotonic()
    try:
        with pytest.raises(WeightSyncError, match=f"replica-1 died after the update to version {before + 1} began"):
            await publisher.update_weights(_new_weights(tiny_model, seed=6), before + 1)
    finally:
        await publisher.close()
    assert time.monotonic() - started < timeout_s / 2  # refused at once, not at the rendezvous timeout
    assert manager.weight_version == before and not manager.status()["updating_weights"]
    outcomes = await manager.score(random_requests(2, 512, seed=4, max_len=40))
    assert all(isinstance(o, LogProbResult) and o.weight_version == before for o in outcomes)
