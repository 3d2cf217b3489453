"""The server enforces its weight-update promises whatever calls arrive (in-process paths).

Each test here failed on the code before the update session existed: a commit with nothing
delivered relabelled the old weights, a transport target loaded with no update begun, an aborted
sync's fused-parameter parts mixed into the next one, a dispatch-loop bug stranded the queue,
a hung forward blocked every update, and an unset temperature meant 1.0 in process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from checkpoint_transport.channel import get_backend
from checkpoint_transport.spec import TransportConfig
from clients.local_client import LocalClient
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, ModelInfo
from model_engine_server.errors import WeightSyncError, WorkerFailed
from model_engine_server.executor import InProcessExecutor
from model_engine_server.http.app import create_app
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from tests.fakes import FakeExecutor, request
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread

TOLERANCE = 1e-5  # fp32 log-probs against a plain transformers forward
VOCAB = 512


def _local(tiny_model, **scheduler: Any) -> ModelEngineServer:
    return build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=60, **scheduler))


def _engine_weights(server: ModelEngineServer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in server.executor.adapter.engine.export_weights()}


# ---------------------------------------------------------------- the curl sequence, over real HTTP
@pytest.fixture(scope="module")
def served(tiny_model):
    app = create_app(_local(tiny_model), owns_service=True)
    with ServerThread(app) as server:
        yield server


def test_begin_then_commit_with_nothing_delivered_is_refused_and_the_version_stays(served, tiny_model):
    begun = httpx.post(f"{served.url}/v1/weights/begin", json={"version": 7})
    assert begun.status_code == 200 and begun.json() == {"version": 7, "receivers": 1}
    committed = httpx.post(f"{served.url}/v1/weights/commit", json={"version": 7})
    assert committed.status_code == 409, committed.text
    assert "did not arrive complete" in committed.json()["error"]["message"]
    status = httpx.get(f"{served.url}/v1/status").json()
    assert status["weight_version"] == 0 and not status["updating_weights"]
    ids = list(range(20, 60))
    scored = httpx.post(f"{served.url}/v1/logprobs", json={"requests": [{"input_ids": ids, "response_start": 10}]})
    [result] = scored.json()["results"]
    assert result["weight_version"] == 0
    expected, _ = reference_log_probs(reference_model(tiny_model), LogProbRequest(input_ids=ids, response_start=10, temperature=1.0))
    np.testing.assert_allclose(result["log_probs"], expected.numpy(), atol=TOLERANCE, rtol=0)


def test_a_second_begin_while_one_is_open_is_refused_at_once_with_409(served):
    assert httpx.post(f"{served.url}/v1/weights/begin", json={"version": 8}).status_code == 200
    started = time.monotonic()
    second = httpx.post(f"{served.url}/v1/weights/begin", json={"version": 9})
    assert second.status_code == 409 and "already in progress" in second.json()["error"]["message"]
    assert time.monotonic() - started < 5.0
    assert httpx.post(f"{served.url}/v1/weights/abort", json={"reason": "test"}).status_code == 200
    assert httpx.get(f"{served.url}/v1/status").json()["weight_version"] == 0


def test_update_weights_with_an_empty_tensor_list_is_refused_over_http(served):
    from model_engine_server.http.wire import encode_weights

    reply = httpx.post(f"{served.url}/v1/update_weights", content=encode_weights([], 5),
                       headers={"content-type": "application/msgpack"})
    assert reply.status_code == 409, reply.text
    status = httpx.get(f"{served.url}/v1/status").json()
    assert status["weight_version"] == 0 and status["weights_incomplete"] is None


# ---------------------------------------------------------------- deliveries need an open update
async def test_loading_with_no_update_open_is_refused_and_changes_nothing(tiny_model):
    server = _local(tiny_model)
    before = _engine_weights(server)
    with pytest.raises(WeightSyncError, match="no weight update is open"):
        await server.load_weights(perturbed_weights(before, seed=1).items())
    after = _engine_weights(server)
    assert all(torch.equal(before[name], after[name]) for name in before)
    await server.shutdown()


async def test_a_transport_target_refuses_to_receive_with_no_update_begun(tiny_model):
    server = _local(tiny_model)
    session = get_backend("gloo").open_session(TransportConfig(backend="gloo", timeout_s=5))
    try:
        spec = session.begin("no-begin", 1)
        with pytest.raises(WeightSyncError, match="no weight update is open"):
            await server.receive_weights(spec, 1)
    finally:
        session.close()
    assert server.status()["weight_version"] == 0 and server.status()["weights_incomplete"] is None
    await server.shutdown()


async def test_a_partial_delivery_then_abort_leaves_weights_incomplete_until_a_complete_sync(tiny_model):
    server = _local(tiny_model)
    new = perturbed_weights(_engine_weights(server), seed=2)
    await server.begin_weight_update(1)
    await server.load_weights(list(new.items())[:3])
    with pytest.raises(WeightSyncError, match="is missing"):
        await server.commit_weight_update(1)
    assert server.weight_version == 0 and server.status()["weights_incomplete"]
    await server.update_weights(new.items(), 1)
    assert server.weight_version == 1 and server.status()["weights_incomplete"] is None
    await server.shutdown()


# ---------------------------------------------------------------- failure isolation
async def test_the_dispatch_loop_survives_an_exception_and_fails_its_requests_with_the_reason():
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig(max_wait_ms=1))
    original, calls = server._select_batch, []

    def broken_once():  # a bug in batch selection, once
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("selection bug")
        return original()

    server._select_batch = broken_once  # type: ignore[method-assign]
    with pytest.raises(WorkerFailed, match="selection bug"):
        await asyncio.wait_for(server.submit(request(5)), 5.0)
    assert (await asyncio.wait_for(server.submit(request(5)), 5.0)).weight_version == 0  # the loop goes on
    await server.shutdown()


HANG_S = 6.0


class _HangingAdapter(ModelEngineServerAdapter):
    def score(self, requests):  # a forward stuck in a kernel (for longer than the test waits)
        time.sleep(HANG_S)
        return super().score(requests)


async def test_a_hung_in_process_forward_fails_at_the_batch_timeout_and_does_not_block_updates(tiny_model):
    probe = build_local_server(EngineSpec(model_path=str(tiny_model)))
    executor = InProcessExecutor(_HangingAdapter(probe.executor.adapter.engine), batch_timeout_s=0.3)
    server = ModelEngineServer(executor, SchedulerConfig(request_timeout_s=60))
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="batch_timeout_s=0.3"):
        await server.submit(request(8))
    with pytest.raises(WorkerFailed):  # the engine thread may be stuck for good: fail fast, never queue behind it
        await server.update_weights(_engine_weights(probe).items(), 1)
    assert time.monotonic() - started < HANG_S / 2 and server.weight_version == 0  # not queued behind the hang
    await server.shutdown(drain=False)


class _MPFailingEngine:
    """An engine that is one rank of a TP=2 group and fails every forward."""

    def __init__(self) -> None:
        self.info = ModelInfo("Fake", VOCAB, 4096, 8, 1, "float32", "cpu", False, model_parallel_size=2)
        self.forwards = 0

    def score_packed(self, batch, temperatures, want_entropy, chunk_tokens):
        self.forwards += 1
        raise RuntimeError("rank 1 lost its peer")


def test_under_model_parallelism_a_failed_batch_is_not_retried_request_by_request():
    engine = _MPFailingEngine()
    adapter = ModelEngineServerAdapter(engine)  # type: ignore[arg-type]
    requests = [r.model_copy(update={"temperature": 1.0}) for r in random_requests(4, VOCAB, seed=0)]
    outcomes = adapter.score(requests)
    assert engine.forwards == 1  # one collective forward, never a lone rank's retries
    assert all(isinstance(o, WorkerFailed) and "rank 1 lost its peer" in o.message for o in outcomes)


# ---------------------------------------------------------------- temperature: one meaning everywhere
async def test_an_unset_temperature_means_the_configured_one_through_the_in_process_client(tiny_model):
    server = _local(tiny_model, default_temperature=0.6)
    [unset] = random_requests(1, VOCAB, seed=5)
    unset = unset.model_copy(update={"temperature": None})
    assert "temperature" not in unset.model_dump(exclude_none=True)
    [result] = await LocalClient(server).compute_log_probs([unset])
    expected, _ = reference_log_probs(reference_model(tiny_model), unset.model_copy(update={"temperature": 0.6}))
    np.testing.assert_allclose(result.log_probs, expected.numpy(), atol=TOLERANCE, rtol=0)
    at_one, _ = reference_log_probs(reference_model(tiny_model), unset.model_copy(update={"temperature": 1.0}))
    assert np.abs(result.log_probs - at_one.numpy()).max() > 100 * TOLERANCE  # the test can tell them apart
    await server.shutdown()
