"""Replica failures the manager must route around: a sticky engine failure, a rank a health
check found silent, a replica with incomplete weights or a full queue, a retry's deadline, a
replica lost during a sync verl's checkpoint engine drives.

The executor tests run `RayWorkerExecutor` over real Ray actors that stand in for workers. The
manager tests run the real `ReplicaManager`, `ModelEngineReplica` and `ModelEngineServer` with
the scheduler tests' `FakeExecutor` in place of each replica's Ray workers (routing and the
update bookkeeping are what is tested; real workers are in `test_replica.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest
import torch

from checkpoint_transport.spec import ReceiveReport
from model_engine_server.engines.base import EngineSpec, ModelInfo
from model_engine_server.errors import DeadlineExceeded, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult, ScoreOutput
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from replica.config import ReplicaConfig
from replica.executor import RayWorkerExecutor
from replica.manager import ReplicaManager
from replica.replica import ModelEngineReplica
from replica.worker import WorkerInfo
from tests.fakes import FakeExecutor, request

MODEL_INFO = ModelInfo("Stand-in", 100, 10_000, 8, 1, "float32", "cpu", False)


# ---------------------------------------------------------------------- RayWorkerExecutor over stand-in actors
def _worker_class():
    import ray

    @ray.remote(num_cpus=0)
    class StandInWorker:
        """Answers `score` as a worker whose engine works, fails every request, or hangs."""

        def __init__(self, mode: str) -> None:
            self.mode = mode

        async def score(self, requests: list[LogProbRequest]) -> list[WorkerFailed | ScoreOutput]:
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "long requests fail":  # e.g. out of memory on them: the engine itself works
                return [WorkerFailed("scoring failed: OutOfMemoryError") if r.num_tokens > 4
                        else ScoreOutput(log_probs=np.zeros(r.num_response_tokens, np.float32)) for r in requests]
            if self.mode == "answer":
                return [ScoreOutput(log_probs=np.zeros(r.num_response_tokens, np.float32)) for r in requests]
            return [WorkerFailed("scoring failed: RuntimeError: CUDA error: an illegal memory access") for _ in requests]

    return StandInWorker


@contextlib.contextmanager
def _stand_in(mode: str):
    import ray

    worker = _worker_class().remote(mode)
    try:
        yield worker
    finally:
        ray.kill(worker, no_restart=True)


def _executor(*workers, **kwargs) -> RayWorkerExecutor:
    """One data-parallel group per stand-in worker."""
    infos = [WorkerInfo(rank=rank, world_size=len(workers), data_parallel_rank=rank, returns_results=True,
                        node_ip="127.0.0.1", node_id="node", pid=0, device="cpu", dist_backend="gloo")
             for rank in range(len(workers))]
    return RayWorkerExecutor("replica-9", list(workers), infos, MODEL_INFO, {}, **kwargs)


async def test_an_engine_failing_every_request_of_batches_in_a_row_marks_its_executor_failed(ray_cluster):
    with _stand_in("fail") as worker:
        failures: list[str] = []
        executor = _executor(worker, on_failure=failures.append, max_failed_batches_in_a_row=3)
        for _ in range(2):
            outcomes = await executor.execute([request(8), request(9)])
            assert all(isinstance(o, WorkerFailed) for o in outcomes)
            assert executor.failure is None  # a bad batch or two may be the requests' own
        await executor.execute([request(8)])
        assert executor.failure is not None and "failed every request of 3 batches in a row" in executor.failure
        assert "two-token probe" in executor.failure
        assert failures == [executor.failure]  # the replica hears of it (and leaves routing)
        with pytest.raises(WorkerFailed):
            await executor.execute([request(8)])


async def test_one_broken_data_parallel_group_of_two_marks_its_executor_failed(ray_cluster):
    with _stand_in("answer") as healthy, _stand_in("fail") as broken:
        executor = _executor(healthy, broken, max_failed_batches_in_a_row=3)
        for _ in range(3):  # half of every batch fails: the broken group's share
            outcomes = await executor.execute([request(8), request(9), request(10), request(11)])
            assert any(isinstance(o, ScoreOutput) for o in outcomes)
            assert any(isinstance(o, WorkerFailed) for o in outcomes)
        assert executor.failure is not None and "data-parallel group 1" in executor.failure


async def test_one_request_the_engine_cannot_score_resent_many_times_leaves_the_replica_serving(ray_cluster):
    with _stand_in("long requests fail") as worker:
        executor = _executor(worker, max_failed_batches_in_a_row=3)
        for _ in range(7):  # a client resending the request the engine cannot score
            (outcome,) = await executor.execute([request(8)])
            assert isinstance(outcome, WorkerFailed)
        assert executor.failure is None  # the probe was scored: the engine works
        (outcome,) = await executor.execute([request(3)])
        assert isinstance(outcome, ScoreOutput)


async def test_a_failure_found_by_a_health_check_fails_the_batch_waiting_on_the_silent_rank_at_once(ray_cluster):
    with _stand_in("hang") as worker:
        executor = _executor(worker, batch_timeout_s=600.0)
        batch = asyncio.ensure_future(executor.execute([request(8)]))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        executor.mark_failed("replica-9: health check: rank 0 did not answer a ping within 10 s")
        with pytest.raises(WorkerFailed, match="health check"):
            await asyncio.wait_for(batch, 10.0)
        assert time.monotonic() - started < 5.0


# ---------------------------------------------------------------------- the manager over in-process replicas
class InProcessExecutor(FakeExecutor):
    """What `ModelEngineReplica` needs of its executor beyond the scheduler's; its engine
    shares prompts, so the manager keeps a prompt's samples together."""

    def __init__(self, compute_s: float) -> None:
        super().__init__(compute_s)
        self._info = ModelInfo("Fake", 100, 10_000, 8, 1, "float32", "cpu", False, shares_prompts=True)

    async def load_weights_ref(self, bucket):
        return await self.load_weights(bucket)

    async def export_weight_buckets(self):
        return [[("w", torch.tensor(self.weights))]]

    def participants(self) -> list[str]:
        return ["rank-0"]

    def mark_failed(self, reason: str) -> None:
        pass


