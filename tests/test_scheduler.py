"""`ModelEngineServer` batching, pause/resume, shutdown and failure handling (fake executor);
weight versions: `tests/test_scheduler_versions.py`."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
import torch

from model_engine_server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ServerShuttingDown,
    WorkerFailed,
)
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.scheduler_state import SchedulerObserver
from tests.fakes import FakeExecutor, request


def make_server(executor: FakeExecutor, **config) -> ModelEngineServer:
    config.setdefault("max_wait_ms", 5)
    return ModelEngineServer(executor, SchedulerConfig(**config))


async def test_batches_respect_the_token_budget():
    executor = FakeExecutor(compute_s=0.01)
    server = make_server(executor, max_tokens_per_batch=100, max_wait_ms=20)
    rng = random.Random(0)
    lengths = [rng.randint(2, 60) for _ in range(50)]
    results = await server.score([request(n) for n in lengths])
    assert all(not isinstance(r, Exception) for r in results)
    assert all(sum(r.num_tokens for r in batch) <= 100 for batch in executor.batches)
    assert sorted(r.num_tokens for b in executor.batches for r in b) == sorted(lengths)
    assert len(executor.batches) < len(lengths)  # requests were actually batched together
    await server.shutdown()


@pytest.mark.parametrize("shares_prompts", [False, True])
async def test_a_shared_prompt_counts_once_toward_the_budget_where_the_engine_shares_it(shares_prompts):
    """Six samples of one 50-token prompt, 10 response tokens each: 60 tokens apiece, 110 for two
    whole, 50 + 6 x 10 = 110 with the prompt once. A different prompt never counts as shared."""
    executor = FakeExecutor(compute_s=0.01)
    executor._info = dataclasses.replace(executor._info, shares_prompts=shares_prompts)
    server = make_server(executor, max_tokens_per_batch=110, max_wait_ms=50)
    prompt = list(range(2, 52))
    group = [LogProbRequest(input_ids=prompt + [7] * 10, response_start=50) for _ in range(6)]
    other = LogProbRequest(input_ids=list(range(3, 53)) + [7] * 10, response_start=50)
    results = await server.score([*group, other])
    assert all(not isinstance(r, Exception) for r in results)
    sizes = sorted(len(batch) for batch in executor.batches)
    assert sizes == ([1, 6] if shares_prompts else [1, 1, 1, 1, 1, 1, 1])
    await server.shutdown()


async def test_max_batch_size_limits_requests_per_batch():
    executor = FakeExecutor()
    server = make_server(executor, max_batch_size=3, max_wait_ms=50)
    await server.score([request(4) for _ in range(10)])
    assert max(len(b) for b in executor.batches) == 3
    await server.shutdown()


async def test_partial_batch_is_flushed_after_max_wait():
    executor = FakeExecutor()
    server = make_server(executor, max_tokens_per_batch=10_000, max_wait_ms=30)
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await server.submit(request(5))
    assert loop.time() - start >= 0.025
    assert result.log_probs.shape == (4,)
    await server.shutdown()


async def test_next_batch_is_handed_over_while_the_current_one_computes():
    executor = FakeExecutor(compute_s=0.05)
    server = make_server(executor, max_tokens_per_batch=10, max_wait_ms=0)
    await server.score([request(10) for _ in range(4)])
    assert executor.max_running == 2
    await server.shutdown()


async def test_pause_waits_for_the_inflight_batch_and_holds_new_requests():
    executor = FakeExecutor(compute_s=0.1)
    server = make_server(executor, max_wait_ms=0)
    first = asyncio.ensure_future(server.submit(request(5)))
    await executor.started.wait()
    await server.pause_serving()
    assert first.done() and executor.running == 0  # pause returned only after the batch finished
    held = [asyncio.ensure_future(server.submit(request(5))) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert not any(h.done() for h in held) and len(executor.batches) == 1
    assert server.status()["queue_depth"] == 3 and server.status()["paused"]


async def test_request_sent_while_paused_is_answered_after_resume():
    executor = FakeExecutor()
    server = make_server(executor)
    await server.pause_serving()
    held = [asyncio.ensure_future(server.submit(request(5))) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert not any(h.done() for h in held)
    await server.resume_serving()
    results = await asyncio.gather(*held)
    assert len(results) == 5 and server.status()["paused_seconds_total"] > 0.04
    await server.shutdown()


async def test_queue_bound_gives_overload_at_once():
    server = make_server(FakeExecutor(), max_queued_tokens=25, max_tokens_per_batch=25)
    await server.pause_serving()
    accepted = [asyncio.ensure_future(server.submit(request(10))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="max_queued_tokens=25"):
        await server.submit(request(10))
    await server.resume_serving()
    await asyncio.gather(*accepted)
    await server.shutdown()


async def test_shutdown_answers_the_callers_of_a_batch_still_running_at_its_deadline():
    executor = FakeExecutor(compute_s=3600.0)  # an engine that never answers
    server = make_server(executor)
    waiting = asyncio.ensure_future(server.submit(request(5)))
    await executor.started.wait()
    await asyncio.wait_for(server.shutdown(drain=False, timeout_s=0.2), timeout=30)
    with pytest.raises(ServerShuttingDown, match="while this request was computing"):
        await asyncio.wait_for(waiting, timeout=1)
    assert server.status()["inflight_batches"] == 0


async def test_request_over_the_token_budget_is_refused_with_a_message():
    server = make_server(FakeExecutor(), max_tokens_per_batch=16)
    with pytest.raises(InvalidRequest, match="max_tokens_per_batch=16"):
        await server.submit(request(17))
    await server.shutdown()


async def test_token_outside_vocab_is_refused_and_others_still_served():
    server = make_server(FakeExecutor(vocab_size=50))
    good = request(5)
    bad = {"input_ids": [1, 2, 99], "response_start": 1}
    results = await server.score([good, bad, request(6)])
    assert isinstance(results[1], InvalidRequest) and "outside the vocabulary" in results[1].message
    assert results[0].log_probs.shape == (4,) and results[2].log_probs.shape == (5,)
    await server.shutdown()


async def test_failing_request_does_not_fail_its_batch_mates():
    executor = FakeExecutor()
    executor.poison_token = 7
    server = make_server(executor, max_wait_ms=20)
    results = await server.score([request(5), {"input_ids": [1, 7, 1], "response_start": 1}, request(5)])
    assert len(executor.batches) == 1
    assert isinstance(results[1], WorkerFailed)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    await server.shutdown()


async def test_executor_failure_fails_its_batch_with_the_reason_and_serving_goes_on():
    executor = FakeExecutor()
    executor.fail_next_batch = RuntimeError("worker died")
    server = make_server(executor, max_wait_ms=20)
    results = await server.score([request(5), request(5)])
    assert all(isinstance(r, WorkerFailed) and "worker died" in r.message for r in results)
    assert (await server.submit(request(5))).weight_version == 0
    await server.shutdown()


async def test_waiting_past_the_deadline_fails_with_the_reason():
    server = make_server(FakeExecutor())
    await server.pause_serving()
    with pytest.raises(DeadlineExceeded, match="serving paused"):
        await server.submit(request(5), timeout_s=0.05)
    assert server.status()["queue_depth"] == 0


async def test_cancelled_caller_leaves_the_queue():
    server = make_server(FakeExecutor())
    await server.pause_serving()
    task = asyncio.ensure_future(server.submit(request(5)))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert server.status()["queued_tokens"] == 0


async def test_shutdown_finishes_accepted_requests_and_refuses_new_ones():
    executor = FakeExecutor(compute_s=0.05)
    server = make_server(executor, max_tokens_per_batch=10, max_wait_ms=0)
    accepted = [asyncio.ensure_future(server.submit(request(10))) for _ in range(4)]
    await asyncio.sleep(0)
    await server.shutdown(drain=True, timeout_s=5)
    assert all(not isinstance(r, Exception) for r in await asyncio.gather(*accepted, return_exceptions=True))
    with pytest.raises(ServerShuttingDown):
        await server.submit(request(5))


@pytest.mark.parametrize("held_by", ["pause", "later_version", "open_update"])
async def test_shutdown_answers_requests_nothing_would_serve_at_once_not_at_its_deadline(held_by):
    executor = FakeExecutor(compute_s=0.01)
    server = make_server(executor)
    await server.start()
    fields = {"min_weight_version": 3} if held_by == "later_version" else {}
    if held_by == "pause":
        await server.pause_serving()
    if held_by == "open_update":
        await server.begin_weight_update(1)
    held = asyncio.ensure_future(server.submit(request(5, **fields)))
    await asyncio.sleep(0.05)
    assert not held.done()
    async with asyncio.timeout(5):  # the drain's own limit is 60 s
        await server.shutdown(drain=True, timeout_s=60)
    with pytest.raises(ServerShuttingDown):
        await held


async def test_random_pause_update_resume_cycles_never_mix_versions_or_lose_requests():
    """Concurrent clients, random pauses and weight updates: every result's version is the
    version in force for its whole batch, and every request ends answered or failed."""
    executor = FakeExecutor(compute_s=0.002)
    server = make_server(executor, max_tokens_per_batch=64, max_wait_ms=1, max_inflight_batches=2)
    rng = random.Random(1)
    outcomes = []

    async def client(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(40):
            try:
                outcomes.append(await server.submit(request(local.randint(2, 30)), timeout_s=10))
            except Exception as error:  # noqa: BLE001 - recorded and checked below
                outcomes.append(error)
            await asyncio.sleep(local.random() * 0.003)

    async def trainer() -> None:
        for version in range(1, 21):
            await asyncio.sleep(rng.random() * 0.01)
            if rng.random() < 0.3:
                await server.pause_serving()
                await asyncio.sleep(rng.random() * 0.005)
                await server.resume_serving()
            await server.update_weights([("w", torch.tensor(float(version)))], version=version)

    await asyncio.wait_for(asyncio.gather(trainer(), *(client(s) for s in range(8))), timeout=60)
    assert len(outcomes) == 8 * 40
    assert all(not isinstance(o, Exception) for o in outcomes), [o for o in outcomes if isinstance(o, Exception)][:3]
    assert all((o.log_probs == o.weight_version).all() for o in outcomes)
    assert executor.mixed_batches == 0
    assert len({o.weight_version for o in outcomes}) > 5
    await server.shutdown()


async def test_shutdown_right_after_a_waiting_caller_left_does_not_hang():
    """Issue 7's stall: the dispatch loop waits (with a deadline) for a partial batch to fill;
    its only caller goes away; shutdown wakes and cancels the loop in one go. On Python 3.11
    `asyncio.wait_for` lost that cancellation and shutdown waited forever."""
    for _ in range(5):
        server = make_server(FakeExecutor(), max_tokens_per_batch=10_000, max_wait_ms=10_000)
        caller = asyncio.create_task(server.submit(request(5)))
        for _ in range(3):  # the request is queued and the loop parks waiting for more
            await asyncio.sleep(0)
        assert server.status()["queue_depth"] == 1
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(server.shutdown(), 5.0)


class _BrokenObserver(SchedulerObserver):
    def request_done(self, result, tokens) -> None:
        if result.log_probs.shape[0] == 6:
            raise RuntimeError("metrics backend down")


async def test_a_failing_metrics_hook_neither_strands_the_rest_of_the_batch_nor_its_slot():
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig(max_wait_ms=20), _BrokenObserver())
    outcomes = await asyncio.wait_for(server.score([request(5), request(7), request(9)]), 5.0)  # 4, 6, 8 tokens
    assert [o.log_probs.shape[0] for o in outcomes] == [4, 6, 8]  # each delivered before its hook ran
    await asyncio.wait_for(server.pause_serving(), 5.0)  # the batch's slot was released
    assert server.status()["inflight_batches"] == 0
    await server.resume_serving()
    await server.shutdown()


class _FailedHookRaises(SchedulerObserver):
    def request_failed(self, error) -> None:
        raise RuntimeError("metrics backend down")


async def test_a_failing_request_failed_hook_leaves_no_caller_unanswered():
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig(request_timeout_s=60), _FailedHookRaises())
    await server.pause_serving()
    waiting = [asyncio.ensure_future(server.submit(request(4))) for _ in range(3)]
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.shutdown(drain=False), 5.0)
    outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5.0)
    assert all(isinstance(o, ServerShuttingDown) for o in outcomes)


def test_forming_a_batch_looks_at_about_a_batch_of_a_long_queue():
    from model_engine_server.batch_forming import LOOKAHEAD, BatchLimits, Pending, form_batch

    looked = 0

    def queued():
        nonlocal looked
        for index in range(100_000):
            looked += 1
            yield Pending(request(4 + index % 7), None)  # type: ignore[arg-type]

    batch, _ = form_batch(queued(), BatchLimits(64, 8, 0.0, False), 0, 0.0, flush=True)
    assert len(batch) == 8 and looked == 9  # full by count: the scan stops at the next one
    looked = 0
    batch, _ = form_batch(queued(), BatchLimits(20, None, 0.0, False), 0, 0.0, flush=True)
    assert sum(p.tokens for p in batch) <= 20 and looked <= len(batch) + LOOKAHEAD + 2


@pytest.mark.parametrize("timeout_s", [float("nan"), 0.0, -1.0, True])
async def test_a_timeout_that_is_not_a_positive_number_is_refused(timeout_s):
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig())
    with pytest.raises(InvalidRequest, match="timeout_s: must be a positive number"):
        await server.submit(request(4), timeout_s=timeout_s)
    await server.shutdown()
