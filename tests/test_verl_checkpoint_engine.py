"""verl's own weight sync reaches the server: our replicas inside verl's `CheckpointEngineManager`.

Real parts throughout: the Ray service actor with 2 replicas of 1 worker (HF engine on CPU), verl's
real `CheckpointEngineManager`, a trainer-side verl `RayWorkerGroup` of a small `Worker` that
sends weights the way verl's trainer workers do (its engine's per-tensor generator through its
checkpoint engine's `send_weights`; rank 0 sends, rank 1 sits out), our gloo backend loaded
through `custom_backend_module`, and in the same manager call a replica of another type: verl's
own rollout worker (`CheckpointEngineWorker`) around a server adapter that records what it got.
Every sync is checked against an in-process server freshly loaded with the same weights. The
tests share one deployment and run in order: the service serves version 1, then 2. The verl-side
parts are in `tests/verl_checkpoint_engine_parts.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_asyncio
import ray
import torch
from omegaconf import OmegaConf
from ray.exceptions import RayActorError
from verl.checkpoint_engine import CheckpointEngineManager
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
from verl.workers.config import CheckpointEngineConfig, HFModelConfig, RolloutConfig
from verl.workers.rollout import RolloutReplica

from clients.ray_client import RayLogProbClient
from clients.verl.checkpoint_engine import TransportCheckpointEngine
from clients.verl.scoring_replica import ModelEngineServerReplica, join_scoring_pool, scoring_replicas, scoring_rollout_config
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.config import ServerConfig
from model_engine_server.engines.base import EngineSpec
from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform
from model_engine_server.errors import DeadlineExceeded, WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model
from replica.service_actor import start_service_actor, stop_service_actor
from tests._tolerances import assert_distinguishable, assert_scores_close, max_abs_diff
from tests.helpers import random_requests
from tests.test_replica import assert_nothing_left
from tests.verl_checkpoint_engine_parts import (
    CHECKPOINT_ENGINE, Gate, RecordingReplica, WeightSource, checkpoint_weights, new_weights, remove_group,
    trainer_group,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

if not accelerator_present():
    use_cpu_platform()  # verl's platform in this process and (inherited) in the workers it starts
VOCAB = 4096
SHAPE = TinyModelShape(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=4)  # 5 buckets of 1 MB
SCHEDULER = SchedulerConfig(max_tokens_per_batch=4096, max_wait_ms=2.0, weight_update_timeout_s=120.0)
SERVICE_NAME = "model-engine-server-verl-sync-test"
WAIT_S = 120.0  # bound of every wait for a condition below (not a timing assertion)
MEASURED: dict[str, float] = {}  # max |log-prob difference| per check (and more), printed at the end (pytest -s)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("verl_sync") / "model", SHAPE, seed=7)


@pytest.fixture(scope="module")
def model_config(model_dir: Path) -> HFModelConfig:
    return HFModelConfig(path=str(model_dir), load_tokenizer=False)


@pytest.fixture(scope="module")
def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_weights(model_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(ray_cluster, model_dir):
    config = ServerConfig(model_path=str(model_dir), runtime="ray", num_replicas=2, n_gpus_per_node=2,
                          scheduler=SCHEDULER, batch_timeout_s=60.0, ray={"auto_restart": False})
    handle = await start_service_actor(config, name=SERVICE_NAME)
    yield handle
    await stop_service_actor(handle, drain=False, timeout_s=10.0)
    await assert_nothing_left()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(service, model_config) -> list[RolloutReplica]:
    """Our replicas as verl builds a pool: by name from verl's registry, initialised standalone."""
    return await scoring_replicas(scoring_rollout_config(CHECKPOINT_ENGINE, actor_name=SERVICE_NAME), model_config)


