"""The publisher against a real in-process server (tiny HF model), over both transports:
exact weights after a sync, and every injected fault leaves the version, reports the reason,
and holds requests until a complete sync lands."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from checkpoint_transport.channel import get_backend
from checkpoint_transport.sender import WeightSender
from checkpoint_transport.spec import TransportConfig
from clients.publisher import WeightPublisher
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from tests.helpers import random_requests, reference_model
from tests.test_transport_backends import CorruptingChannel

BUCKET_BYTES = 16 << 10  # the tiny model spans several buckets


@pytest.fixture(scope="module", params=["gloo", "ray"])
def session(request):
    """One rendezvous per backend for the module (a Ray board actor starts once)."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    opened = get_backend(request.param).open_session(transport_config(request.param))
    yield opened
    opened.close()


def transport_config(backend: str, timeout_s: float = 30.0) -> TransportConfig:
    return TransportConfig(backend=backend, bucket_bytes=BUCKET_BYTES, timeout_s=timeout_s)


@pytest.fixture
def server(tiny_model):
    return build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=120))


def publisher_for(server, session, timeout_s: float = 30.0, sender_factory=WeightSender.from_spec) -> WeightPublisher:
    config = transport_config(session.backend, timeout_s)
    return WeightPublisher(server, config, sender_factory=sender_factory, session=session)


def current_weights(server) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in server.executor.adapter.engine.export_weights()}


@pytest.fixture(scope="module")
def reference_engine(tiny_model):
    """A second engine of the same code path: scoring one request alone on given weights."""
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model)))
    return ModelEngineServerAdapter(engine, 8192)


def reference_scores(adapter: ModelEngineServerAdapter, weights: dict[str, torch.Tensor], requests) -> list[np.ndarray]:
    adapter.engine.load_weights(weights.items())
    return [adapter.score([request])[0].log_probs for request in requests]


async def test_after_a_sync_log_probs_equal_a_fresh_engine_of_the_new_weights(server, session, tiny_model, tmp_path):
    publisher = publisher_for(server, session)
    new_weights = perturbed_weights(current_weights(server), seed=21, scale=0.05)
    report = await publisher.update_weights(new_weights, version=1)
    assert report.ok and report.send.buckets > 1 and report.receives[0].tensors == len(new_weights)
    assert server.status()["weight_version"] == 1

    model = reference_model(tiny_model)  # the new weights as an HF checkpoint on disk
    model.load_state_dict({**model.state_dict(), **new_weights}, strict=True)
    model.save_pretrained(tmp_path / "v1")
    fresh = build_local_server(EngineSpec(model_path=str(tmp_path / "v1")))

    requests = random_requests(6, 512, seed=4)
    synced, expected = await server.score(requests), await fresh.score(requests)
    for got, want in zip(synced, expected):
        assert got.weight_version == 1
        np.testing.assert_array_equal(got.log_probs, want.log_probs)
        np.testing.assert_array_equal(got.entropy, want.entropy)
    await fresh.shutdown()
    await server.shutdown()


async def test_a_checkpoint_folder_publishes_like_its_tensors(server, session, tiny_models, reference_engine):
    publisher = publisher_for(server, session)
    folder = tiny_models["qwen2_tied"]  # the server's own checkpoint: v2 restores it after v1
    await publisher.update_weights(perturbed_weights(current_weights(server), seed=3), version=1)
    await publisher.update_weights(str(folder), version=2)
    request = random_requests(1, 512, seed=8)[0]
    [result] = await server.score([request])
    original = dict(build_engine("hf", EngineSpec(model_path=str(folder))).export_weights())
    [expected] = reference_scores(reference_engine, original, [request])
    assert result.weight_version == 2
    np.testing.assert_array_equal(result.log_probs, expected)
    await server.shutdown()


def stalled(weights: dict[str, torch.Tensor], release: threading.Event):
    items = list(weights.items())
    yield from items[:3]
    release.wait(60)  # the trainer's export hangs past the transport timeout
    yield from items[3:]


def failing(weights: dict[str, torch.Tensor]):
    items = list(weights.items())
    yield from items[:4]
    raise RuntimeError("all-gather of layer 1 failed on trainer rank 2")


def corrupting_sender(spec):
    sender = WeightSender.from_spec(spec)
    sender.channel = CorruptingChannel(sender.channel, index=1)
    return sender


FAULTS = {
    "missing tensor": "lacks 1 tensors",
    "unknown name": "unknown weight name 'model.layers.7.mlp.up_proj.weight'",
    "wrong shape": "has shape",
    "wrong dtype": "has dtype torch.float16",
    "checksum mismatch": "checksum mismatch",
    "timeout": "timed out",
    "export stream fails": "all-gather of layer 1 failed",
    "duplicate name": "appears twice",
}


