"""Replicas across Ray nodes: placement one group per node, one gloo process group across
nodes, routing between two-node replicas, the server joining a running cluster by address, and
node loss under load (last: it removes nodes).

A real multi-node Ray cluster runs on this machine (`tests/multinode.py`: a GPU-less head plus
one-GPU raylets); engines run on CPU. One cluster serves the module: its start is the largest
part of each test's time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import httpx
import pytest
import torch

from checkpoint_transport.spec import TransportConfig
from clients.http_client import HttpLogProbClient, RetryPolicy
from clients.publisher import WeightPublisher
from clients.sync_targets import HttpSyncTarget
from model_engine_server.errors import ModelEngineError, WeightSyncError
from model_engine_server.http.app import create_app
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.protocol import LogProbRequest, LogProbResult
from replica.manager import ReplicaManager
from replica.replica import ModelEngineReplica
from tests.helpers import assert_matches_reference, random_requests, reference_log_probs, reference_model
from tests.multinode import GpuNodes, cluster_for_module, free_port, wait_healthy
from tests.test_http_support import ServerThread
from tests.test_replica import _new_weights, assert_nothing_left, replica_config

GPU_NODES = 5  # 2 replicas x 2 nodes, and a spare for the replica a lost node takes down
DEADLINE_S = 180.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a cluster start is in the first test's time

@pytest.fixture(scope="module")
def nodes():
    yield from cluster_for_module(GPU_NODES, namespace="multinode-tests")


def assert_one_group_per_node(nodes: GpuNodes, infos) -> None:
    """Each rank on its own GPU node (one-GPU nodes: one group per node), none on the head."""
    node_ids = [info.node_id for info in infos]
    assert len(set(node_ids)) == len(infos), node_ids
    assert set(node_ids) <= set(nodes.nodes), "a worker was placed on the GPU-less head"
    assert len({info.placement_group_id for info in infos}) == len(infos)
    assert all(info.dist_backend == ("nccl" if torch.cuda.is_available() else "gloo") for info in infos)


@pytest.mark.parametrize("backend", ["hf", "megatron"])
async def test_a_replica_spans_two_nodes_with_one_process_group_and_scores_exactly(nodes, tiny_model, backend):
    """hf: data parallelism across the two nodes (each scores its share of a batch); megatron:
    tensor parallelism across them (every forward all-reduces over gloo between the nodes)."""
    if backend == "megatron":
        pytest.importorskip("megatron.core")
        pytest.importorskip("mbridge")
        layout = dict(backend="megatron", tensor_model_parallel_size=2)
    else:
        layout = {}
    replica = ModelEngineReplica(replica_config(tiny_model, nodes_per_replica=2, gpus_per_replica_node=1, **layout))
    await replica.start()
    try:
        infos = await replica.worker_placements()
        assert [(i.rank, i.world_size) for i in infos] == [(0, 2), (1, 2)]
        assert_one_group_per_node(nodes, infos)
        expected_groups = [[0], [1]] if backend == "hf" else [[0, 1]]
        assert replica.executor is not None and replica.executor.groups == expected_groups
        requests = random_requests(10, 512, seed=70, max_len=300)
        outcomes = await asyncio.wait_for(replica.score(requests), DEADLINE_S)
        assert_matches_reference(tiny_model, requests, outcomes)
        assert {node for node in replica.status()["nodes"]} == {i.node_id for i in infos}
    finally:
        await replica.shutdown()
    await assert_nothing_left()


async def test_two_two_node_replicas_are_routed_by_least_outstanding_tokens(nodes, tiny_model):
    manager = ReplicaManager(replica_config(tiny_model, num_replicas=2, nodes_per_replica=2, gpus_per_replica_node=1,
                                            health_check_interval_s=None))
    await manager.start()
    try:
        infos = [info for replica in manager.replicas for info in await replica.worker_placements()]
        assert_one_group_per_node(nodes, infos)  # 2 replicas x 2 nodes: four GPU nodes
        long = random_requests(1, 512, seed=71, min_len=1200, max_len=1200)
        short = random_requests(6, 512, seed=72, min_len=200, max_len=200)
        # picked in submission order: the long one takes replica 0, then every short one goes to
        # replica 1 (fewer outstanding tokens) until replica 1 holds as many as replica 0
        outcomes = await asyncio.wait_for(manager.score(long + short), DEADLINE_S)
        assert manager.routed_requests == [1, 6]
        assert_matches_reference(tiny_model, long + short, outcomes)
        balanced = random_requests(8, 512, seed=73, min_len=100, max_len=100)
        await asyncio.wait_for(manager.score(balanced), DEADLINE_S)
        assert manager.routed_requests == [1 + 4, 6 + 4]
        assert manager.outstanding_tokens == [0, 0]
    finally:
        await manager.shutdown()
    await assert_nothing_left()


def test_the_server_joins_a_running_cluster_by_address_and_spans_two_nodes(nodes, tiny_model, tmp_path):
    """`serve` in its own process with `ray.address` set, as a user joins the cluster their
    training job runs on: a Megatron replica of TP 2 over two one-GPU nodes, scored over HTTP."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("mbridge")
    port = free_port()
    overrides = [
        f"model_engine_server.model_path={tiny_model}", "model_engine_server.backend=megatron",
        "model_engine_server.megatron.tensor_model_parallel_size=2", "model_engine_server.nnodes=2",
        "model_engine_server.n_gpus_per_node=1", "model_engine_server.device=cpu",
        f"model_engine_server.ray.address={nodes.address}", "model_engine_server.ray.namespace=joined-by-address",
        "model_engine_server.scheduler.max_wait_ms=1",
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "model_engine_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *overrides],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, tmp_path / "serve.log")
        requests = random_requests(6, 512, seed=74, max_len=200)
        response = httpx.post(f"{url}/v1/logprobs", json={"requests": [r.model_dump() for r in requests]}, timeout=120)
        assert response.status_code == 200, response.text
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        (replica,) = status["replicas"]
        assert len(set(replica["nodes"])) == 2 and set(replica["nodes"]) <= set(nodes.nodes)
        outcomes = [LogProbResult.from_wire(result) for result in response.json()["results"]]
        assert_matches_reference(tiny_model, requests, outcomes)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode is not None
    _assert_cluster_released(nodes)


def _assert_cluster_released(nodes: GpuNodes, deadline_s: float = 60.0) -> None:
    """The stopped server's placement groups and actors are gone: every GPU is free again."""
    import ray

    end = time.monotonic() + deadline_s
    while ray.available_resources().get("GPU", 0) < len(nodes.nodes) and time.monotonic() < end:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0) == len(nodes.nodes)


