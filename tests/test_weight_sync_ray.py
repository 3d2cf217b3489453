"""Weight sync across real Ray processes: two worker actors holding HF engines, a server actor
gating them, and a trainer-rank actor that publishes — or dies in the middle of sending."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from checkpoint_transport.sender import send_weights
from checkpoint_transport.spec import TransportConfig, TransportSpec
from checkpoint_transport.receiver import receive_into_engine
from clients.sync_targets import ActorSyncTarget
from replica.executor import receive_on_workers
from clients.publisher import WeightPublisher
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, ModelInfo, WeightSpec, build_engine
from model_engine_server.errors import WeightSyncError
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from tests._tolerances import assert_distinguishable, assert_scores_close
from tests.helpers import random_requests

BUCKET_BYTES = 16 << 10


class SyncWorker:
    """What a replica's worker adds for the transport: one `receive_weights` method."""

    def __init__(self, model_path: str) -> None:
        self.engine = build_engine("hf", EngineSpec(model_path=model_path))
        self.adapter = ModelEngineServerAdapter(self.engine, 8192)

    def receive_weights(self, spec: dict[str, Any], version: int) -> dict[str, Any]:
        return receive_into_engine(TransportSpec.model_validate(spec), self.engine, version).to_dict()

    def discard_partial_weights(self) -> None:
        self.engine.discard_partial_weights()

    def score(self, requests: Sequence[LogProbRequest]) -> list[Any]:
        return self.adapter.score(list(requests))

    def model_info(self) -> ModelInfo:
        return self.engine.info

    def weight_specs(self) -> dict[str, WeightSpec]:
        return self.engine.weight_specs()


class RoundRobinWorkers:
    """A minimal executor over full-copy workers (the replica layer's is richer); batches
    alternate between workers so results prove every worker got the weights."""

    def __init__(self, workers: list[Any], info: ModelInfo) -> None:
        self.workers, self.info, self.turn = workers, info, 0

    def model_info(self) -> ModelInfo:
        return self.info

    async def execute(self, requests):
        self.turn += 1
        return await self.workers[self.turn % len(self.workers)].score.remote(list(requests))

    async def load_weights(self, named_tensors):
        raise NotImplementedError("weights reach these workers through checkpoint_transport")

    async def weight_specs(self):
        return await self.workers[0].weight_specs.remote()

    def participants(self) -> list[str]:
        return [f"rank-{rank}" for rank in range(len(self.workers))]

    async def discard_partial_weights(self) -> None:
        await asyncio.gather(*(worker.discard_partial_weights.remote() for worker in self.workers))

    async def receive_weights(self, spec: TransportSpec, version: int, first_rank: int):
        return await receive_on_workers(self.workers, spec, version, first_rank)

    async def close(self) -> None:
        pass


class SyncServerHost:
    """A server actor: the scheduler in front of the workers, and the sync target for them."""

    def __init__(self, workers: list[Any]) -> None:
        import ray

        self.workers = workers
        self.server = ModelEngineServer(
            RoundRobinWorkers(workers, ray.get(workers[0].model_info.remote())), SchedulerConfig(request_timeout_s=120)
        )

    async def begin_weight_update(self, version: int) -> int:
        return await self.server.begin_weight_update(version)

    async def receive_weights(self, spec: dict[str, Any], version: int) -> list[dict[str, Any]]:
        reports = await self.server.receive_weights(TransportSpec.model_validate(spec), version)
        return [report.to_dict() for report in reports]

    async def commit_weight_update(self, version: int) -> None:
        await self.server.commit_weight_update(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.server.abort_weight_update(reason, version)

    async def get_status(self) -> dict[str, Any]:
        return self.server.status()

    async def score(self, requests: list[LogProbRequest]) -> list[Any]:
        return await self.server.score(requests)

    async def shutdown(self) -> None:
        await self.server.shutdown(drain=False, timeout_s=5)


class TrainerRank:
    """A trainer rank: holds weights, publishes them itself, or sends for a remote publisher."""

    def __init__(self, base: dict[str, torch.Tensor], host: Any, backend: str) -> None:
        self.base = base
        self.publisher = WeightPublisher(
            ActorSyncTarget(host), TransportConfig(backend=backend, bucket_bytes=BUCKET_BYTES, timeout_s=30)
        )

    def publish(self, version: int, seed: int) -> dict[str, Any]:
        report = self.publisher.update_weights_blocking(perturbed_weights(self.base, seed), version)
        return {"ok": report.ok, "buckets": report.send.buckets, "workers": len(report.receives)}

    def send_then_hang(self, spec: dict[str, Any], version: int, seed: int, marker: str) -> dict[str, Any]:
        def stream():
            items = list(perturbed_weights(self.base, seed).items())
            yield from items[:4]
            Path(marker).write_text("stalled")  # the driver kills this process now
            time.sleep(600)
            yield from items[4:]

        return send_weights(TransportSpec.model_validate(spec), stream(), version).to_dict()


@pytest.fixture(scope="module")
def base_weights(tiny_model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in build_engine("hf", EngineSpec(model_path=str(tiny_model))).export_weights()}


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_model):
    """Two workers and the server actor over them, for the whole module."""
    ray = ray_cluster
    worker_class = ray.remote(num_cpus=1)(SyncWorker)
    workers = [worker_class.remote(str(tiny_model)) for _ in range(2)]
    host = ray.remote(num_cpus=0)(SyncServerHost).remote(workers)
    ray.get(host.get_status.remote(), timeout=180)
    yield host
    ray.get(host.shutdown.remote(), timeout=60)
    for actor in (host, *workers):
        ray.kill(actor)


