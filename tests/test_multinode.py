"""Replicas across Ray nodes: placement one group per node, one gloo process group across
nodes, routing between two-node replicas, and the server joining a running cluster by address.

A real multi-node Ray cluster runs on this machine (`tests/multinode.py`: a GPU-less head plus
one-GPU raylets); engines run on CPU. Node loss is in `test_multinode_loss.py`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from model_engine_server.protocol import LogProbResult
from replica.manager import ReplicaManager
from replica.replica import ModelEngineReplica
from tests.helpers import assert_matches_reference, random_requests
from tests.multinode import GpuNodes, cluster_for_module, free_port, wait_healthy
from tests.test_replica import assert_nothing_left, replica_config

GPU_NODES = 4
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
        assert_one_group_per_node(nodes, infos)  # 2 replicas x 2 nodes = all four GPU nodes
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