ADMIN = "multinode-admin"
CALL_TIMEOUT_S = 120.0
# Load that never stops but leaves the two cores to the restarts (and to checking each answer)
PAUSE_BETWEEN_CALLS_S = 0.1

@dataclass
class Load:
    """Clients sending small calls until stopped; every request ends in exactly one list."""

    url: str
    sent: int = 0
    answered: list[tuple[LogProbRequest, LogProbResult]] = field(default_factory=list)
    failed: list[tuple[LogProbRequest, ModelEngineError]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, seed: int) -> None:
        client = HttpLogProbClient(self.url, timeout_s=CALL_TIMEOUT_S, retry=RetryPolicy(max_retries=3, backoff_s=0.2))
        try:
            for call in range(100_000):
                if self.stop.is_set():
                    return
                requests = random_requests(2, 512, seed=seed * 100_000 + call, max_len=120)
                self.sent += len(requests)
                outcomes = await asyncio.wait_for(client.score(requests), CALL_TIMEOUT_S + 30)  # a hang fails the test
                assert len(outcomes) == len(requests)
                for request, outcome in zip(requests, outcomes):
                    if isinstance(outcome, LogProbResult):
                        self.answered.append((request, outcome))
                    else:
                        self.failed.append((request, outcome))
                await asyncio.sleep(PAUSE_BETWEEN_CALLS_S)
        finally:
            await client.close()

    def versions_answered(self) -> set[int]:
        return {result.weight_version for _, result in self.answered}


async def status(url: str) -> dict:
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(f"{url}/v1/status")).json()


async def wait_status(url: str, predicate, what: str, deadline_s: float = 240.0) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        current = await status(url)
        if predicate(current):
            return current
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}: {current}")
        await asyncio.sleep(0.2)


