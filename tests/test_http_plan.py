"""The HTTP clients' call plans driven step by step with replies chosen here: no server, no
sockets. What is sent again, how long it waits and what the caller gets, per reply sequence
(the clients over a real uvicorn are in test_http_client.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from clients.http_plan import HttpPlans, Post, RetryPolicy, Sleep
from model_engine_server.errors import Overloaded, ServerShuttingDown, WorkerFailed
from model_engine_server.protocol import LogProbResult, outcome_to_wire

REQUESTS = [{"request_id": name, "input_ids": [1, 2, 3], "response_start": 1} for name in ("a", "b", "c")]


def plans(max_retries: int = 5, timeout_s: float | None = 60.0) -> HttpPlans:
    return HttpPlans("http://server", "json", timeout_s, RetryPolicy(max_retries=max_retries, backoff_s=0.01), None)


def answered(request_id: str, version: int = 3) -> dict[str, Any]:
    result = LogProbResult(request_id, np.array([-0.5, -1.5], dtype=np.float32), version)
    return outcome_to_wire(result, arrays_as_lists=True)


def overloaded(request_id: str, retry_after_s: float) -> dict[str, Any]:
    return outcome_to_wire(Overloaded("queue full", retry_after_s=retry_after_s), request_id)


def reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def test_only_the_overloaded_requests_are_sent_again_after_their_retry_after():
    plan = plans().score_plan(REQUESTS, timeout_s=None)
    first = plan.send(None)
    assert isinstance(first, Post) and first.path == "/v1/logprobs"
    assert [r["request_id"] for r in json.loads(first.body)["requests"]] == ["a", "b", "c"]
    wait = plan.send(reply(200, {"results": [answered("a"), overloaded("b", 0.7), answered("c")]}))
    assert isinstance(wait, Sleep) and wait.seconds >= 0.7  # never sooner than the server asked
    again = plan.send(None)
    assert [r["request_id"] for r in json.loads(again.body)["requests"]] == ["b"]
    with pytest.raises(StopIteration) as done:
        plan.send(reply(200, {"results": [answered("b", version=4)]}))
    outcomes = done.value.value
    assert [o.request_id for o in outcomes] == ["a", "b", "c"]  # in the caller's order
    assert [o.weight_version for o in outcomes] == [3, 4, 3]


def test_a_refused_call_is_retried_whole_then_its_error_raised_once_retries_run_out():
    plan = plans(max_retries=2).score_plan(REQUESTS[:1], timeout_s=None)
    plan.send(None)
    refused = {"error": {"code": "shutting_down", "message": "restarting"}}
    for _ in range(2):
        assert isinstance(plan.send(reply(503, refused, {"retry-after": "0.2"})), Sleep)
        assert isinstance(plan.send(None), Post)
    with pytest.raises(ServerShuttingDown) as caught:
        plan.send(reply(503, refused))
    assert caught.value.http_status == 503


def test_a_retry_that_would_outlast_the_deadline_returns_the_last_answer_instead():
    plan = plans(timeout_s=None).score_plan(REQUESTS[:2], timeout_s=0.5)
    sent = json.loads(plan.send(None).body)
    assert 0 < sent["timeout_s"] <= 0.5  # the server gets the caller's deadline as its own
    with pytest.raises(StopIteration) as done:
        plan.send(reply(200, {"results": [answered("a"), overloaded("b", 30.0)]}))
    first, second = done.value.value
    assert isinstance(first, LogProbResult) and isinstance(second, Overloaded)


def test_an_unreachable_server_is_a_typed_error():
    plan = plans(max_retries=0).score_plan(REQUESTS[:1], timeout_s=None)
    plan.send(None)
    with pytest.raises(WorkerFailed, match="cannot reach the server"):
        plan.send(httpx.ConnectError("refused"))
