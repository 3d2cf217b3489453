"""`serve` on the Ray runtime: one service in the named service actor, reached over HTTP and by
actor handle alike (trainers and verl look it up by name), stopped by a signal with nothing
left behind. The CLI process itself, on a token-authenticated cluster: test_deploy_ray.py."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import pytest_asyncio

from clients.ray_client import RayLogProbClient
from model_engine_server.commands.serve_ray import port_problem
from model_engine_server.config import ServerConfig
from model_engine_server.protocol import LogProbRequest
from model_engine_server.tiny_model import perturbed_weights
from replica.service_actor import start_service_actor, stop_service_actor
from tests.test_replica import DEADLINE_S, assert_nothing_left

ACTOR_NAME = "model-engine-server-http-test"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(ray_cluster, tiny_model):
    config = ServerConfig(model_path=str(tiny_model), runtime="ray", num_replicas=1, n_gpus_per_node=1,
                          ray={"actor_name": ACTOR_NAME, "auto_restart": False})
    handle = await start_service_actor(config, name=ACTOR_NAME, with_http=True)
    host, port = await handle.serve_http.remote("127.0.0.1", 0)
    yield handle, f"http://{host}:{port}"
    await stop_service_actor(handle, drain=True, timeout_s=10.0)
    await assert_nothing_left()


@pytest.mark.asyncio(loop_scope="module")
async def test_http_and_the_actor_handle_front_one_service(served, tiny_model):
    handle, url = served
    by_name = RayLogProbClient.from_name(ACTOR_NAME, call_timeout_s=DEADLINE_S)  # the default namespace, not ours
    request = LogProbRequest(input_ids=[5, 6, 7, 8, 9], response_start=2, temperature=1.0)
    [over_ray] = await by_name.compute_log_probs([request])
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        answer = (await http.post(f"{url}/v1/logprobs", json={"requests": [request.model_dump()]})).json()
        np.testing.assert_array_equal(np.asarray(answer["results"][0]["log_probs"], np.float32), over_ray.log_probs)
        # a weight update through the handle is what HTTP serves next, and the reverse for a pause
        from transformers import AutoModelForCausalLM

        weights = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
        await by_name.update_weights(list(perturbed_weights(weights, seed=5, scale=0.05).items()), version=1)
        status = (await http.get(f"{url}/v1/status")).json()
        assert status["weight_version"] == 1
        assert (await http.post(f"{url}/v1/pause")).status_code == 200
        assert (await handle.get_status.remote())["paused"] is True
        assert (await http.post(f"{url}/v1/resume")).status_code == 200


def test_a_port_in_use_is_found_before_anything_loads():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        problem = port_problem("127.0.0.1", taken.getsockname()[1])
    assert problem is not None and "cannot listen on 127.0.0.1" in problem
    assert port_problem("127.0.0.1", 0) is None


@pytest.mark.asyncio(loop_scope="module")
async def test_the_actor_refuses_to_expose_admin_routes_without_a_token(served):
    handle, _ = served
    with pytest.raises(Exception, match="refusing to serve: listening on '0.0.0.0'"):
        await handle.serve_http.remote("0.0.0.0", 0)

