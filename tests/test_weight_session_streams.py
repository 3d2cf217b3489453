"""Weight deliveries that overlap other calls, in process, with a real gloo stream: what is still
arriving when its update closes, a commit sent while a stream arrives, a load sent together
with its begin, a publisher that gives up midway.

Each test failed before deliveries were counted, fenced and held until begin's drain: the
aborted stream's later buckets overwrote the next committed version, a commit sent mid-stream
served weights the failing stream went on changing, and a load beat begin's drain so a batch
labelled version 0 ran on version 1's weights.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pytest
import torch

from checkpoint_transport.channel import get_backend
from checkpoint_transport.sender import send_weights
from checkpoint_transport.spec import TransportConfig
from checkpoint_transport.threads import run_in_thread
from clients.publisher import WeightPublisher
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from tests.fakes import FakeExecutor, request
from tests.helpers import reference_log_probs, reference_model

TOLERANCE = 1e-5  # fp32 log-probs against a plain transformers forward
ONE_TENSOR_PER_BUCKET = 64  # bytes: every tensor of the tiny model is larger, so each goes alone
GATE_AFTER = 3  # tensors a gated stream sends before it waits


def _local(tiny_model, **scheduler: Any) -> ModelEngineServer:
    return build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=60, **scheduler))


def _engine_weights(server: ModelEngineServer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in server.executor.adapter.engine.export_weights()}


class Gate:
    """Holds a stream after its first tensors until the test lets it go on (or fail)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.proceed = threading.Event()
        self.fail = False

    def stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for index, item in enumerate(named):
            if index == GATE_AFTER:
                self.reached.set()
                assert self.proceed.wait(60), "the test never released the stream"
                if self.fail:
                    raise RuntimeError("the trainer rank died mid-stream")
            yield item

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 60), "the stream never reached its gate"


@dataclass
class Streaming:
    """A server, a gloo transport session and a gate, closed after each test."""

    server: ModelEngineServer
    transport: Any
    gate: Gate

    def start(self, version: int, weights: dict[str, torch.Tensor]) -> tuple["asyncio.Future[Any]", "asyncio.Future[Any]"]:
        """The server receives `weights` as `version` from a sender thread held by the gate."""
        spec = self.transport.begin(f"v{version}", 1).model_copy(update={"bucket_bytes": ONE_TENSOR_PER_BUCKET, "timeout_s": 60})
        receiving = asyncio.ensure_future(self.server.receive_weights(spec, version))
        sending = run_in_thread(send_weights, spec, self.gate.stream(list(weights.items())), version)
        return receiving, sending


@pytest.fixture
async def streaming(tiny_model):
    setup = Streaming(_local(tiny_model), get_backend("gloo").open_session(TransportConfig(backend="gloo", timeout_s=60)), Gate())
    yield setup
    setup.gate.proceed.set()
    setup.transport.close()
    await setup.server.shutdown()


