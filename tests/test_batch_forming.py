"""The batching policy on its own: which queued requests form a batch, and when it launches."""

from __future__ import annotations

import asyncio

import pytest

from model_engine_server.batch_forming import BatchLimits, form_batch
from model_engine_server.packing import MIN_SHARED_PROMPT_TOKENS
from model_engine_server.protocol import LogProbRequest
from model_engine_server.request_queue import Pending


def _pending(loop: asyncio.AbstractEventLoop, prompt: list[int], response: list[int], at: float, **fields) -> Pending:
    request = LogProbRequest(input_ids=prompt + response, response_start=len(prompt), **fields)
    return Pending(request, loop.create_future(), enqueued_at=at)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_batch_that_is_not_full_waits_until_its_oldest_request_has_waited_max_wait(loop):
    queued = [_pending(loop, [1, 2], [3], at=10.0), _pending(loop, [4], [5, 6], at=10.05)]
    limits = BatchLimits(max_tokens=100, max_requests=None, max_wait_s=0.2, shares_prompts=False)
    batch, wait = form_batch(queued, limits, weight_version=0, now=10.1, flush=False)
    assert batch == [] and wait == pytest.approx(0.1)
    batch, wait = form_batch(queued, limits, weight_version=0, now=10.2, flush=False)
    assert batch == queued and wait is None
    batch, _ = form_batch(queued, limits, weight_version=0, now=10.0, flush=True)
    assert batch == queued


def test_requests_that_do_not_fit_are_skipped_and_the_batch_launches_full(loop):
    big, small_a, small_b = (_pending(loop, [1] * 6, [2] * 4, at=0.0), _pending(loop, [3], [4], at=0.0),
                             _pending(loop, [5], [6], at=0.0))
    limits = BatchLimits(max_tokens=12, max_requests=None, max_wait_s=5.0, shares_prompts=False)
    batch, wait = form_batch([big, small_a, small_b], limits, weight_version=0, now=0.0, flush=False)
    assert batch == [big, small_a] and wait is None  # 10 + 2 tokens: full, so it launches at once
    limits = BatchLimits(max_tokens=100, max_requests=2, max_wait_s=5.0, shares_prompts=False)
    batch, _ = form_batch([big, small_a, small_b], limits, weight_version=0, now=0.0, flush=False)
    assert batch == [big, small_a]  # the request cap left small_b out


def test_a_request_waiting_for_a_later_version_stays_queued(loop):
    later = _pending(loop, [1], [2], at=0.0, min_weight_version=3)
    now_ok = _pending(loop, [3], [4], at=0.0, min_weight_version=2)
    limits = BatchLimits(max_tokens=100, max_requests=None, max_wait_s=0.0, shares_prompts=False)
    assert form_batch([later, now_ok], limits, weight_version=2, now=1.0, flush=False)[0] == [now_ok]
    assert form_batch([later], limits, weight_version=2, now=1.0, flush=False) == ([], None)


@pytest.mark.parametrize("shares_prompts", [True, False])
def test_a_shared_prompt_counts_once_only_where_the_engine_shares_it(loop, shares_prompts):
    prompt = list(range(5, 5 + MIN_SHARED_PROMPT_TOKENS))
    group = [_pending(loop, prompt, [i], at=0.0) for i in range(3)]
    limits = BatchLimits(max_tokens=len(prompt) + 3, max_requests=None, max_wait_s=5.0, shares_prompts=shares_prompts)
    batch, _ = form_batch(group, limits, weight_version=0, now=0.0, flush=True)
    assert len(batch) == (3 if shares_prompts else 1)