@pytest.fixture(scope="module")
def trainer(ray_cluster, model_dir) -> Iterator[RayWorkerGroup]:
    group = trainer_group(model_dir, ranks=2)
    yield group
    remove_group(group)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def other_replica(ray_cluster, model_config) -> RecordingReplica:
    config = RolloutConfig(name="recording", tensor_model_parallel_size=1, checkpoint_engine=CHECKPOINT_ENGINE)
    replica = RecordingReplica(0, config, model_config)
    await replica.init_standalone()
    yield replica
    remove_group(replica.group)


@pytest.fixture
def client(service) -> RayLogProbClient:
    return RayLogProbClient(service, call_timeout_s=WAIT_S)


# ---------------------------------------------------------------------- helpers
async def until(service: Any, predicate, what: str) -> dict[str, Any]:
    """Poll the service's status until `predicate(status)` holds (bounded by WAIT_S)."""
    end = time.monotonic() + WAIT_S
    while not predicate(status := await service.get_status.remote()):
        if time.monotonic() > end:
            raise AssertionError(f"waited {WAIT_S:g} s for {what}; status: {status}")
        await asyncio.sleep(0.02)
    return status


async def fresh_server_scores(model_dir: Path, weights: dict[str, torch.Tensor] | None, version: int,
                              requests: list[LogProbRequest]) -> list[LogProbResult]:
    """The reference: a new in-process server loaded with `weights` as `version` (None: the
    checkpoint itself, version 0), one request at a time."""
    local = build_local_server(EngineSpec(model_path=str(model_dir)), scheduler=SCHEDULER)
    try:
        if weights is not None:
            await local.update_weights(weights.items(), version)
        return [(await local.score([request]))[0] for request in requests]
    finally:
        await local.shutdown(drain=False)


def assert_served_like(outcomes: list[Any], reference: list[LogProbResult], version: int, what: str) -> None:
    assert all(isinstance(o, LogProbResult) for o in outcomes), outcomes
    for outcome, expected in zip(outcomes, reference, strict=True):
        assert outcome.weight_version == version
        assert_scores_close(outcome.log_probs, expected.log_probs, what=f"{what}: {outcome.request_id}")
        assert_scores_close(outcome.entropy, expected.entropy, what=f"{what}: {outcome.request_id} entropy")
    MEASURED[what] = max(max_abs_diff(o.log_probs, e.log_probs) for o, e in zip(outcomes, reference))
    MEASURED[f"{what} (entropy)"] = max(max_abs_diff(o.entropy, e.entropy) for o, e in zip(outcomes, reference))


def served_versions(status: dict[str, Any]) -> list[int]:
    return [replica["weight_version"] for replica in status["replicas"]]


def sync(manager: CheckpointEngineManager, global_steps: int) -> "asyncio.Future[Any]":
    """verl's blocking `update_weights` on a thread of its own, so this loop keeps sending requests."""
    return asyncio.ensure_future(asyncio.to_thread(manager.update_weights, global_steps))


# ---------------------------------------------------------------------- tests
async def test_the_gloo_backend_streams_to_every_receiver_and_survives_one_that_stops_reading(base_weights):
    """Our backend alone, in one process, in verl's order: prepare, build_topology, every
    init_process_group at once, send + receive, finalize. A receiver that stops reading early
    still lets the sender and the others finish; the rank that sits out only walks its generator."""
    engines = [TransportCheckpointEngine(bucket_size=1 << 20, is_master=True, timeout_s=30.0),
               TransportCheckpointEngine(bucket_size=1 << 20)] + [TransportCheckpointEngine(bucket_size=1 << 20) for _ in range(2)]
    actor, rollout = TransportCheckpointEngine.build_topology(2, 2, [engine.prepare() for engine in engines])
    await asyncio.gather(*(asyncio.to_thread(engine.init_process_group, spec=spec)
                           for engine, spec in zip(engines, actor["spec"] + rollout["spec"])))
    sent = new_weights(base_weights, 3)

    async def read_all(engine) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() async for name, tensor in engine.receive_weights(global_steps=5)}

    async def read_one(engine) -> None:
        stream = engine.receive_weights(global_steps=5)
        await anext(stream)
        await stream.aclose()

    metrics, idle, received, _ = await asyncio.wait_for(asyncio.gather(
        engines[0].send_weights(iter(sent.items()), global_steps=5), engines[1].send_weights(iter(sent.items()), 5),
        read_all(engines[2]), read_one(engines[3]),
    ), WAIT_S)
    for engine in engines:
        engine.finalize()
    assert metrics["model_engine_server/weight_sync_seconds"] > 0 and idle == {}
    assert received.keys() == sent.keys() and all(torch.equal(received[name], sent[name]) for name in sent)


