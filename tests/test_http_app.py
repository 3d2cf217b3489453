"""The FastAPI app on a real uvicorn (127.0.0.1) over a real tiny model in the same process."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import httpx
import msgpack
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model_engine_server import codec
from model_engine_server.config import HttpConfig
from model_engine_server.engines.base import EngineSpec
from model_engine_server.http import wire
from model_engine_server.http.app import create_app
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import SchedulerConfig
from tests.helpers import random_requests, reference_log_probs, reference_model
from tests.test_http_support import ServerThread

TOKEN = "s3cret-admin-token"
DEFAULT_TEMPERATURE = 0.8
VOCAB = 512
MAX_BODY_MB = 0.05  # 52 KB
MAX_REQUESTS = 16
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(tiny_model):
    metrics = ServerMetrics()
    service = build_local_server(
        EngineSpec(model_path=str(tiny_model)),
        scheduler=SchedulerConfig(
            max_tokens_per_batch=2048, max_queued_tokens=4096, request_timeout_s=60, default_temperature=DEFAULT_TEMPERATURE
        ),
        observer=metrics.observer,
    )
    http = HttpConfig(max_body_mb=MAX_BODY_MB, max_requests_per_call=MAX_REQUESTS, retry_after_s=2.0)
    app = create_app(service, http, metrics, owns_service=True, admin_token=TOKEN)
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_model(tiny_model)


def post_json(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/logprobs", content=json.dumps(body), headers={"content-type": "application/json"}, **kwargs)


def post_msgpack(url: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/logprobs", content=codec.encode(body), headers={"content-type": "application/msgpack"})


def wire_requests(requests: list[LogProbRequest]) -> list[dict]:
    return [r.model_dump(exclude_none=True) for r in requests]


def assert_serving(url: str) -> None:
    response = post_json(url, {"requests": [{"input_ids": [3, 4, 5], "response_start": 1}]})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["log_probs"]) == 2


async def test_msgpack_and_json_give_the_in_process_results(served, tiny_model, reference):
    requests = random_requests(8, VOCAB, seed=21, max_len=200)
    as_msgpack = post_msgpack(served.url, {"requests": wire_requests(requests)})
    as_json = post_json(served.url, {"requests": wire_requests(requests)})
    assert as_msgpack.status_code == as_json.status_code == 200
    assert as_msgpack.headers["content-type"] == "application/msgpack"
    assert as_json.headers["content-type"] == "application/json"
    packed = codec.decode(as_msgpack.content)["results"]
    listed = as_json.json()["results"]
    assert isinstance(packed[0]["log_probs"], np.ndarray) and packed[0]["log_probs"].dtype == np.float32
    assert isinstance(listed[0]["log_probs"], list)

    in_process = build_local_server(EngineSpec(model_path=str(tiny_model)))
    local_results = await in_process.score(requests)
    await in_process.shutdown()
    for request, via_msgpack, via_json, local in zip(requests, packed, listed, local_results):
        assert via_msgpack["request_id"] == via_json["request_id"] == request.request_id
        expected, expected_entropy = reference_log_probs(reference, request)
        for log_probs, entropy in ((via_msgpack["log_probs"], via_msgpack["entropy"]), (via_json["log_probs"], via_json["entropy"])):
            got = torch.tensor(np.asarray(log_probs, dtype=np.float32))
            torch.testing.assert_close(got, torch.from_numpy(local.log_probs), atol=TOLERANCE, rtol=0)
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
            torch.testing.assert_close(torch.tensor(np.asarray(entropy, dtype=np.float32)), expected_entropy, atol=TOLERANCE, rtol=0)
        assert via_msgpack["weight_version"] == via_json["weight_version"] == 0


def test_request_without_temperature_uses_the_configured_default(served, reference):
    ids = list(range(10, 40))
    response = post_json(served.url, {"requests": [{"input_ids": ids, "response_start": 12}]})
    got = torch.tensor(response.json()["results"][0]["log_probs"])
    at_default, _ = reference_log_probs(reference, LogProbRequest(input_ids=ids, response_start=12, temperature=DEFAULT_TEMPERATURE))
    at_one, _ = reference_log_probs(reference, LogProbRequest(input_ids=ids, response_start=12, temperature=1.0))
    torch.testing.assert_close(got, at_default, atol=TOLERANCE, rtol=0)
    assert (got - at_one).abs().max() > 1e-3


def test_one_bad_request_fails_alone_and_names_its_index(served):
    body = {"requests": [{"input_ids": [1, 2, 3], "response_start": 1}, {"input_ids": [1, 2, VOCAB], "response_start": 1}]}
    response = post_json(served.url, body)
    assert response.status_code == 200
    good, bad = response.json()["results"]
    assert len(good["log_probs"]) == 2
    assert bad["error"]["code"] == "invalid_request" and bad["error"]["field"] == "requests[1].input_ids"
    assert "outside the vocabulary" in bad["error"]["message"]


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_parse_as_prometheus_text_and_counters_move(served):
    before = _metrics(served.url)
    requests = random_requests(5, VOCAB, seed=33, max_len=50)
    assert post_json(served.url, {"requests": wire_requests(requests)}).status_code == 200
    after = _metrics(served.url)
    ok = "model_engine_server_requests_total{code=,outcome=ok}"
    assert after[ok] - before.get(ok, 0) == 5
    assert after["model_engine_server_tokens_total"] - before["model_engine_server_tokens_total"] == sum(r.num_tokens for r in requests)
    assert after["model_engine_server_response_tokens_total"] - before["model_engine_server_response_tokens_total"] == sum(
        r.num_response_tokens for r in requests
    )
    assert after["model_engine_server_batch_size_requests_count"] > before.get("model_engine_server_batch_size_requests_count", 0)
    assert after["model_engine_server_request_latency_seconds_count"] - before.get("model_engine_server_request_latency_seconds_count", 0) == 5
    for gauge in ("queue_depth", "weight_version", "paused", "inflight_batches"):
        assert f"model_engine_server_{gauge}" in after
    assert "model_engine_server_paused_seconds_total" in after
    logprob_calls = "model_engine_server_http_requests_total{route=/v1/logprobs,status=200}"
    assert after[logprob_calls] - before.get(logprob_calls, 0) == 1


def test_status_health_and_openapi_are_served(served):
    status = httpx.get(f"{served.url}/v1/status").json()
    for key in ("weight_version", "paused", "queue_depth", "num_replicas"):
        assert key in status
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    schema = httpx.get(f"{served.url}/openapi.json").json()
    body = schema["paths"]["/v1/logprobs"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/msgpack"}
    assert "LogProbRequest" in schema["components"]["schemas"]
    assert httpx.get(f"{served.url}/docs").status_code == 200


def _ext(code: int, data: bytes) -> bytes:
    return msgpack.packb({"requests": [{"input_ids": msgpack.ExtType(code, data), "response_start": 1}]})


def _bad_dtype_array() -> bytes:
    header = msgpack.packb(["<U4", [2]])
    return _ext(1, header + b"\0" * 32)


BIG = 2**64
BAD_INPUTS = [
    # (name, method, path, body bytes, content type, headers, expected status)
    ("truncated msgpack", "POST", "/v1/logprobs", codec.encode({"requests": [{"input_ids": [1, 2, 3], "response_start": 1}]})[:-3], "application/msgpack", {}, 400),
    ("msgpack that is a list", "POST", "/v1/logprobs", msgpack.packb([1, 2, 3]), "application/msgpack", {}, 422),
    ("unknown msgpack extension", "POST", "/v1/logprobs", _ext(42, b"xx"), "application/msgpack", {}, 400),
    ("array of a disallowed dtype", "POST", "/v1/logprobs", _bad_dtype_array(), "application/msgpack", {}, 400),
    ("invalid JSON", "POST", "/v1/logprobs", b'{"requests": [', "application/json", {}, 400),
    ("JSON without requests", "POST", "/v1/logprobs", b'{"reqs": []}', "application/json", {}, 422),
    ("requests not a list", "POST", "/v1/logprobs", b'{"requests": "abc"}', "application/json", {}, 422),
    ("JSON array at top level", "POST", "/v1/logprobs", b"[1, 2]", "application/json", {}, 422),
    ("negative timeout", "POST", "/v1/logprobs", b'{"requests": [], "timeout_s": -1}', "application/json", {}, 422),
    ("ids out of vocab", "POST", "/v1/logprobs", json.dumps({"requests": [{"input_ids": [1, VOCAB + 5], "response_start": 1}]}).encode(), "application/json", {}, 400),
    ("ids beyond 64 bits", "POST", "/v1/logprobs", json.dumps({"requests": [{"input_ids": [1, BIG], "response_start": 1}]}).encode(), "application/json", {}, 400),
    ("ids of the wrong type", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": ["a", "b"], "response_start": 1}]}', "application/json", {}, 400),
    ("response_start 0", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 0}]}', "application/json", {}, 400),
    ("response_start past the end", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 3}]}', "application/json", {}, 400),
    ("temperature zero", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 1, "temperature": 0}]}', "application/json", {}, 400),
    ("temperature NaN", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 1, "temperature": NaN}]}', "application/json", {}, 400),
    ("rollout log-probs of the wrong length", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 1, "rollout_log_probs": [-1.0]}]}', "application/json", {}, 400),
    ("unknown request field", "POST", "/v1/logprobs", b'{"requests": [{"input_ids": [1, 2, 3], "response_start": 1, "prompt": "x"}]}', "application/json", {}, 400),
    ("too many requests in one call", "POST", "/v1/logprobs", json.dumps({"requests": [{"input_ids": [1, 2], "response_start": 1}] * (MAX_REQUESTS + 1)}).encode(), "application/json", {}, 422),
    ("huge body", "POST", "/v1/logprobs", b'{"requests": [' + b" " * int(MAX_BODY_MB * 2 * (1 << 20)) + b"]}", "application/json", {}, 413),
    ("unsupported content type", "POST", "/v1/logprobs", b"<requests/>", "application/xml", {}, 415),
    ("pause without a token", "POST", "/v1/pause", b"", "application/json", {}, 401),
    ("resume with a wrong token", "POST", "/v1/resume", b"", "application/json", {"authorization": "Bearer wrong"}, 401),
    ("weights without a token", "POST", "/v1/update_weights", msgpack.packb({"version": 1, "tensors": []}), "application/msgpack", {}, 401),
    ("weights as JSON", "POST", "/v1/update_weights", b"{}", "application/json", {"authorization": f"Bearer {TOKEN}"}, 415),
    ("weights body that is not an update", "POST", "/v1/update_weights", msgpack.packb({"version": "one"}), "application/msgpack", {"authorization": f"Bearer {TOKEN}"}, 400),
    ("weights with a bad dtype", "POST", "/v1/update_weights", msgpack.packb({"version": 1, "tensors": [["w", "complex64", [1], b"\0" * 8]]}), "application/msgpack", {"authorization": f"Bearer {TOKEN}"}, 400),
    ("oversized weight-sync body", "POST", "/v1/weights/begin", b'{"version": 1' + b" " * (2 << 20) + b"}", "application/json", {"authorization": f"Bearer {TOKEN}"}, 413),
    ("oversized from-disk body", "POST", "/v1/update_weights_from_disk", b'{"model_path": "x"' + b" " * (2 << 20) + b"}", "application/json", {"authorization": f"Bearer {TOKEN}"}, 413),
    ("GET on a POST route", "GET", "/v1/logprobs", b"", "application/json", {}, 405),
    ("unknown route", "GET", "/v1/nothing-here", b"", "application/json", {}, 404),
]


@pytest.mark.parametrize("name,method,path,body,content_type,headers,status", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_its_documented_4xx_and_the_server_keeps_serving(served, name, method, path, body, content_type, headers, status):
    response = httpx.request(method, f"{served.url}{path}", content=body, headers={"content-type": content_type, **headers})
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert_serving(served.url)


def test_admin_token_pauses_and_a_request_sent_while_paused_is_answered_after_resume(served):
    auth = {"authorization": f"Bearer {TOKEN}"}
    paused = httpx.post(f"{served.url}/v1/pause", headers=auth)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.setdefault("response", post_json(served.url, {"requests": [{"input_ids": [5, 6, 7], "response_start": 1}]}, timeout=60)))
    thread.start()
    deadline = 200
    while httpx.get(f"{served.url}/v1/status").json()["queue_depth"] == 0 and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    assert httpx.get(f"{served.url}/v1/status").json()["queue_depth"] == 1 and "response" not in answer
    resumed = httpx.post(f"{served.url}/v1/resume", headers=auth)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    thread.join(timeout=60)
    assert answer["response"].status_code == 200


def test_a_request_refused_for_overload_in_an_answered_call_carries_the_configured_hint(served):
    auth = {"authorization": f"Bearer {TOKEN}"}
    httpx.post(f"{served.url}/v1/pause", headers=auth)
    filler = {"requests": [{"input_ids": list(range(1, 401)), "response_start": 1}] * 10}  # 4000 of 4096 queued tokens
    answers: list[httpx.Response] = []
    calls = [threading.Thread(target=lambda: post_json(served.url, filler, timeout=60)),
             threading.Thread(target=lambda: answers.append(post_json(served.url, {"requests": [
                 {"input_ids": list(range(1, 51)), "response_start": 1},  # fits: queued
                 {"input_ids": list(range(1, 201)), "response_start": 1},  # does not: refused
             ]}, timeout=60)))]
    try:
        calls[0].start()
        for _ in range(200):
            if httpx.get(f"{served.url}/v1/status").json()["queued_tokens"] == 4000:
                break
            threading.Event().wait(0.05)
        calls[1].start()
        for _ in range(200):
            if httpx.get(f"{served.url}/v1/status").json()["queued_tokens"] == 4050:
                break
            threading.Event().wait(0.05)
    finally:
        httpx.post(f"{served.url}/v1/resume", headers=auth)
        for call in calls:
            call.join(timeout=60)
    [answer] = answers
    assert answer.status_code == 200
    served_entry, refused = answer.json()["results"]
    assert "log_probs" in served_entry
    assert refused["error"]["code"] == "overloaded" and refused["error"]["retry_after_s"] == 2.0


def test_a_call_refused_for_overload_is_429_with_retry_after(served):
    auth = {"authorization": f"Bearer {TOKEN}"}
    httpx.post(f"{served.url}/v1/pause", headers=auth)
    filler = {"requests": [{"input_ids": list(range(1, 401)), "response_start": 1}] * 10}  # 4000 of 4096 queued tokens
    thread = threading.Thread(target=post_json, args=(served.url, filler), kwargs={"timeout": 60})
    thread.start()
    try:
        for _ in range(200):
            if httpx.get(f"{served.url}/v1/status").json()["queued_tokens"] == 4000:
                break
            threading.Event().wait(0.05)
        refused = post_json(served.url, {"requests": [{"input_ids": list(range(1, 201)), "response_start": 1}]})
        assert refused.status_code == 429
        assert float(refused.headers["retry-after"]) == 2  # the configured http.retry_after_s
        assert refused.json()["error"]["code"] == "overloaded"
    finally:
        httpx.post(f"{served.url}/v1/resume", headers=auth)
        thread.join(timeout=60)
    assert_serving(served.url)


@pytest.mark.parametrize("temperature", [1e-300, 1e-39, 1e7])
def test_a_temperature_outside_the_scoring_range_is_a_400_naming_it(served, temperature):
    # 1e-300 and 1e-39 once came back 200 with NaN log-probs: 1/T is no finite float32
    response = post_json(served.url, {"requests": [{"input_ids": [1, 2, 3, 4], "response_start": 1, "temperature": temperature}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"].endswith("temperature") and "between 1e-06 and 1e+06" in error["message"]


def test_non_finite_values_are_sent_as_null_in_json_and_exactly_in_msgpack():
    result = {"log_probs": np.array([-1.5, np.nan, -np.inf], dtype=np.float32), "top_k": np.array([[0.5, np.inf]]), "x": math.nan}
    decoded = json.loads(wire.encode_body(result, as_msgpack=False))
    assert decoded == {"log_probs": [-1.5, None, None], "top_k": [[0.5, None]], "x": None}
    exact = codec.decode(wire.encode_body(result, as_msgpack=True))
    assert np.isnan(exact["log_probs"][1]) and exact["log_probs"][2] == -np.inf


def test_concurrent_calls_are_batched_and_all_answered(served):
    requests = random_requests(12, VOCAB, seed=44, max_len=100)

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(
                client.post(f"{served.url}/v1/logprobs", json={"requests": wire_requests([r])}) for r in requests
            ))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(requests)
    assert [r.json()["results"][0]["request_id"] for r in responses] == [r.request_id for r in requests]
