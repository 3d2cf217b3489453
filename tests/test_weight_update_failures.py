"""Failures that arrive midway or late close their own update and no other: a load that fails
after writing part of its tensors, a failure of an update its deadline already closed, an
abort or a refused begin from another caller while an update is open."""

from __future__ import annotations

import asyncio

import pytest
import torch

from checkpoint_transport.spec import TransportConfig
from clients.publisher import WeightPublisher
from clients.sync_targets import HttpSyncTarget
from model_engine_server.engines.base import EngineSpec
from model_engine_server.http.app import create_app
from model_engine_server.errors import InvalidRequest, WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from model_engine_server.weight_session import MAX_WEIGHT_VERSION
from tests.fakes import FakeExecutor, request
from tests.test_http_support import ServerThread


def _served(server) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in server.executor.adapter.engine.export_weights()}


async def test_a_load_that_fails_after_writing_part_of_its_bucket_cannot_be_committed(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=2))
    try:
        new = perturbed_weights(_served(server), seed=1)
        stray = perturbed_weights(new, seed=2)
        name = next(n for n in new if n.endswith("q_proj.weight"))
        await server.begin_weight_update(1)
        await server.load_weights(list(new.items()), 1)  # complete: every name recorded
        with pytest.raises(WeightSyncError):  # writes `name`, then meets a tensor of the wrong shape
            await server.load_weights([(name, stray[name]), ("model.norm.weight", torch.zeros(3))], 1)
        with pytest.raises(WeightSyncError):
            await server.commit_weight_update(1)
        status = server.status()
        assert status["weight_version"] == 0 and status["weights_incomplete"]
        (outcome,) = await server.score([request(8)])  # neither version's label on mixed weights
        assert not hasattr(outcome, "log_probs")
    finally:
        await server.shutdown(drain=False)


class FailingLoad(FakeExecutor):
    """Its next load waits for `release`, then raises (a trainer's export that died)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def load_weights(self, named_tensors):
        await self.release.wait()
        raise RuntimeError("the trainer's export died")


async def test_the_late_failure_of_an_expired_update_leaves_the_next_update_open():
    executor = FailingLoad()
    server = ModelEngineServer(executor, SchedulerConfig(weight_update_timeout_s=0.5))
    await server.start()
    try:
        first = asyncio.ensure_future(server.update_weights([("w", torch.tensor(1.0))], 1))
        await asyncio.sleep(1.0)  # version 1 passed its deadline: aborted
        await server.begin_weight_update(2)  # another caller opens version 2
        executor.release.set()  # ... and version 1's load fails only now
        with pytest.raises(WeightSyncError):
            await first
        assert server.status()["updating_weights"]
        executor.load_weights = FakeExecutor.load_weights.__get__(executor)
        await server.load_weights([("w", torch.tensor(2.0))], 2)
        await server.commit_weight_update(2)
        assert server.weight_version == 2
    finally:
        await server.shutdown(drain=False)


async def test_an_abort_naming_another_version_leaves_the_open_update_alone():
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig())
    await server.start()
    try:
        await server.begin_weight_update(2)
        await server.abort_weight_update("a publisher of version 1 gave up late", version=1)
        assert server.status()["updating_weights"]
        await server.abort_weight_update("the publisher of version 2 gave up", version=2)
        assert not server.status()["updating_weights"]
    finally:
        await server.shutdown(drain=False)


async def test_a_publisher_whose_begin_is_refused_leaves_another_publishers_update_open(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)))
    try:
        with ServerThread(create_app(server, admin_token="t0ken")) as http:
            await server.begin_weight_update(1)  # publisher A is streaming version 1
            target = HttpSyncTarget(http.url, token="t0ken")
            refused = WeightPublisher(target, TransportConfig(backend="gloo", timeout_s=10))
            with pytest.raises(InvalidRequest):  # the route's own bound on versions: a 422
                await refused.update_weights(_served(server), version=MAX_WEIGHT_VERSION + 1)
            await refused.close()
            await target.close()
            assert server.status()["updating_weights"]
    finally:
        await server.shutdown(drain=False)


async def test_a_stream_whose_sender_never_comes_ends_within_the_servers_update_timeout(tiny_model):
    from checkpoint_transport.channel import get_backend

    server = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(weight_update_timeout_s=2.0))
    session = get_backend("gloo").open_session(TransportConfig(backend="gloo", timeout_s=3600))
    try:
        await server.begin_weight_update(1)
        spec = session.begin("never-sent", 1)  # the publisher crashed before its sender joined
        reports = await asyncio.wait_for(server.receive_weights(spec, 1), 60.0)  # not the spec's hour
        assert not reports[0].ok
    finally:
        session.close()
        await server.shutdown(drain=False)


def test_a_receive_naming_an_unknown_transport_is_refused_and_the_old_weights_serve_on(tiny_model):
    import httpx

    server = build_local_server(EngineSpec(model_path=str(tiny_model)))
    with ServerThread(create_app(server, admin_token="t0ken", owns_service=True)) as http:
        admin = {"authorization": "Bearer t0ken"}
        assert httpx.post(f"{http.url}/v1/weights/begin", json={"version": 1}, headers=admin).status_code == 200
        spec = {"backend": "glooo", "group": "g", "world_size": 2}
        refused = httpx.post(f"{http.url}/v1/weights/receive", json={"spec": spec, "version": 1}, headers=admin)
        assert 400 <= refused.status_code < 500 and "unknown transport backend 'glooo'" in refused.text
        assert httpx.post(f"{http.url}/v1/weights/abort", json={"reason": "typo", "version": 1}, headers=admin).status_code == 200
        assert httpx.get(f"{http.url}/health").status_code == 200  # nothing was touched: version 0 serves on