async def test_the_pool_is_our_replicas_built_through_verls_registry(pool, service):
    placements = await service.worker_placements.remote()
    assert [type(replica) for replica in pool] == [ModelEngineServerReplica, ModelEngineServerReplica]
    assert [len(replica.workers) for replica in pool] == [len(workers) for workers in placements] == [1, 1]


async def test_one_manager_call_syncs_our_replicas_and_another_type_to_global_steps(
    service, pool, trainer, other_replica, client, model_dir, base_weights
):
    version = 1
    requests = random_requests(8, VOCAB, seed=41, max_len=120)
    gate = Gate.remote()
    trainer.plan_next_sync(seed=11, gate=gate)
    travelled = ray.get(ray.put(pool))  # as verl's fully-async trainer gets its replicas from the rollouter
    manager = CheckpointEngineManager(CHECKPOINT_ENGINE, trainer, [*travelled, other_replica])
    syncing = sync(manager, version)
    await until(service, lambda s: s["updating_weights"] and s["paused"], "the update session to open")
    during = asyncio.ensure_future(client.score(requests, timeout_s=WAIT_S))
    await until(service, lambda s: s["queue_depth"] == len(requests), "the requests to be held in the queues")
    assert not during.done()
    await gate.open.remote()  # the trainer streams now
    await asyncio.wait_for(syncing, WAIT_S)

    outcomes = await asyncio.wait_for(during, WAIT_S)
    status = await service.get_status.remote()
    assert served_versions(status) == [version, version] and status["weights_incomplete"] is None
    weights = new_weights(base_weights, 11)
    reference = await fresh_server_scores(model_dir, weights, version, requests)
    old = await fresh_server_scores(model_dir, None, 0, requests)
    assert_distinguishable([r.log_probs for r in reference], [r.log_probs for r in old], "new vs old weights")
    assert_served_like(outcomes, reference, version, "requests held during the sync")
    assert all(replica["routed_requests"] > 0 for replica in status["replicas"])  # both replicas answered

    (steps, received), = other_replica.group.received()
    assert steps == version and received.keys() == weights.keys()
    assert all(torch.equal(received[name], weights[name]) for name in weights)


async def test_every_replica_serves_the_synced_weights(service, client, model_dir, base_weights):
    requests = random_requests(12, VOCAB, seed=42, max_len=200)
    before = {replica["name"]: replica["requests_total"] for replica in (await service.get_status.remote())["replicas"]}
    outcomes = await client.score(requests, timeout_s=WAIT_S)
    reference = await fresh_server_scores(model_dir, new_weights(base_weights, 11), 1, requests)
    assert_served_like(outcomes, reference, 1, "after the sync")
    after = (await service.get_status.remote())["replicas"]
    assert all(replica["requests_total"] > before[replica["name"]] for replica in after)


