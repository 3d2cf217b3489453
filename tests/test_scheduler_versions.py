"""`ModelEngineServer`'s weight versions: updates that fail, time out, are cancelled or deliver
nothing never leave half-loaded weights serving; versions only increase; requests that ask for a
later version wait for it (fake executor)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_engine_server.errors import DeadlineExceeded, WeightSyncError
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from tests.fakes import FakeExecutor, request
from tests.test_scheduler import make_server


async def test_min_weight_version_waits_for_that_version():
    executor = FakeExecutor()
    server = make_server(executor)
    waiting = asyncio.ensure_future(server.submit(request(5, min_weight_version=1)))
    other = await server.submit(request(5))
    assert other.weight_version == 0 and not waiting.done()
    await server.update_weights([("w", torch.tensor(1.0))], version=1)
    result = await waiting
    assert result.weight_version == 1 and result.log_probs[0] == 1.0
    await server.shutdown()


async def test_failed_weight_update_keeps_version_and_refuses_to_serve_until_complete_sync():
    executor = FakeExecutor()
    server = make_server(executor)
    with pytest.raises(WeightSyncError, match="unknown weight 'bogus'"):
        await server.update_weights([("w", torch.tensor(5.0)), ("bogus", torch.tensor(1.0))], version=1)
    assert server.weight_version == 0 and server.status()["weights_incomplete"]
    held = asyncio.ensure_future(server.submit(request(5)))
    await server.resume_serving()  # an admin resume cannot serve incomplete weights
    await asyncio.sleep(0.05)
    assert not held.done()
    await server.update_weights([("w", torch.tensor(2.0))], version=1)
    result = await held
    assert result.weight_version == 1 and result.log_probs[0] == 2.0
    await server.shutdown()


async def test_an_update_that_delivered_nothing_is_refused_and_the_old_weights_serve_on():
    server = make_server(FakeExecutor())
    with pytest.raises(WeightSyncError, match="engine is missing 1 of 1 tensors"):
        await server.update_weights([], version=1)
    status = server.status()
    assert server.weight_version == 0 and status["weights_incomplete"] is None and not status["updating_weights"]
    assert (await asyncio.wait_for(server.submit(request(5)), 5.0)).weight_version == 0
    await server.shutdown()


async def test_an_update_begun_and_never_committed_is_aborted_after_its_timeout():
    """A publisher that dies between begin and commit must not leave the server drained forever.
    Nothing was delivered here, so the old weights serve on under the old version."""
    server = make_server(FakeExecutor(), weight_update_timeout_s=0.1)
    await server.begin_weight_update(1)
    held = asyncio.ensure_future(server.submit(request(5)))
    await asyncio.sleep(0.3)
    assert not server.status()["updating_weights"]
    assert (await asyncio.wait_for(held, 5.0)).weight_version == 0
    with pytest.raises(WeightSyncError, match="no weight update is open"):
        await server.commit_weight_update(1)  # the late publisher's commit cannot resurrect the update
    await server.shutdown()


async def test_an_update_that_timed_out_after_its_stream_began_refuses_to_serve_until_a_complete_one():
    server = make_server(FakeExecutor(), weight_update_timeout_s=0.1)
    await server.begin_weight_update(1)
    server.weights.current(1).start_delivery()  # a transport began streaming, then its publisher vanished
    held = asyncio.ensure_future(server.submit(request(5)))
    await asyncio.sleep(0.3)
    status = server.status()
    assert not status["updating_weights"] and "not committed within 0.1 s" in status["weights_incomplete"]
    assert not held.done() and server.weight_version == 0
    with pytest.raises(WeightSyncError):
        await server.commit_weight_update(1)
    await server.update_weights([("w", torch.tensor(3.0))], version=1)
    assert (await held).weight_version == 1
    await server.shutdown()


async def test_version_must_increase():
    server = make_server(FakeExecutor())
    with pytest.raises(WeightSyncError, match="greater than the current 0"):
        await server.update_weights([("w", torch.tensor(1.0))], version=0)


async def test_a_weight_update_abandoned_while_draining_leaves_the_old_weights_serving():
    executor = FakeExecutor(compute_s=0.3)
    server = make_server(executor)
    busy = asyncio.create_task(server.submit(request(5)))
    await executor.started.wait()
    begin = asyncio.create_task(server.begin_weight_update(1))
    await asyncio.sleep(0.05)  # draining behind the running batch
    begin.cancel()
    with pytest.raises(asyncio.CancelledError):
        await begin
    await busy
    status = server.status()
    assert status["updating_weights"] is False and status["weights_incomplete"] is None
    result = await asyncio.wait_for(server.submit(request(5)), 5.0)  # still served, old version
    assert result.weight_version == 0
    await server.shutdown()


class _SlowLoadingExecutor(FakeExecutor):
    """Loads the first tensor, then takes forever over the rest (a trainer stuck mid-export)."""

    async def load_weights(self, named_tensors):
        for name, tensor in named_tensors:
            self.weights = float(tensor.item())
            await asyncio.sleep(10)
        return ["w"]


async def test_a_weight_update_cancelled_while_loading_refuses_to_serve_until_a_complete_one():
    server = make_server(_SlowLoadingExecutor())
    update = asyncio.create_task(server.update_weights([("w", torch.tensor(3.0))], 1))
    await asyncio.sleep(0.05)  # half-way through loading
    update.cancel()
    with pytest.raises(asyncio.CancelledError):
        await update
    status = server.status()
    assert status["updating_weights"] is False and status["weights_incomplete"]  # never half-loaded weights
    with pytest.raises(DeadlineExceeded):
        await server.submit(request(5), timeout_s=0.2)
    await server.shutdown(drain=False)


async def test_requests_waiting_for_a_later_version_are_parked_then_served_in_arrival_order():
    from model_engine_server.request_queue import Pending, RequestQueue

    queue, loop = RequestQueue(), asyncio.get_running_loop()
    made = [Pending(request(4, min_weight_version=v), loop.create_future()) for v in (None, 2, None, 1)]
    for pending in made:
        queue.push(pending, 60.0, lambda *_: None)
    assert list(queue.eligible(0)) == [made[0], made[2]]
    assert list(queue.eligible(1)) == [made[0], made[2], made[3]]
    assert list(queue.eligible(2)) == made[:1] + made[1:]  # arrival order, the parked ones back in place
    assert queue.remove(made[1]) and not queue.remove(made[1]) and len(queue) == 3
    for pending in made:
        queue.remove(pending)


async def test_a_begin_whose_update_is_aborted_while_it_drains_returns_at_once():
    executor = FakeExecutor(compute_s=30.0)  # a batch that keeps the server busy
    server = ModelEngineServer(executor, SchedulerConfig(max_wait_ms=1))
    running = asyncio.ensure_future(server.submit(request(4)))
    await asyncio.wait_for(executor.started.wait(), 5.0)
    begin = asyncio.ensure_future(server.begin_weight_update(1))
    await asyncio.sleep(0.05)
    await server.abort_weight_update("the publisher gave up", version=1)
    with pytest.raises(WeightSyncError):
        await asyncio.wait_for(begin, 5.0)  # not when the 30 s batch ends
    running.cancel()
    await server.shutdown(drain=False, timeout_s=0.1)
