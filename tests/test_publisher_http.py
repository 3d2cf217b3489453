"""The publisher over the server's HTTP admin routes (real uvicorn on 127.0.0.1, the project's
app with the weight-sync router mounted); the buckets travel over gloo, never over HTTP."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import uvicorn

from checkpoint_transport.spec import TransportConfig
from clients.publisher import WeightPublisher
from clients.sync_targets import HttpSyncTarget
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import ModelEngineError, WeightSyncError
from model_engine_server.http.app import create_app
from model_engine_server.local import build_local_server
from model_engine_server.tiny_model import perturbed_weights

TOKEN = "s3cret-admin"


@pytest.fixture
def served(tiny_model):
    """(base URL, the in-process server behind it) on a uvicorn thread with its own loop."""
    server = build_local_server(EngineSpec(model_path=str(tiny_model)))
    app = create_app(server, admin_token=TOKEN, owns_service=True)  # mounts /v1/weights/* itself
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (uv.started and uv.servers):
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", server
    uv.should_exit = True
    thread.join(timeout=30)


def engine_weights(server) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in server.executor.adapter.engine.export_weights()}


def publisher_over_http(url: str, token: str | None = TOKEN) -> tuple[WeightPublisher, HttpSyncTarget]:
    target = HttpSyncTarget(url, token=token, timeout_s=120)
    return WeightPublisher(target, TransportConfig(backend="gloo", bucket_bytes=16 << 10, timeout_s=30)), target


async def test_a_sync_through_the_admin_routes_loads_exactly_the_published_weights(served):
    url, server = served
    publisher, target = publisher_over_http(url)
    new_weights = perturbed_weights(engine_weights(server), seed=77)
    report = await publisher.update_weights(new_weights, version=1)
    assert report.ok and report.send.buckets > 1 and len(report.receives) == 1
    status = await target.get_status()
    assert status["weight_version"] == 1 and not status["weights_incomplete"]
    loaded = engine_weights(server)
    assert all(torch.equal(loaded[name], new_weights[name]) for name in new_weights)
    await publisher.close()
    await target.close()


def test_blocking_syncs_one_after_another_each_on_a_loop_of_its_own(served):
    """`update_weights_blocking` runs each sync under its own `asyncio.run`; the HTTP target's
    client belonged to the first loop, so the second sync failed with `Event loop is closed`."""
    url, server = served
    publisher, _ = publisher_over_http(url)
    for version in (1, 2):
        new_weights = perturbed_weights(engine_weights(server), seed=version)
        report = publisher.update_weights_blocking(new_weights, version=version)
        assert report.ok, report.error
        loaded = engine_weights(server)
        assert all(torch.equal(loaded[name], new_weights[name]) for name in new_weights)


async def test_an_error_page_that_is_not_json_keeps_its_status(unused_tcp_port):
    """A proxy's 502 page in front of the server: the status and text, not a JSON decode error."""
    import asyncio

    from model_engine_server.errors import ModelEngineError

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 26\r\n\r\n"
                     b"<html>bad gateway</html>\r\n")
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(proxy, "127.0.0.1", unused_tcp_port)
    target = HttpSyncTarget(f"http://127.0.0.1:{unused_tcp_port}", timeout_s=10)
    try:
        with pytest.raises(ModelEngineError, match="answered 502: <html>bad gateway"):
            await target.begin_weight_update(1)
    finally:
        await target.close()
        listening.close()


async def test_a_rejected_tensor_comes_back_as_a_typed_error_and_holds_serving(served):
    url, server = served
    publisher, target = publisher_over_http(url)
    weights = engine_weights(server)
    wrong = dict(weights)
    name = next(iter(wrong))
    wrong[name] = torch.zeros(1, 3)
    with pytest.raises(WeightSyncError, match=r"has shape \(1, 3\)"):
        await publisher.update_weights(wrong, version=1)
    status = await target.get_status()
    assert status["weight_version"] == 0 and status["weights_incomplete"]
    assert (await publisher.update_weights(weights, version=2)).ok
    assert not (await target.get_status())["weights_incomplete"]
    await publisher.close()
    await target.close()


async def test_pause_and_resume_go_through_the_same_admin_client(served):
    url, _ = served
    _, target = publisher_over_http(url)
    await target.pause_serving()
    assert (await target.get_status())["paused"] is True
    await target.resume_serving()
    assert (await target.get_status())["paused"] is False
    await target.close()


async def test_the_weight_routes_refuse_a_caller_without_the_admin_token(served):
    url, _ = served
    publisher, target = publisher_over_http(url, token=None)
    with pytest.raises(ModelEngineError, match="Bearer"):
        await publisher.update_weights({}, version=1)
    await publisher.close()
    await target.close()
