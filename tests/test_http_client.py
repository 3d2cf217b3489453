"""The HTTP clients against a real uvicorn serving a real tiny model (plus one fake service for
failures a real server cannot be made to produce on demand)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from clients.base import LogProbClient
from clients.http_client import HttpLogProbClient, RetryPolicy, SyncHttpLogProbClient
from clients.local_client import LocalClient
from model_engine_server.config import HttpConfig
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import DeadlineExceeded, InvalidRequest, ServerShuttingDown, WeightSyncError, WorkerFailed
from model_engine_server.http.app import create_app
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread

TOKEN = "client-test-token"
VOCAB = 512
TOLERANCE = 1e-5
QUEUE_TOKENS = 4096


def serve_model(model_path: Any, **scheduler: Any) -> ServerThread:
    metrics = ServerMetrics()
    settings = dict(max_tokens_per_batch=2048, max_queued_tokens=QUEUE_TOKENS, request_timeout_s=60)
    service = build_local_server(EngineSpec(model_path=str(model_path)), scheduler=SchedulerConfig(**{**settings, **scheduler}),
                                 observer=metrics.observer)
    app = create_app(service, HttpConfig(retry_after_s=1.0), metrics, owns_service=True, admin_token=TOKEN)
    return ServerThread(app)


@pytest.fixture(scope="module")
def served(tiny_model):
    with serve_model(tiny_model) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_model(tiny_model)


def admin(url: str, route: str) -> None:
    assert httpx.post(f"{url}{route}", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


def queued_tokens(url: str) -> int:
    return httpx.get(f"{url}/v1/status").json()["queued_tokens"]


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("wire", ["msgpack", "json"])
async def test_async_client_results_equal_the_reference(served, reference, wire):
    requests = random_requests(6, VOCAB, seed=51, max_len=120)
    async with HttpLogProbClient(served.url, wire=wire) as client:
        assert isinstance(client, LogProbClient)
        results = await client.compute_log_probs(requests)
    for request, result in zip(requests, results):
        assert isinstance(result, LogProbResult) and result.request_id == request.request_id
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(result.entropy), expected_entropy, atol=TOLERANCE, rtol=0)


def test_sync_client_swaps_for_the_local_client_with_the_same_answers(served, tiny_model):
    requests = random_requests(4, VOCAB, seed=52, max_len=80)
    with SyncHttpLogProbClient(served.url) as client:
        remote = client.compute_log_probs(requests)
        assert client.get_status()["weight_version"] == 0 and client.health()["status"] == "ok"
        assert "model_engine_server_requests_total" in client.metrics()

    async def local_answers() -> list[LogProbResult]:
        service = build_local_server(EngineSpec(model_path=str(tiny_model)))
        try:
            return await LocalClient(service).compute_log_probs(requests)
        finally:
            await service.shutdown()

    for over_http, in_process in zip(remote, asyncio.run(local_answers())):
        torch.testing.assert_close(torch.from_numpy(over_http.log_probs), torch.from_numpy(in_process.log_probs), atol=TOLERANCE, rtol=0)


async def test_score_returns_each_requests_error_and_compute_log_probs_raises_the_first(served):
    good = LogProbRequest(input_ids=[1, 2, 3], response_start=1)
    bad = {"input_ids": [1, 2, VOCAB], "response_start": 1}
    async with HttpLogProbClient(served.url) as client:
        outcomes = await client.score([good, bad])
        assert isinstance(outcomes[0], LogProbResult) and isinstance(outcomes[1], InvalidRequest)
        assert outcomes[1].field == "requests[1].input_ids"
        with pytest.raises(InvalidRequest) as caught:
            await client.compute_log_probs([good, bad])
        assert len(caught.value.outcomes) == 2


async def test_a_deadline_is_kept_by_the_server_and_the_client(served):
    admin(served.url, "/v1/pause")
    try:
        async with HttpLogProbClient(served.url) as client:
            started = time.monotonic()
            outcomes = await client.score([LogProbRequest(input_ids=[1, 2, 3], response_start=1)], timeout_s=0.5)
            assert isinstance(outcomes[0], DeadlineExceeded) and "serving paused" in str(outcomes[0])
            assert time.monotonic() - started < 30  # answered, not hung
    finally:
        admin(served.url, "/v1/resume")


def test_an_overloaded_call_is_retried_after_retry_after_until_it_is_served(served):
    admin(served.url, "/v1/pause")
    filler = [{"input_ids": list(range(1, 401)), "response_start": 1}] * 10  # 4000 of 4096 queued tokens
    fill = threading.Thread(target=lambda: SyncHttpLogProbClient(served.url).score(filler))
    fill.start()
    wait_until(lambda: queued_tokens(served.url) == 4000)
    answer: dict[str, Any] = {}

    def call() -> None:
        with SyncHttpLogProbClient(served.url, retry=RetryPolicy(max_retries=30, backoff_s=0.05)) as client:
            started = time.monotonic()
            answer["results"] = client.compute_log_probs([{"input_ids": list(range(1, 201)), "response_start": 1}])
            answer["elapsed"] = time.monotonic() - started

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: 'route="/v1/logprobs",status="429"' in httpx.get(f"{served.url}/metrics").text)
    assert "results" not in answer  # refused with 429 and waiting to retry
    admin(served.url, "/v1/resume")
    caller.join(timeout=60)
    fill.join(timeout=60)
    assert len(answer["results"][0].log_probs) == 199
    assert answer["elapsed"] >= 1.0  # it waited at least the server's Retry-After before trying again


async def test_admin_calls_without_the_token_are_refused(served):
    async with HttpLogProbClient(served.url) as client:
        with pytest.raises(Exception) as caught:
            await client.pause_serving()
        assert caught.value.code == "unauthorized" and caught.value.http_status == 401
    async with HttpLogProbClient(served.url, admin_token=TOKEN) as client:
        await client.pause_serving()
        assert (await client.get_status())["paused"] is True
        await client.resume_serving()


def test_no_server_is_a_typed_error_after_bounded_retries():
    with SyncHttpLogProbClient("http://127.0.0.1:9", retry=RetryPolicy(max_retries=2, backoff_s=0.01)) as client:
        with pytest.raises(WorkerFailed, match="cannot reach the server"):
            client.score([{"input_ids": [1, 2], "response_start": 1}])


async def test_weights_sent_over_http_are_served_as_the_new_version(tiny_models, tmp_path):
    model_path = tiny_models["qwen2_untied"]
    with serve_model(model_path) as server:
        async with HttpLogProbClient(server.url, admin_token=TOKEN) as client:
            original = reference_model(model_path)
            new_weights = perturbed_weights({k: v.detach() for k, v in original.state_dict().items()}, seed=7, scale=0.05)
            partial = list(new_weights.items())[:-1]
            with pytest.raises(WeightSyncError) as failed:
                await client.update_weights(partial, version=1)
            assert failed.value.http_status == 409 and "missing" in str(failed.value)
            assert await client.update_weights(new_weights.items(), version=2) == 2

            fresh = reference_model(model_path)
            fresh.load_state_dict(new_weights)
            requests = random_requests(4, VOCAB, seed=53, max_len=100)
            for request, result in zip(requests, await client.compute_log_probs(requests)):
                assert result.weight_version == 2
                expected, _ = reference_log_probs(fresh, request)
                torch.testing.assert_close(torch.from_numpy(result.log_probs), expected, atol=TOLERANCE, rtol=0)


class FlakyService:
    """A service that refuses the first `refusals` calls as shutting down (503), then answers."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls = 0

    async def score(self, requests: Any, timeout_s: float | None = None) -> list[Any]:
        self.calls += 1
        if self.calls <= self.refusals:
            raise ServerShuttingDown("restarting")
        return [LogProbResult(r.request_id, log_probs=np.zeros(1, np.float32), weight_version=3) for r in requests]

    async def get_status(self) -> dict[str, Any]:
        return {"weight_version": 3}

    async def pause_serving(self) -> None: ...
    async def resume_serving(self) -> None: ...
    async def update_weights(self, named_tensors: Any, version: int) -> int: return version
    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None: ...


async def test_a_503_call_is_retried_with_backoff(tmp_path):
    service = FlakyService(refusals=2)
    with ServerThread(create_app(service, HttpConfig(retry_after_s=0.0))) as server:
        async with HttpLogProbClient(server.url, retry=RetryPolicy(max_retries=5, backoff_s=0.01)) as client:
            results = await client.compute_log_probs([{"input_ids": [1, 2], "response_start": 1}])
    assert service.calls == 3 and results[0].weight_version == 3