async def test_a_sync_under_the_served_version_keeps_its_weights_and_an_older_one_is_refused(
    service, pool, trainer, client, model_dir, base_weights
):
    manager = CheckpointEngineManager(CHECKPOINT_ENGINE, trainer, list(pool))
    trainer.plan_next_sync(seed=99)
    await asyncio.wait_for(sync(manager, 1), WAIT_S)  # verl's initial sync under the number served
    with pytest.raises(WeightSyncError, match="new weight version must be greater than the current 1, got 0"):
        await asyncio.wait_for(sync(manager, 0), WAIT_S)  # our worker's refusal, through verl's ray.get
    status = await until(service, lambda s: not s["updating_weights"] and not s["paused"], "the refused sync to settle")
    assert served_versions(status) == [1, 1] and status["weights_incomplete"] is None
    requests = random_requests(4, VOCAB, seed=43, max_len=80)
    reference = await fresh_server_scores(model_dir, new_weights(base_weights, 11), 1, requests)
    assert_served_like(await client.score(requests, timeout_s=WAIT_S), reference, 1, "after a stale sync")


async def test_a_sender_killed_part_way_leaves_the_old_version_unserved_until_a_complete_sync(
    service, pool, trainer, client, model_dir, base_weights
):
    version = 2
    doomed = trainer_group(model_dir, ranks=1)
    try:
        # dies pulling the last tensor, in the 5th bucket: the sender has then sent the first two (it
        # takes bucket k from a one-slot queue only after sending k - 1, and the 4th was queued)
        doomed.plan_next_sync(seed=12, die_after=len(base_weights) - 1)
        with pytest.raises(RayActorError):  # verl's manager reports the trainer's death first
            await asyncio.wait_for(sync(CheckpointEngineManager(CHECKPOINT_ENGINE, doomed, list(pool)), version), WAIT_S)
    finally:
        remove_group(doomed)
    status = await until(service, lambda s: not s["updating_weights"], "the broken sync to be aborted")
    assert served_versions(status) == [1, 1]
    assert all(replica["weights_incomplete"] for replica in status["replicas"])
    arrived = re.search(r"the stream broke after (\d+) tensors", status["weights_incomplete"])
    assert arrived and int(arrived.group(1)) > 0, status["weights_incomplete"]  # part of the new weights landed
    MEASURED["tensors loaded before the sender died"] = int(arrived.group(1))
    refused = await client.score(random_requests(2, VOCAB, seed=44, max_len=60), timeout_s=0.5)
    assert all(isinstance(o, DeadlineExceeded) and "weights incomplete" in o.message for o in refused), refused

    trainer.plan_next_sync(seed=12)
    await asyncio.wait_for(sync(CheckpointEngineManager(CHECKPOINT_ENGINE, trainer, list(pool)), version), WAIT_S)
    status = await service.get_status.remote()
    assert served_versions(status) == [version, version] and status["weights_incomplete"] is None
    requests = random_requests(8, VOCAB, seed=45, max_len=150)
    reference = await fresh_server_scores(model_dir, new_weights(base_weights, 12), version, requests)
    assert_served_like(await client.score(requests, timeout_s=WAIT_S), reference, version, "after the repair sync")
    print("\nmeasured:", {k: f"{v:.3g}" for k, v in MEASURED.items()})



async def test_the_trainers_join_hook_adds_every_replica_to_verls_manager_with_the_trainers_settings(
    service, trainer, other_replica, client, model_dir, base_weights, model_config
):
    """What our trainer subclasses call once verl's manager exists (`join_weight_sync`): the
    trainer's own checkpoint-engine section (as verl's YAML holds it) and model section."""
    training_config = OmegaConf.create({"actor_rollout_ref": {
        "rollout": {"checkpoint_engine": {**dataclasses.asdict(CHECKPOINT_ENGINE),
                                          "_target_": "verl.workers.config.CheckpointEngineConfig"}},
        "model": {"path": str(model_dir)},
    }})
    rules = TrainerSideConfig(actor_name=SERVICE_NAME, join_weight_sync=True)
    manager = CheckpointEngineManager(CHECKPOINT_ENGINE, trainer, [other_replica])
    joined = await join_scoring_pool(manager, training_config, rules)
    assert [type(r) for r in manager.replicas] == [RecordingReplica, ModelEngineServerReplica, ModelEngineServerReplica]
    assert manager.replicas[1:] == joined
    version = 3
    trainer.plan_next_sync(seed=13)
    await asyncio.wait_for(sync(manager, version), WAIT_S)
    assert served_versions(await service.get_status.remote()) == [version, version]
    requests = random_requests(4, VOCAB, seed=46, max_len=80)
    reference = await fresh_server_scores(model_dir, new_weights(base_weights, 13), version, requests)
    assert_served_like(await client.score(requests, timeout_s=WAIT_S), reference, version, "after the trainer's sync")


