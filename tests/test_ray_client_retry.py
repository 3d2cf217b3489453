"""The Ray-handle client retries what the server refuses for now, as the HTTP client does: a
service actor with a queue of one batch answers most of a burst `overloaded` at once, and the
client sends those again until every request is scored.

Failed before the retry policy was shared: the Ray client returned the `Overloaded` answers
where the HTTP client, given the same server answers, returned results.
"""

from __future__ import annotations

import pytest

from clients.ray_client import RayLogProbClient
from clients.retry import RetryPolicy
from model_engine_server.config import ServerConfig
from model_engine_server.errors import Overloaded
from model_engine_server.protocol import LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from replica.service_actor import start_service_actor, stop_service_actor
from tests.helpers import random_requests

QUEUE_TOKENS = 64


async def test_requests_refused_as_overloaded_are_sent_again_until_scored(ray_cluster, tiny_model):
    scheduler = SchedulerConfig(max_tokens_per_batch=QUEUE_TOKENS, max_queued_tokens=QUEUE_TOKENS, max_wait_ms=1.0)
    config = ServerConfig(model_path=str(tiny_model), runtime="in_process", scheduler=scheduler)
    handle = await start_service_actor(config, name="model-engine-server-retry-test")
    burst = random_requests(8, 512, seed=60, min_len=20, max_len=30)  # ~4 queues' worth at once
    try:
        once = await RayLogProbClient(handle, retry=RetryPolicy(max_retries=0)).score(burst)
        assert any(isinstance(o, Overloaded) for o in once), once  # the server does refuse most of it
        patient = RayLogProbClient(handle, retry=RetryPolicy(max_retries=100, backoff_s=0.01, max_backoff_s=0.1))
        outcomes = await patient.score(burst, timeout_s=60)
        assert all(isinstance(o, LogProbResult) for o in outcomes), outcomes
        assert [o.request_id for o in outcomes] == [r.request_id for r in burst]
    finally:
        await stop_service_actor(handle, drain=False, timeout_s=10.0)


@pytest.mark.parametrize("max_retries", [0, 3])
def test_the_retry_policy_gives_up_at_its_count(max_retries):
    from clients.retry import Deadline, entries_to_resend

    refused = [Overloaded("queue full", retry_after_s=0.0)]
    policy = RetryPolicy(max_retries=max_retries, backoff_s=0.0)
    again, delay = entries_to_resend(refused, [0], policy, attempt=max_retries, deadline=Deadline(None))
    assert again == [0] and delay is None
    if max_retries:
        assert entries_to_resend(refused, [0], policy, attempt=0, deadline=Deadline(None))[1] is not None
