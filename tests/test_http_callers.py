"""Callers that give up or overreach cannot hold the server's queue: a real uvicorn on
127.0.0.1 over a real tiny model, held paused so requests wait."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import ModelEngineError
from model_engine_server.http.app import create_app
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.weight_session import MAX_WEIGHT_VERSION
from tests.test_http_support import ServerThread

TOKEN = "callers-admin-token"
REQUEST_TIMEOUT_S = 3.0
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tiny_model):
    metrics = ServerMetrics()
    service = build_local_server(
        EngineSpec(model_path=str(tiny_model)),
        scheduler=SchedulerConfig(max_tokens_per_batch=2048, max_queued_tokens=4096, request_timeout_s=REQUEST_TIMEOUT_S),
        observer=metrics.observer,
    )
    with ServerThread(create_app(service, metrics=metrics, owns_service=True, admin_token=TOKEN)) as server:
        yield server


@pytest.fixture
def paused(served):
    assert httpx.post(f"{served.url}/v1/pause", headers=ADMIN).status_code == 200
    yield served
    assert httpx.post(f"{served.url}/v1/resume", headers=ADMIN).status_code == 200


def _call(requests: list[dict], **envelope) -> dict:
    return {"requests": requests, **envelope}


def _queue_depth(url: str) -> int:
    return httpx.get(f"{url}/v1/status").json()["queue_depth"]


def _wait_for_queue_depth(url: str, depth: int, within_s: float) -> None:
    end = time.monotonic() + within_s
    while _queue_depth(url) != depth and time.monotonic() < end:
        time.sleep(0.05)
    assert _queue_depth(url) == depth


def _http_statuses(url: str) -> set[str]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {s.labels["status"] for f in families if f.name == "model_engine_server_http_requests"
            for s in f.samples if s.name.endswith("_total") and s.value > 0}


def test_a_caller_that_disconnects_withdraws_its_waiting_requests(paused):
    body = _call([{"input_ids": [1, 2, 3, 4], "response_start": 2}] * 3, timeout_s=REQUEST_TIMEOUT_S)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{paused.url}/v1/logprobs", json=body, timeout=httpx.Timeout(1.0))
    _wait_for_queue_depth(paused.url, 0, within_s=REQUEST_TIMEOUT_S - 1.0)  # before the deadline would
    assert "499" in _http_statuses(paused.url)


def test_a_callers_timeout_can_shorten_the_servers_wait_but_not_extend_it(paused):
    started = time.monotonic()
    response = httpx.post(f"{paused.url}/v1/logprobs", timeout=30.0, json=_call(
        [{"input_ids": [1, 2, 3], "response_start": 1}], timeout_s=1e15))
    assert response.status_code == 504, response.text
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 5.0


def test_a_weight_version_beyond_int64_is_refused_not_waited_for(served):
    response = httpx.post(f"{served.url}/v1/logprobs", json=_call(
        [{"input_ids": [1, 2, 3], "response_start": 1, "min_weight_version": MAX_WEIGHT_VERSION + 1}]))
    assert response.status_code == 400, response.text
    assert response.json()["results"][0]["error"]["field"] == "requests[0].min_weight_version"


def test_a_body_cut_off_by_its_caller_is_not_a_server_error(served):
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/logprobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 1000\r\n\r\n{\"requests\": [")
        time.sleep(0.3)
    end = time.monotonic() + 10.0
    while "499" not in _http_statuses(served.url) and time.monotonic() < end:
        time.sleep(0.05)
    statuses = _http_statuses(served.url)
    assert "499" in statuses and "500" not in statuses


async def test_a_clients_timeout_bounds_the_whole_call_its_wait_for_a_connection_included(paused):
    import asyncio

    from clients.http_client import HttpLogProbClient
    from clients.retry import RESPONSE_GRACE_S, RetryPolicy

    timeout_s = 1.0
    client = HttpLogProbClient(paused.url, max_connections=1, retry=RetryPolicy(max_retries=0))
    try:
        async def timed_call() -> float:
            started = time.monotonic()
            with contextlib.suppress(ModelEngineError):  # answered 504, or given up on: either ends it
                await client.score([{"input_ids": [1, 2, 3], "response_start": 1}], timeout_s=timeout_s)
            return time.monotonic() - started

        # one connection: each call waits for the one before it, yet none outlives its own deadline
        took = await asyncio.gather(*(timed_call() for _ in range(8)))
        assert max(took) < timeout_s + RESPONSE_GRACE_S + 2.0, took
    finally:
        await client.close()


def test_the_blocking_clients_timeout_bounds_its_wait_for_a_connection_too():
    import threading

    from clients.http_client import SyncHttpLogProbClient
    from clients.retry import RESPONSE_GRACE_S, RetryPolicy

    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes calls and never answers
        threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in range(2)], daemon=True).start()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        timeout_s = 0.5
        took: dict[int, float] = {}
        with SyncHttpLogProbClient(url, max_connections=1, retry=RetryPolicy(max_retries=0)) as client:
            def timed_call(index: int) -> None:
                started = time.monotonic()
                with contextlib.suppress(ModelEngineError):
                    client.score([{"input_ids": [1, 2, 3], "response_start": 1}], timeout_s=timeout_s)
                took[index] = time.monotonic() - started

            first = threading.Thread(target=timed_call, args=(0,))
            first.start()
            time.sleep(0.5)  # the second call queues for the one connection the first holds
            timed_call(1)
            first.join()
        for connection in held:
            connection.close()
    # the queued call gets the connection when the first gives up, but not a fresh deadline with it
    assert took[1] < timeout_s + RESPONSE_GRACE_S + 1.0, took


def test_a_blocking_call_without_a_deadline_waits_for_its_connection(served):
    import threading

    from clients.http_client import SyncHttpLogProbClient

    answers: list[object] = []
    with SyncHttpLogProbClient(served.url, max_connections=1, timeout_s=None) as client:
        def call() -> None:
            answers.append(client.score([{"input_ids": [1, 2, 3, 4], "response_start": 1}])[0])

        callers = [threading.Thread(target=call) for _ in range(3)]  # two of them queue for the one connection
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(60)
    assert len(answers) == 3 and all(getattr(answer, "log_probs", None) is not None for answer in answers), answers


def test_a_second_ctrl_c_stops_waiting_for_the_drain(tiny_model, monkeypatch):
    """uvicorn turns a second SIGINT into `force_exit`; the drain of the service, which comes
    before uvicorn's own waits, was still waited out to its end (54 s in a review's run)."""
    import asyncio

    from model_engine_server.reference import PolicyWithReference

    async def drain_that_takes_long(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        await asyncio.sleep(60.0)

    monkeypatch.setattr(PolicyWithReference, "shutdown", drain_that_takes_long)
    service = build_local_server(EngineSpec(model_path=str(tiny_model)))
    server = ServerThread(create_app(service, owns_service=True)).__enter__()
    try:
        server.server.should_exit = True  # the first signal
        time.sleep(1.0)
        assert server.thread.is_alive()  # its drain is waited for
        server.server.force_exit = True  # what uvicorn's handler sets on the second SIGINT
        server.thread.join(10.0)
        assert not server.thread.is_alive()
    finally:
        server.thread.join(60.0)


def test_a_server_thread_stops_as_serve_does_answering_held_calls_503(tiny_model):
    import threading

    service = build_local_server(EngineSpec(model_path=str(tiny_model)))
    server = ServerThread(create_app(service, owns_service=True, admin_token=TOKEN)).__enter__()
    answers: list[httpx.Response] = []
    try:
        assert httpx.post(f"{server.url}/v1/pause", headers=ADMIN).status_code == 200
        held = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{server.url}/v1/logprobs", json=_call([{"input_ids": [1, 2, 3], "response_start": 1}]), timeout=120)))
        held.start()
        _wait_for_queue_depth(server.url, 1, within_s=30.0)
    finally:
        started = time.monotonic()
        server.__exit__(None, None, None)
    held.join(60)
    assert answers and answers[0].status_code == 503, answers
    assert answers[0].json()["error"]["code"] == "shutting_down"
    assert time.monotonic() - started < 20.0  # not uvicorn's graceful wait of 30 s, then a cut-off


@pytest.mark.parametrize("entry", [["w", ["float32"], [1], b"\0" * 4], ["w", "float32", [2**62, 2**62, 0], b""]],
                         ids=["dtype-as-list", "shape-overflowing-int64"])
def test_a_malformed_weight_body_is_a_400_naming_the_tensor(served, entry):
    from model_engine_server import codec

    response = httpx.post(f"{served.url}/v1/update_weights", headers={**ADMIN, "content-type": "application/msgpack"},
                          content=codec.encode({"version": 1, "tensors": [entry]}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "tensors[0]"


def test_the_json_client_sends_numpy_and_torch_values_as_the_msgpack_client_does(served):
    import numpy as np
    import torch

    from clients.http_client import SyncHttpLogProbClient

    request = {"input_ids": torch.tensor([1, 2, 3]), "response_start": np.int64(1), "temperature": np.float32(1.0)}
    answers = {}
    for wire in ("json", "msgpack"):
        with SyncHttpLogProbClient(served.url, wire=wire) as client:
            answers[wire] = client.compute_log_probs([dict(request)])[0].log_probs
    np.testing.assert_allclose(answers["json"], answers["msgpack"], atol=1e-6)


def test_an_admin_body_over_its_limit_is_a_413_in_the_error_envelope(served):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    response = httpx.post(f"{served.url}/v1/weights/begin", content=chunks(),
                          headers={**ADMIN, "content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
