"""The serve path with Ray replicas: the section mapped onto the replica layer, and two real
replicas (engines on CPU in logical-GPU bundles of the session's Ray) behind the HTTP app."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from model_engine_server.config import ConfigError, load_config
from model_engine_server.launch import build_serving
from replica.runtime import replica_config_for
from model_engine_server.protocol import LogProbRequest
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread
from tests.test_replica import live_replica_actors, live_replica_placement_groups


@pytest.mark.parametrize("overrides,replicas,nnodes,per_node,tp", [
    (["model_engine_server.n_gpus_per_node=4"], 4, 1, 1, 1),
    (["model_engine_server.backend=megatron", "model_engine_server.n_gpus_per_node=8",
      "model_engine_server.megatron.tensor_model_parallel_size=2"], 4, 1, 2, 2),
    (["model_engine_server.backend=megatron", "model_engine_server.nnodes=2", "model_engine_server.n_gpus_per_node=8",
      "model_engine_server.megatron.tensor_model_parallel_size=8", "model_engine_server.megatron.pipeline_model_parallel_size=2"],
     1, 2, 8, 8),
])
def test_one_replica_per_model_parallel_group(overrides, replicas, nnodes, per_node, tp):
    config = load_config(None, overrides).server
    mapped = replica_config_for(config, "/models/m")
    assert (mapped.num_replicas, mapped.nodes_per_replica, mapped.gpus_per_replica_node, mapped.tensor_model_parallel_size) == (
        replicas, nnodes, per_node, tp
    )
    assert mapped.total_gpus == config.total_gpus and mapped.engine.model_path == "/models/m"


def test_restart_policy_reaches_the_replica_layer():
    config = load_config(None, ["model_engine_server.n_gpus_per_node=2", "model_engine_server.ray.auto_restart=false",
                                "model_engine_server.ray.max_restarts=7", "model_engine_server.ray.health_check_interval_s=2.5"]).server
    mapped = replica_config_for(config, "/models/m")
    assert (mapped.auto_restart, mapped.max_restarts, mapped.health_check_interval_s) == (False, 7, 2.5)


def test_transport_bucket_size_reaches_the_replica_layer():
    config = load_config(None, ["model_engine_server.n_gpus_per_node=2", "model_engine_server.transport.bucket_bytes=1073741824"]).server
    assert replica_config_for(config, "/models/m").weight_bucket_mb == 1024


def test_parallelism_the_engine_lacks_is_refused_by_name_when_the_section_is_read():
    with pytest.raises(ConfigError, match="context_parallel_size.*not supported"):
        load_config(None, ["model_engine_server.backend=megatron", "model_engine_server.n_gpus_per_node=2",
                           "model_engine_server.megatron.context_parallel_size=2"])


def test_a_trainers_context_and_expert_parallelism_and_virtual_pipeline_are_not_inherited():
    trainer = "actor_rollout_ref.actor.megatron"
    loaded = load_config(None, ["model_engine_server.backend=megatron", "model_engine_server.n_gpus_per_node=4",
                                f"+{trainer}.tensor_model_parallel_size=2", f"+{trainer}.pipeline_model_parallel_size=2",
                                f"+{trainer}.context_parallel_size=2", f"+{trainer}.virtual_pipeline_model_parallel_size=2"])
    megatron = loaded.server.megatron
    assert (megatron.tensor_model_parallel_size, megatron.pipeline_model_parallel_size) == (2, 2)
    assert megatron.context_parallel_size == 1 and megatron.virtual_pipeline_model_parallel_size is None


def test_two_ray_replicas_serve_http_and_leave_nothing_behind(ray_cluster, tiny_model):
    loaded = load_config(None, [
        f"model_engine_server.model_path={tiny_model}", "model_engine_server.num_replicas=2",
        "model_engine_server.device=cpu", "model_engine_server.scheduler.max_wait_ms=1",
    ])
    assert not loaded.server.in_process
    serving = build_serving(loaded)
    requests = random_requests(6, 512, seed=61, max_len=120)
    with ServerThread(serving.app, start_timeout_s=300) as server:
        response = httpx.post(f"{server.url}/v1/logprobs", json={"requests": [r.model_dump() for r in requests]}, timeout=120)
        status = httpx.get(f"{server.url}/v1/status").json()
    assert response.status_code == 200, response.text
    assert status["num_replicas"] == 2 and len(status["replicas"]) == 2
    reference = reference_model(tiny_model)
    for request, result in zip(requests, response.json()["results"]):
        expected, _ = reference_log_probs(reference, LogProbRequest.parse(request.model_dump()))
        torch.testing.assert_close(torch.tensor(result["log_probs"]), expected, atol=1e-5, rtol=0)
    deadline = time.monotonic() + 60
    while (live_replica_actors() or live_replica_placement_groups()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_replica_actors() == [] and live_replica_placement_groups() == []