@pytest.fixture
def in_process_replicas(monkeypatch):
    async def start(self, timeout_s=None):
        if self.server is None:
            self.failure = None
            self.executor = InProcessExecutor(compute_s=0.01)
            self.workers = ["rank-0"]
            self.server = ModelEngineServer(self.executor, self.config.scheduler, None, self.config.initial_weight_version)
            await self.server.start()
            self.started_at = time.time()
        return self

    async def teardown(self):
        self.workers, self.executor = [], None

    async def health(self):
        return {"replica": self.index, "alive": self.alive, "reason": self.failure}

    monkeypatch.setattr(ModelEngineReplica, "start", start)
    monkeypatch.setattr(ModelEngineReplica, "_teardown", teardown)
    monkeypatch.setattr(ModelEngineReplica, "health", health)


def _manager(**overrides) -> ReplicaManager:
    fields = dict(engine=EngineSpec(model_path="/nonexistent"), num_replicas=2, health_check_interval_s=None,
                  scheduler=SchedulerConfig(max_tokens_per_batch=64, max_queued_tokens=64, max_wait_ms=1.0))
    fields.update(overrides)
    return ReplicaManager(ReplicaConfig(**fields))


@contextlib.asynccontextmanager
async def _running(**overrides):
    manager = await _manager(**overrides).start()
    try:
        yield manager
    finally:
        await manager.shutdown(drain=False, timeout_s=1.0)


def _die(replica: ModelEngineReplica, reason: str) -> None:
    replica.failure = reason  # what a worker death or a failed health check leaves


async def test_requests_go_to_the_replica_that_can_serve_not_one_with_incomplete_weights(in_process_replicas):
    async with _running() as manager:
        manager.replicas[0].mark_weights_incomplete("a sync aborted midway")
        outcomes = await manager.score([request(10) for _ in range(6)], timeout_s=5.0)
        assert all(isinstance(o, LogProbResult) for o in outcomes)
        assert manager.routed_requests == [0, 6]


