"""Reference mode and `update_weights_from_disk` on Ray replicas (the session's embedded Ray,
logical GPUs, engines on CPU): the policy and the reference each on replicas of their own behind
the HTTP app; the Ray-handle client getting the same through the service actor."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from clients.ray_client import RayLogProbClient
from model_engine_server.errors import Forbidden, InvalidRequest
from model_engine_server.launch import build_serving
from model_engine_server.config import ServerConfig
from replica.service_actor import start_service_actor, stop_service_actor
from tests.helpers import random_requests
from tests.test_http_support import ServerThread
from tests.test_ref_mode import SECTION, TOKEN, ref_mode_config, wire, with_ref
from tests.test_replica import DEADLINE_S, assert_nothing_left, live_replica_actors, live_replica_placement_groups
from tests.test_update_from_disk import assert_log_probs_of, save_perturbed


def _placement_group_names() -> list[str]:
    return sorted(g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED")


def test_policy_and_reference_on_their_own_ray_replicas(ray_cluster, tiny_model, tiny_models, tmp_path, tmp_path_factory):
    roots = f"{SECTION}.weight_roots=[{tmp_path_factory.getbasetemp()}]"  # tmp_path and tiny_models are under it
    serving = build_serving(ref_mode_config(tiny_model, f"{SECTION}.runtime=ray", roots))
    headers = {"authorization": f"Bearer {TOKEN}"}
    requests = with_ref(random_requests(4, 512, seed=91, max_len=100))
    new_weights = save_perturbed(tiny_model, tmp_path / "step1", seed=21)
    with ServerThread(serving.app, start_timeout_s=300) as server:
        groups = _placement_group_names()
        refused = httpx.post(f"{server.url}/v1/update_weights_from_disk", headers=headers,
                             json={"model_path": str(tiny_models["llama_untied"])}, timeout=60)
        loaded = httpx.post(f"{server.url}/v1/update_weights_from_disk", headers=headers,
                            json={"model_path": str(new_weights), "weight_version": 3}, timeout=120)
        response = httpx.post(f"{server.url}/v1/logprobs", json={"requests": wire(requests)}, timeout=120)
        status = httpx.get(f"{server.url}/v1/status").json()
    assert {"replica-0-node0", "replica-ref-0-node0"} <= set(groups)  # one placement group each
    assert refused.status_code == 400 and "LlamaForCausalLM" in refused.json()["error"]["message"]
    assert loaded.status_code == 200 and loaded.json() == {"weight_version": 3}, loaded.text
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert {r["weight_version"] for r in results} == {3}
    assert_log_probs_of(new_weights, requests, results)
    assert_log_probs_of(tiny_model, requests, results, field="ref_log_probs")
    assert status["weight_version"] == 3 and status["reference"]["weight_version"] == 0
    assert len(status["replicas"]) == 1 and len(status["reference"]["replicas"]) == 1
    deadline = time.monotonic() + 60
    while (live_replica_actors() or live_replica_placement_groups()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_replica_actors() == [] and live_replica_placement_groups() == []


@pytest.mark.asyncio(loop_scope="function")
async def test_the_ray_client_gets_reference_mode_and_disk_updates_like_http(ray_cluster, tiny_model, tmp_path):
    """The service actor is built by the same composition root as `serve`: ref log-probs from the
    frozen initial weights, `update_weights_from_disk` under the configured roots."""
    config = ServerConfig(model_path=str(tiny_model), runtime="ray", enable_ref_mode=True, weight_roots=[str(tmp_path)])
    handle = await start_service_actor(config, name="model-engine-server-from-disk")
    try:
        client = RayLogProbClient(handle, call_timeout_s=DEADLINE_S)
        new_weights = save_perturbed(tiny_model, tmp_path / "step1", seed=22)
        with pytest.raises(InvalidRequest, match="is not a folder"):
            await client.update_weights_from_disk(str(tmp_path / "absent"))
        with pytest.raises(Forbidden):
            await client.update_weights_from_disk(str(tiny_model))  # outside the roots
        assert await client.update_weights_from_disk(str(new_weights)) == 1
        requests = with_ref(random_requests(3, 512, seed=92, max_len=80))
        results = await client.compute_log_probs(requests)
        status = await client.get_status()
    finally:
        await stop_service_actor(handle, drain=False, timeout_s=10.0)
    assert {r.weight_version for r in results} == {1}
    assert status["ref_mode"] is True and status["reference"]["weight_version"] == 0
    assert_log_probs_of(new_weights, requests, results)
    assert_log_probs_of(tiny_model, requests, results, field="ref_log_probs")
    await assert_nothing_left()
