"""Replicas on Ray through a replica's death and the manager's shutdown.

- A replica restarted during an open weight update leaves it; the others commit and it copies
  the committed weights after. Failed before participants were tied to the server that began:
  the restarted replica looked alive, its fresh scheduler refused the next bucket ("no weight
  update is open"), the update aborted and every replica was left refusing to score.
- Requests the manager's shutdown leaves unanswered, or that arrive during it, are answered
  `shutting_down` (which clients retry elsewhere). Before, they came back `worker_failed`
  ("request lost with replica-0: None"), as if a replica had died.
"""

from __future__ import annotations

import asyncio

import pytest

from model_engine_server.errors import ServerShuttingDown
from model_engine_server.protocol import LogProbResult
from replica.manager import ReplicaManager
from tests.helpers import random_requests
from tests.test_replica import DEADLINE_S, _new_weights, assert_nothing_left, replica_config, wait_until


async def test_a_replica_restarted_during_an_update_leaves_it_and_copies_the_committed_weights(ray_cluster, tiny_model):
    import ray

    manager = ReplicaManager(replica_config(tiny_model, num_replicas=2, health_check_interval_s=0.3, max_restarts=1))
    await manager.start()
    try:
        await manager.update_weights(list(_new_weights(tiny_model, seed=50).items()), 1)
        assert await manager.begin_weight_update(2) == 2
        ray.kill(manager.replicas[1].workers[0], no_restart=True)
        await wait_until(lambda: manager.replicas[1].restarts == 1 and manager.replicas[1].alive,
                         "the monitor restarting replica 1 while the update is open", deadline_s=DEADLINE_S)
        assert 1 in manager._joining  # its weight copy waits for the update to finish

        await manager.load_weights(list(_new_weights(tiny_model, seed=51).items()), 2)
        await manager.commit_weight_update(2)
        assert manager.weight_version == 2
        await wait_until(lambda: 1 not in manager._joining, "replica 1 copying version 2", deadline_s=DEADLINE_S)
        for replica in manager.replicas:
            status = replica.status()
            assert status["weight_version"] == 2 and status["weights_incomplete"] is None, (replica.name, status)
        probe = random_requests(2, 512, seed=52, max_len=60)
        first = [await manager.replicas[0].submit(r) for r in probe]
        second = [await manager.replicas[1].submit(r) for r in probe]
        for a, b in zip(first, second):
            assert isinstance(b, LogProbResult) and a.weight_version == b.weight_version == 2
            assert (a.log_probs == b.log_probs).all()  # the same weights, the same CPU kernels
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


async def test_requests_the_shutdown_leaves_or_that_arrive_during_it_are_answered_shutting_down(ray_cluster, tiny_model):
    manager = ReplicaManager(replica_config(tiny_model, num_replicas=1, health_check_interval_s=None))
    await manager.start()
    try:
        await manager.pause_serving()  # the requests stay queued past the drain's deadline
        queued = [asyncio.ensure_future(manager.submit(r)) for r in random_requests(3, 512, seed=53, max_len=40)]
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(manager.shutdown(drain=True, timeout_s=0.5))
        await asyncio.sleep(0)
        with pytest.raises(ServerShuttingDown, match="accepts no new requests"):
            await manager.submit(random_requests(1, 512, seed=54, max_len=40)[0])
        await stopping
        for outcome in await asyncio.gather(*queued, return_exceptions=True):
            assert isinstance(outcome, ServerShuttingDown), outcome
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()


async def test_a_request_retried_after_its_replica_died_is_counted_once_ok_and_its_lost_attempt_as_lost(
    ray_cluster, tiny_model
):
    """Once counted failed by the dead replica and ok by the one that retried it, which doubled
    the error rate a dashboard shows."""
    from model_engine_server.http.metrics import ServerMetrics
    from tests.test_replica import requests_counted, score_while_replica_0_dies

    metrics = ServerMetrics()
    manager = ReplicaManager(replica_config(tiny_model, num_replicas=2, health_check_interval_s=None, auto_restart=False),
                             metrics.observer)
    await manager.start()
    try:
        requests = random_requests(300, 512, seed=55, min_len=200, max_len=400)
        outcomes = await score_while_replica_0_dies(manager, requests)
        assert all(isinstance(o, LogProbResult) for o in outcomes) and manager.retried_requests > 0
        assert requests_counted(metrics, "ok") == len(requests) and requests_counted(metrics, "failed") == 0
        assert requests_counted(metrics, "lost") == manager.retried_requests
    finally:
        await manager.shutdown(drain=False, timeout_s=5.0)
    await assert_nothing_left()