def killing_midway(named: list[tuple[str, torch.Tensor]], nodes: GpuNodes, victim: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a sync, with a node lost after half of them were sent."""
    for index, item in enumerate(named):
        if index == len(named) // 2:
            nodes.remove(victim)
        yield item


def assert_every_result_exact(model_path, answered, weights_by_version) -> None:
    model = reference_model(model_path)
    for version in sorted({result.weight_version for _, result in answered}):
        model.load_state_dict(weights_by_version[version], strict=False)
        for request, result in (pair for pair in answered if pair[1].weight_version == version):
            expected, expected_entropy = reference_log_probs(model, request)
            torch.testing.assert_close(torch.from_numpy(result.log_probs.copy()), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.from_numpy(result.entropy.copy()), expected_entropy, atol=1e-5, rtol=0)


async def test_node_loss_under_load_and_during_a_sync_loses_no_request_and_serves_no_partial_version(nodes, tiny_model):
    """Two replicas of two one-GPU nodes each, behind the real HTTP app on uvicorn, with clients
    sending requests the whole time through our HTTP client. A node is removed (every process on
    it killed) first while requests run, then in the middle of a weight stream; later a node is
    added back. Checked: every request sent is answered or failed with a reason (none hangs), every
    answered result equals an independent transformers forward of the weights of the version it
    names (so no replica ever served a version it did not fully hold), a sync interrupted by a node
    loss commits nowhere and the retried one commits on the survivors, the monitor restarts a
    replica where capacity allows (with the current weights, scoring exactly) and reports it down
    in `/v1/status` and `/metrics` where it does not, and the cluster is left clean."""

    import ray

    _assert_cluster_released(nodes)  # the module's earlier tests left every GPU node free
    config = replica_config(tiny_model, num_replicas=2, nodes_per_replica=2, gpus_per_replica_node=1,
                            health_check_interval_s=0.5, max_restarts=50, start_timeout_s=5.0, health_timeout_s=5.0)
    metrics = ServerMetrics()
    manager = ReplicaManager(config, metrics.observer)
    app = create_app(manager, metrics=metrics, owns_service=True, admin_token=ADMIN)
    weights = {v: _new_weights(tiny_model, seed=80 + v) for v in (1, 2, 3)}
    address = ray.util.get_node_ip_address()
    gloo = TransportConfig(backend="gloo", bucket_bytes=64 << 10, timeout_s=20.0, address=address)
    store = TransportConfig(backend="ray", bucket_bytes=64 << 10, timeout_s=20.0)

    with ServerThread(app, start_timeout_s=300) as server:
        url = server.url
        target = HttpSyncTarget(url, token=ADMIN)
        publisher = WeightPublisher(target, gloo)
        await publisher.update_weights(list(weights[1].items()), 1)
        first = await status(url)
        placed = [replica["nodes"] for replica in first["replicas"]]
        assert all(len(set(n)) == 2 for n in placed) and len({*placed[0], *placed[1]}) == 4

        load = Load(url)
        clients = [asyncio.ensure_future(load.client(seed)) for seed in range(3)]
        try:
            # 1. a node of replica 0 is lost while requests run: its batches are retried on replica 1,
            #    and the monitor restarts replica 0 on the spare node with version 1 (copied from its peer)
            await wait_until_answered(load, 20)
            await asyncio.to_thread(nodes.remove, placed[0][1])
            after = await wait_status(url, lambda s: s["replicas"][0]["restarts"] >= 1 and s["live_replicas"] == 2,
                                      "replica 0 restarted on the spare node")
            assert placed[0][1] not in after["replicas"][0]["nodes"] and after["replicas"][0]["weight_version"] == 1
            routed = after["replicas"][0]["routed_requests"]
            await wait_until_answered(load, len(load.answered) + 20)

            # 2. a node of replica 1 is lost halfway through the stream of version 2: the sync fails
            #    and commits nowhere; the retried sync commits on the survivor (replica 0)
            victim = placed[1][1]
            with pytest.raises(WeightSyncError):
                await publisher.update_weights(killing_midway(list(weights[2].items()), nodes, victim), 2)
            assert (await status(url))["weight_version"] == 1
            await wait_status(url, lambda s: not s["replicas"][1]["alive"], "replica 1 marked dead")
            await publisher.update_weights(list(weights[2].items()), 2)
            down = await wait_status(url, lambda s: s["weight_version"] == 2 and s["live_replicas"] == 1
                                     and not s["replicas"][1]["alive"], "replica 1 reported down")
            assert down["replicas"][0]["weight_version"] == 2 and down["replicas"][1]["failure"]
            exposition = httpx.get(f"{url}/metrics", timeout=30).text
            assert 'model_engine_server_replica_up{replica="replica-1"} 0.0' in exposition
            assert "model_engine_server_live_replicas 1.0" in exposition
            await wait_until_answered(load, len(load.answered) + 20)

            # 3. capacity comes back: the monitor places replica 1 on the new node, with version 2
            nodes.add()  # Ray starts a node from the main thread only (it installs signal handlers)
            back = await wait_status(url, lambda s: s["live_replicas"] == 2, "replica 1 restarted on the new node")
            assert back["replicas"][1]["weight_version"] == 2 and victim not in back["replicas"][1]["nodes"]

            # 4. a sync through Ray's object store across the nodes, under load, reaches both
            await WeightPublisher(target, store).update_weights(list(weights[3].items()), 3)
            await wait_until_answered(load, len(load.answered) + 40)
            final = await status(url)
        finally:
            load.stop.set()
            await asyncio.gather(*clients)
            await target.close()

    print(f"node loss: sent {load.sent}, answered {len(load.answered)}, failed with a reason {len(load.failed)}, "
          f"retried on another replica {final['retried_requests']}; versions answered {sorted(load.versions_answered())}")
    assert load.sent == len(load.answered) + len(load.failed) and load.sent > 0
    assert all(error.message for _, error in load.failed)
    assert final["weight_version"] == 3 and all(r["weight_version"] == 3 for r in final["replicas"])
    assert final["replicas"][0]["routed_requests"] > routed  # the restarted replica 0 was routed to
    assert {1, 2, 3} <= load.versions_answered() <= {1, 2, 3}
    assert_every_result_exact(tiny_model, load.answered, weights)
    end = time.monotonic() + 60  # every placement group released (removal is asynchronous in Ray)
    while ray.available_resources().get("GPU", 0) < len(nodes.nodes) and time.monotonic() < end:
        await asyncio.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == len(nodes.nodes)


async def wait_until_answered(load: Load, count: int, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while len(load.answered) < count:
        if time.monotonic() > end:
            raise AssertionError(f"only {len(load.answered)} of {count} requests answered; failures: {load.failed[-3:]}")
        await asyncio.sleep(0.05)