@pytest.fixture(scope="module")
def reference(tiny_model) -> ModelEngineServerAdapter:
    return ModelEngineServerAdapter(build_engine("hf", EngineSpec(model_path=str(tiny_model))), 8192)


def expected_log_probs(reference: ModelEngineServerAdapter, weights, requests) -> list[np.ndarray]:
    """Scored in this process (2 torch threads) while the workers run 1: equal to
    `CROSS_PROCESS_ATOL`, not bitwise (tests/_tolerances.py)."""
    reference.engine.load_weights(weights.items())
    return [reference.score([request])[0].log_probs for request in requests]


async def next_version(host) -> int:
    return (await host.get_status.remote())["weight_version"] + 1


@pytest.mark.parametrize("backend", ["gloo", "ray"])
async def test_a_trainer_rank_actor_publishes_to_every_worker(backend, ray_cluster, cluster, base_weights, reference):
    host = cluster
    trainer = ray_cluster.remote(num_cpus=0)(TrainerRank).remote(base_weights, host, backend)
    version, seed = await next_version(host), {"gloo": 40, "ray": 41}[backend]  # each run brings new weights
    requests = random_requests(4, 512, seed=7)
    held_before = [(await host.score.remote([request]))[0].log_probs for request in requests]
    try:
        report = await trainer.publish.remote(version, seed)
    finally:
        ray_cluster.kill(trainer)
    assert report == {"ok": True, "buckets": report["buckets"], "workers": 2} and report["buckets"] > 1

    expected = expected_log_probs(reference, perturbed_weights(base_weights, seed), requests)
    assert_distinguishable(expected, held_before, "the published vs the workers' previous weights")
    for _ in range(2):  # consecutive calls go to the other worker
        results = [(await host.score.remote([request]))[0] for request in requests]
        for result, want in zip(results, expected):
            assert isinstance(result, LogProbResult) and result.weight_version == version
            assert_scores_close(result.log_probs, want, what=result.request_id)


@pytest.mark.parametrize("backend", ["gloo", "ray"])
async def test_a_sender_killed_mid_stream_leaves_the_version_until_a_complete_sync(
    backend, ray_cluster, cluster, base_weights, reference, tmp_path
):
    host = cluster
    publisher = WeightPublisher(ActorSyncTarget(host), TransportConfig(backend=backend, bucket_bytes=BUCKET_BYTES, timeout_s=30))
    trainer = ray_cluster.remote(num_cpus=0)(TrainerRank).remote(base_weights, host, backend)
    before = await next_version(host) - 1
    marker = tmp_path / "stalled"
    stalled_seed, complete_seed = {"gloo": (50, 51), "ray": (52, 53)}[backend]  # each run brings new weights
    request = random_requests(1, 512, seed=31)[0]
    [held_before] = await host.score.remote([request])

    def send(spec: TransportSpec, version: int):
        return trainer.send_then_hang.remote(spec.model_dump(), version, stalled_seed, str(marker))

    sync = asyncio.ensure_future(publisher.update_weights_from(send, before + 1))
    while not marker.exists():
        await asyncio.sleep(0.05)
    ray_cluster.kill(trainer)  # the sending process dies with buckets in flight
    with pytest.raises(WeightSyncError, match="sender") as raised:
        await asyncio.wait_for(sync, 120)
    assert "died" in str(raised.value) or "left the group" in str(raised.value) or "lost" in str(raised.value)
    status = await host.get_status.remote()
    assert status["weight_version"] == before and status["weights_incomplete"]

    waiting = host.score.remote([request])
    ready, _ = await asyncio.to_thread(ray_cluster.wait, [waiting], timeout=0.5)
    assert not ready, "a request was scored on incomplete weights"

    complete = perturbed_weights(base_weights, seed=complete_seed)
    assert (await publisher.update_weights(complete, before + 2)).ok
    [result] = await waiting
    assert result.weight_version == before + 2
    # the tolerance cannot hide the weights held before, nor the killed stream's 4 tensors mixed in
    stale_parts = dict(list(perturbed_weights(base_weights, seed=stalled_seed).items())[:4])
    [mixed] = expected_log_probs(reference, {**complete, **stale_parts}, [request])
    [want] = expected_log_probs(reference, complete, [request])
    assert_distinguishable([want], [held_before.log_probs], "the complete vs the workers' previous weights")
    assert_distinguishable([want], [mixed], "the complete weights vs them mixed with the killed stream's")
    assert_scores_close(result.log_probs, want, what=result.request_id)
    await publisher.close()


async def test_a_worker_rejecting_a_tensor_aborts_on_every_worker_with_its_rank(ray_cluster, cluster, base_weights):
    host = cluster
    publisher = WeightPublisher(ActorSyncTarget(host), TransportConfig(backend="gloo", bucket_bytes=BUCKET_BYTES, timeout_s=30))
    version = await next_version(host)
    wrong = dict(perturbed_weights(base_weights, seed=60))
    name = next(iter(wrong))
    wrong[name] = torch.zeros(2, 2)
    with pytest.raises(WeightSyncError, match=rf"rank 1: .*{name}.* has shape \(2, 2\).*and 1 more workers failed"):
        await publisher.update_weights(wrong, version)
    status = await host.get_status.remote()
    assert status["weight_version"] == version - 1 and status["weights_incomplete"]
    assert (await publisher.update_weights(base_weights, version)).ok
    assert not (await host.get_status.remote())["weights_incomplete"]
    await publisher.close()