async def test_the_join_is_the_default_and_without_the_servers_actor_it_says_how_to_fix_it(ray_cluster, model_dir):
    """Without the join the server would serve version 0 for good: every sample from the second
    sync on is stale, and each step waits out its deadline before failing. So the join is the
    default, and a server that is not on the trainer's Ray cluster stops the trainer (the
    trainers check at construction too: test_verl_trainer_v1.py)."""
    from clients.verl.server_fields import trainer_side_config

    training_config = OmegaConf.create({
        "actor_rollout_ref": {"rollout": {"checkpoint_engine": {**dataclasses.asdict(CHECKPOINT_ENGINE),
                                                                "_target_": "verl.workers.config.CheckpointEngineConfig"}},
                              "model": {"path": str(model_dir)}},
        "model_engine_server": {"ray": {"actor_name": "no-such-scoring-service"}},
    })
    rules = trainer_side_config(training_config)
    assert rules.join_weight_sync
    with pytest.raises(RuntimeError, match="no-such-scoring-service.*join_weight_sync=false"):
        await join_scoring_pool(CheckpointEngineManager(CHECKPOINT_ENGINE, None, []), training_config, rules)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the trainer and the replica on 2 GPUs")
async def test_verls_own_nccl_backend_syncs_our_replicas_on_gpus(ray_cluster, tmp_path):
    """The NCCL path is verl's `nccl` backend unchanged: the same manager call over NCCL into
    a replica on CUDA (runs where 2 GPUs and cupy, which verl's nccl engine imports, are present)."""
    pytest.importorskip("cupy")
    nccl = CheckpointEngineConfig(backend="nccl", update_weights_bucket_megabytes=1)
    model = make_tiny_model(tmp_path / "model", SHAPE, seed=8)
    config = ServerConfig(model_path=str(model), runtime="ray", num_replicas=1, n_gpus_per_node=1, scheduler=SCHEDULER)
    handle = await start_service_actor(config, name=f"{SERVICE_NAME}-nccl")
    group = None
    try:
        replicas = await scoring_replicas(scoring_rollout_config(nccl, actor_name=f"{SERVICE_NAME}-nccl"),
                                          HFModelConfig(path=str(model), load_tokenizer=False))
        pool = RayResourcePool([1], use_gpu=True, max_colocate_count=1)
        group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
            ray.remote(GpuWeightSource), model_dir=str(model), checkpoint_engine=nccl), device_name="cuda")
        group.plan_next_sync(seed=21)
        await asyncio.to_thread(CheckpointEngineManager(nccl, group, replicas).update_weights, 1)
        status = await handle.get_status.remote()
        assert served_versions(status) == [1] and status["weights_incomplete"] is None
        requests = random_requests(4, VOCAB, seed=46, max_len=100)
        reference = await fresh_server_scores(model, new_weights(checkpoint_weights(model), 21), 1, requests)
        outcomes = await RayLogProbClient(handle, call_timeout_s=WAIT_S).score(requests, timeout_s=WAIT_S)
        assert_served_like(outcomes, reference, 1, "nccl")
    finally:
        if group is not None:
            remove_group(group)
        await stop_service_actor(handle, drain=False, timeout_s=10.0)


class GpuWeightSource(WeightSource):
    """The trainer worker on a GPU: verl's nccl engine sends CUDA tensors."""

    def per_tensor_param(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().per_tensor_param():
            yield name, tensor.cuda()