async def test_a_grpo_sample_skips_its_prompts_replica_when_that_queue_is_full(in_process_replicas):
    async with _running() as manager:
        await manager.pause_serving()
        first = asyncio.ensure_future(manager.submit(request(60, response_start=50), timeout_s=5.0))
        await asyncio.sleep(0.05)  # queued on its replica: 60 of 64 tokens
        second = asyncio.ensure_future(manager.submit(request(60, response_start=50), timeout_s=5.0))
        await asyncio.sleep(0.05)
        assert sorted(manager.routed_requests) == [1, 1]  # the same prompt, but the other replica had room
        await manager.resume_serving()
        assert all(isinstance(o, LogProbResult) for o in await asyncio.gather(first, second))


async def test_a_retried_request_keeps_its_first_deadline(in_process_replicas):
    async with _running() as manager:
        await manager.pause_serving()
        started = time.monotonic()
        lost = asyncio.ensure_future(manager.submit(request(10), timeout_s=1.0))
        await asyncio.sleep(0.8)
        victim = next(r for r in manager.replicas if manager.outstanding_tokens[r.index])
        _die(victim, f"{victim.name}: worker rank 0 died")
        await victim.server.shutdown(drain=False, timeout_s=0.1)  # its queue fails over to the peer
        with pytest.raises(DeadlineExceeded):
            await lost
        assert manager.retried_requests == 1
        assert time.monotonic() - started < 1.6  # one deadline of 1 s, not a fresh one per attempt


async def test_a_replica_lost_during_a_verl_driven_sync_leaves_it_and_the_others_commit(in_process_replicas):
    async with _running() as manager:
        joins = [asyncio.ensure_future(manager.join_worker_update(1, index, 0)) for index in (0, 1)]
        assert await asyncio.gather(*joins) == [True, True]
        for replica in manager.replicas:
            await replica.executor.load_weights([("w", torch.tensor(1.0))])
        _die(manager.replicas[1], "replica-1: worker rank 0 died")
        report = ReceiveReport(rank=0, version=1, ok=True, names_loaded=["w"], buckets=1)
        await asyncio.wait_for(manager.report_worker_update(1, 0, 0, report), 5.0)
        assert manager.weight_version == 1
        (outcome,) = await manager.score([request(10)], timeout_s=5.0)
        assert isinstance(outcome, LogProbResult) and outcome.weight_version == 1


async def test_a_replica_lost_after_the_others_reported_is_settled_by_the_health_monitor(in_process_replicas):
    async with _running(health_check_interval_s=0.1, auto_restart=False) as manager:
        assert await asyncio.gather(*(manager.join_worker_update(1, index, 0) for index in (0, 1))) == [True, True]
        await manager.replicas[0].executor.load_weights([("w", torch.tensor(1.0))])
        report = ReceiveReport(rank=0, version=1, ok=True, names_loaded=["w"], buckets=1)
        reported = asyncio.ensure_future(manager.report_worker_update(1, 0, 0, report))
        await asyncio.sleep(0.2)
        assert not reported.done()  # replica 1 has not reported yet
        _die(manager.replicas[1], "replica-1: worker rank 0 died")
        await asyncio.wait_for(reported, 5.0)
        assert manager.weight_version == 1



async def test_two_commits_of_one_update_at_once_both_return_its_outcome(in_process_replicas):
    async with _running() as manager:
        await manager.begin_weight_update(1)
        for replica in manager.replicas:
            await replica.server.load_weights([("w", torch.tensor(1.0))], 1)
        both = await asyncio.gather(manager.commit_weight_update(1), manager.commit_weight_update(1),
                                    return_exceptions=True)
        assert both == [None, None]
        assert manager.weight_version == 1 and all(r.weight_version == 1 for r in manager.replicas)
        assert not manager.status()["weights_incomplete"]