async def _transport_threads_done() -> None:
    """Every sender and receiver thread has returned (they run as daemon `weight-transport` threads)."""
    for _ in range(600):
        if not any(t.name == "weight-transport" and t.is_alive() for t in threading.enumerate()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("a weight-transport thread is still running after 60 s")


def _holding(now: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> int:
    return sum(torch.equal(now[name], weights[name]) for name in now)


async def test_a_stream_still_arriving_after_its_update_was_aborted_loads_nothing_into_the_next_version(streaming):
    server, gate = streaming.server, streaming.gate
    w0 = _engine_weights(server)
    w1, w2 = perturbed_weights(w0, seed=1), perturbed_weights(w0, seed=2)
    await server.begin_weight_update(1)
    receiving, sending = streaming.start(1, w1)
    await gate.wait_reached()
    await server.abort_weight_update("an operator aborted the sync")
    await server.begin_weight_update(2)
    await server.load_weights(list(w2.items()), 2)
    await server.commit_weight_update(2)
    gate.proceed.set()  # the rest of version 1 arrives now, into a server serving version 2
    await sending
    [report] = await receiving
    assert not report.ok and "closed" in report.error
    now = _engine_weights(server)
    assert _holding(now, w2) == len(now), f"only {_holding(now, w2)} of {len(now)} tensors hold version 2"
    result = await server.submit({"input_ids": list(range(20, 50)), "response_start": 10})
    assert result.weight_version == 2


async def test_a_commit_sent_while_a_stream_arrives_waits_for_it_and_reports_its_failure(streaming):
    server, gate = streaming.server, streaming.gate
    w0 = _engine_weights(server)
    first, second = perturbed_weights(w0, seed=1), perturbed_weights(w0, seed=3)
    await server.begin_weight_update(1)
    await server.load_weights(list(first.items()), 1)  # the record is complete already
    receiving, sending = streaming.start(1, second)
    await gate.wait_reached()
    committing = asyncio.ensure_future(server.commit_weight_update(1))
    await asyncio.sleep(0.3)
    assert not committing.done(), "commit did not wait for the stream still writing"
    gate.fail = True
    gate.proceed.set()
    with pytest.raises(WeightSyncError, match="sender aborted"):
        await committing
    await sending, await receiving
    status = server.status()
    assert status["weight_version"] == 0 and status["weights_incomplete"], status
    with pytest.raises(Exception, match="incomplete"):
        await server.submit({"input_ids": list(range(20, 50)), "response_start": 10}, timeout_s=0.5)


async def test_a_load_sent_together_with_its_begin_waits_for_the_drain(tiny_model):
    server = _local(tiny_model, max_wait_ms=0)
    w1 = perturbed_weights(_engine_weights(server), seed=1, scale=0.5)
    await server.start()
    ids = list(range(20, 60))
    try:
        scoring = asyncio.ensure_future(server.submit({"input_ids": ids, "response_start": 10, "temperature": 1.0}))
        await asyncio.sleep(0)  # the request is queued; begin and load arrive in the dispatch's turn
        begin = asyncio.ensure_future(server.begin_weight_update(1))
        load = asyncio.ensure_future(server.load_weights(list(w1.items()), 1))
        result = await scoring
        await begin, await load
        await server.commit_weight_update(1)
    finally:
        await server.shutdown()
    assert result.weight_version == 0
    expected, _ = reference_log_probs(reference_model(tiny_model), LogProbRequest(input_ids=ids, response_start=10, temperature=1.0))
    np.testing.assert_allclose(result.log_probs, expected.numpy(), atol=TOLERANCE, rtol=0)


async def test_a_publisher_that_gives_up_midway_aborts_the_update_and_its_stream_loads_nothing_more(tiny_model):
    server = _local(tiny_model)
    w0 = _engine_weights(server)
    w1, w2 = perturbed_weights(w0, seed=1), perturbed_weights(w0, seed=2)
    publisher = WeightPublisher(server, TransportConfig(backend="gloo", bucket_bytes=ONE_TENSOR_PER_BUCKET, timeout_s=60))
    gate = Gate()
    try:
        publishing = asyncio.ensure_future(publisher.update_weights(gate.stream(list(w1.items())), 1))
        await gate.wait_reached()
        publishing.cancel()  # the trainer's own timeout
        with pytest.raises(asyncio.CancelledError):
            await publishing
        assert server.status()["weights_incomplete"]  # partly delivered: nothing serves until version 2
        report = await publisher.update_weights(w2, 2)
        assert report.ok and server.weight_version == 2
        gate.proceed.set()  # version 1's sender thread goes on streaming
        await _transport_threads_done()
        now = _engine_weights(server)
        assert _holding(now, w2) == len(now), f"only {_holding(now, w2)} of {len(now)} tensors hold version 2"
    finally:
        gate.proceed.set()
        await publisher.close()
        await server.shutdown()


async def test_a_worker_driven_stream_is_admitted_only_once_begin_has_drained():
    server = ModelEngineServer(FakeExecutor(compute_s=0.3), SchedulerConfig(max_wait_ms=0))
    await server.start()
    try:
        scoring = asyncio.ensure_future(server.submit(request(10, 5)))
        await asyncio.sleep(0.05)  # its batch is computing
        begin = asyncio.ensure_future(server.begin_weight_update(1))
        await asyncio.sleep(0)
        with pytest.raises(WeightSyncError, match="still draining"):
            server.updates.admit(1)
        assert (await scoring).weight_version == 0
        await begin
        server.updates.admit(1)  # drained: a worker may now receive
        assert server.weights.current(1).touched
    finally:
        await server.shutdown()


async def test_a_stream_sized_for_other_receivers_is_refused_before_it_touches_anything(streaming):
    """Refused before the delivery counts as begun: an abort afterwards keeps the old weights
    serving (the check once ran inside the delivery, so the abort left them incomplete)."""
    server = streaming.server
    await server.begin_weight_update(1)
    spec = streaming.transport.begin("v1-wrong-size", 2)  # two receivers; this server has one
    with pytest.raises(WeightSyncError, match="sized for 2 receivers, but 1 take part"):
        await server.receive_weights(spec, 1)
    await server.abort_weight_update("the publisher sized its stream wrong")
    status = server.status()
    assert status["weight_version"] == 0 and status["weights_incomplete"] is None, status
    assert (await server.submit({"input_ids": list(range(20, 50)), "response_start": 10})).weight_version == 0