def faulty_stream(fault: str, weights: dict[str, torch.Tensor], release: threading.Event):
    names = list(weights)
    broken = dict(weights)
    if fault == "missing tensor":
        del broken[names[-1]]
    elif fault == "unknown name":
        broken["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)
    elif fault == "wrong shape":
        broken[names[2]] = torch.zeros(3, 3)
    elif fault == "wrong dtype":
        broken[names[2]] = weights[names[2]].half()
    elif fault == "timeout":
        return stalled(weights, release)
    elif fault == "export stream fails":
        return failing(weights)
    elif fault == "duplicate name":
        return list(weights.items()) + [(names[0], weights[names[0]])]
    return broken.items()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failed_sync_keeps_the_version_reports_why_and_serves_only_after_a_complete_sync(
    fault, server, session, reference_engine
):
    release = threading.Event()
    publisher = publisher_for(
        server, session, timeout_s=1.5 if fault == "timeout" else 30.0,
        sender_factory=corrupting_sender if fault == "checksum mismatch" else WeightSender.from_spec,
    )
    original = current_weights(server)
    try:
        with pytest.raises(WeightSyncError, match=FAULTS[fault]) as raised:
            await publisher.update_weights(faulty_stream(fault, perturbed_weights(original, seed=5), release), version=1)
    finally:
        release.set()
    assert not raised.value.report.ok
    status = server.status()
    assert status["weight_version"] == 0 and status["weights_incomplete"] and not status["updating_weights"]

    request = random_requests(1, 512, seed=13)[0]
    waiting = asyncio.ensure_future(server.submit(request))
    for _ in range(20):  # let the scheduler see it; it must stay queued
        await asyncio.sleep(0.01)
    assert not waiting.done() and server.status()["queue_depth"] == 1, "scored on incomplete weights"

    complete = perturbed_weights(original, seed=6)
    good = publisher_for(server, session)
    assert (await good.update_weights(complete, version=2)).ok
    result = await asyncio.wait_for(waiting, 60)
    assert result.weight_version == 2
    np.testing.assert_array_equal(result.log_probs, reference_scores(reference_engine, complete, [request])[0])
    assert not server.status()["weights_incomplete"]
    await server.shutdown()


async def test_a_stale_version_is_refused_before_serving_stops(server, session):
    publisher = publisher_for(server, session)
    await publisher.update_weights(current_weights(server), version=3)
    with pytest.raises(WeightSyncError, match="greater than the current 3"):
        await publisher.update_weights(current_weights(server), version=3)
    status = server.status()
    assert status["weight_version"] == 3 and not status["weights_incomplete"] and not status["updating_weights"]
    [result] = await server.score(random_requests(1, 512, seed=2))
    assert result.weight_version == 3
    await server.shutdown()


async def test_requests_queued_during_a_sync_are_all_served_with_the_new_version(server, session):
    publisher = publisher_for(server, session)
    requests = random_requests(8, 512, seed=17, max_len=60)
    release = threading.Event()
    sync = asyncio.ensure_future(publisher.update_weights(gated(current_weights(server), release), version=1))
    while not server.status()["updating_weights"]:
        await asyncio.sleep(0.005)
    queued = asyncio.ensure_future(server.score(requests))
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert server.status()["queue_depth"] == len(requests)  # waiting, not dropped, not scored
    release.set()
    report = await sync
    results = await queued
    assert report.ok and report.pause_window_s >= report.transfer_s > 0
    assert [r.weight_version for r in results] == [1] * len(requests)
    await server.shutdown()


def gated(weights: dict[str, torch.Tensor], release: threading.Event):
    items = list(weights.items())
    yield from items[:2]
    release.wait(60)
    yield from items[2:]


async def test_a_receiver_stuck_in_its_engine_load_fails_the_sync_after_the_sender_finished(server, monkeypatch):
    """Once hung: the sender failed within timeout_s, but the publisher waited on
    the receivers for as long as the engine's load hung, and the server stayed drained."""
    import checkpoint_transport.spec as spec_module

    monkeypatch.setattr(spec_module, "RECEIVER_IDLE_GRACE_S", 1.0)  # a limit of 3 * 1 + 1 s, for a short test
    engine = server.executor.adapter.engine
    release, load = threading.Event(), engine.load_weights

    def load_then_hang(named):
        names = load(named)
        release.wait(120)  # an engine that never returns from its second bucket
        return names

    monkeypatch.setattr(engine, "load_weights", load_then_hang)
    session = get_backend("gloo").open_session(transport_config("gloo", timeout_s=1.0))
    publisher = publisher_for(server, session, timeout_s=1.0)
    try:
        with pytest.raises(WeightSyncError, match="no report from the receivers"):
            await asyncio.wait_for(publisher.update_weights(current_weights(server), 1), timeout=60)
        status = server.status()
        assert status["weight_version"] == 0 and not status["updating_weights"] and status["weights_incomplete"]
    finally:
        release.set()
        await publisher.close()
        session.close()
        await server.shutdown(drain=False, timeout_s=5.0)


async def test_a_cancelled_sync_sends_no_bucket_after_the_cancel(server, session):
    """Cancelling `update_weights` cancelled only the coroutine: its sender thread streamed the
    rest of the export on (over gloo, into receiver threads whose update was already aborted)."""
    from checkpoint_transport.bucket import group_into_buckets

    finished: list = []

    class Recording(WeightSender):
        def send(self, *args, **kwargs):
            report = super().send(*args, **kwargs)
            finished.append(report)
            return report

    weights = current_weights(server)
    every_bucket = len(list(group_into_buckets(iter(weights.items()), BUCKET_BYTES)))
    publisher = publisher_for(server, session, sender_factory=lambda spec: Recording.from_spec(spec))
    release = threading.Event()
    sync = asyncio.ensure_future(publisher.update_weights(stalled(weights, release), version=1))
    try:
        try:
            while not server.status()["updating_weights"]:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.5)  # the first tensors are out; the export stalls
            sync.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sync
        finally:
            release.set()  # the rest of the export arrives after the cancel
        for _ in range(600):
            if finished:
                break
            await asyncio.sleep(0.05)
        [report] = finished
        assert not report.ok and "cancel" in report.error and report.buckets < every_bucket, report
        status = server.status()
        assert status["weight_version"] == 0 and not status["updating_weights"]
    finally:
        await server.shutdown()
