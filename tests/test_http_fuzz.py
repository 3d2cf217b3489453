"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis): valid and
invalid bodies, JSON and msgpack, on every route; no answer may be a 5xx.

Two fields are tamed before sending, because their 5xx is the documented answer to a *valid*
request and is tested on its own elsewhere: `timeout_s` (a deadline that has passed is 504)
and `min_weight_version` (waiting for a version that never comes ends in a 504 deadline).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from model_engine_server import codec
from model_engine_server.config import HttpConfig
from model_engine_server.engines.base import EngineSpec
from model_engine_server.http.app import create_app
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from tests.test_http_support import ServerThread

SCORING_EXAMPLES = 40  # per mode and media type of POST /v1/logprobs (and of POST /v1/completions)
OTHER_EXAMPLES = 8  # per mode, for each of the other operations (few inputs to vary)


def _msgpack_safe(value: object) -> object:
    """msgpack has no integers beyond 64 bits: send those as floats (still invalid as ids)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, dict):
        return {key: _msgpack_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_msgpack_safe(item) for item in value]
    return value


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx, value):  # schemathesis' serializer hook: generated bodies as msgpack
    return codec.encode(_msgpack_safe(value))


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model):
    metrics = ServerMetrics()
    service = build_local_server(
        EngineSpec(model_path=str(tiny_model)),
        scheduler=SchedulerConfig(max_tokens_per_batch=4096, request_timeout_s=30),
        observer=metrics.observer,
    )
    # an admin token the fuzzer does not know: it cannot pause the server it is fuzzing
    app = create_app(service, HttpConfig(max_body_mb=1.0), metrics, owns_service=True, admin_token="not-for-fuzzers")
    with ServerThread(app) as server:
        yield server


def _tame_deadlines(body: object) -> None:
    if not isinstance(body, dict):
        return
    timeout = body.get("timeout_s")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < 30:
        body["timeout_s"] = 30
    requests = body.get("requests")
    for request in requests if isinstance(requests, list) else []:
        if isinstance(request, dict) and isinstance(request.get("min_weight_version"), int):
            request["min_weight_version"] = 0


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_makes_the_server_answer_5xx(fuzzed_server, mode):
    operations = _operations(fuzzed_server.url)
    calls: list[tuple[int, str]] = []
    assert {op.path for op in operations} >= {"/v1/logprobs", "/v1/completions", "/v1/models", "/v1/pause",
                                              "/v1/update_weights", "/v1/status"}
    for operation in operations:
        media_types = [None]
        if operation.path in ("/v1/logprobs", "/v1/completions") and operation.method.upper() == "POST":
            media_types = ["application/json", "application/msgpack"]
        for media_type in media_types:

            examples = SCORING_EXAMPLES if operation.path in ("/v1/logprobs", "/v1/completions") else OTHER_EXAMPLES

            @given(case=operation.as_strategy(mode, media_type=media_type))
            @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                _tame_deadlines(case.body)
                response = case.call(base_url=fuzzed_server.url, timeout=60)
                calls.append((response.status_code, case.path))
                assert response.status_code < 500, (
                    f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
                )

            try:
                fuzz()
            except Unsatisfiable:  # no invalid input exists for a route without parameters or body
                assert mode is GenerationMode.NEGATIVE and operation.path != "/v1/logprobs"
    statuses = {status for status, _ in calls}
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses, statuses  # routes were exercised, not only refused
    assert statuses & {400, 401, 415, 422}, statuses


@st.composite
def valid_requests(draw: st.DrawFn) -> dict:
    ids = draw(st.lists(st.integers(0, 511), min_size=2, max_size=300))
    request = {"input_ids": ids, "response_start": draw(st.integers(1, len(ids) - 1))}
    if draw(st.booleans()):
        request["temperature"] = draw(st.floats(0.05, 5.0))
    if draw(st.booleans()):
        request["return_entropy"] = True
    if draw(st.booleans()):
        request["rollout_log_probs"] = draw(st.lists(st.floats(-30, 0), min_size=len(ids) - request["response_start"],
                                                     max_size=len(ids) - request["response_start"]))
    return request


@given(requests=st.lists(valid_requests(), min_size=1, max_size=6), as_msgpack=st.booleans())
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_valid_call_is_answered_with_one_finite_result_per_response_token(fuzzed_server, requests, as_msgpack):
    body = {"requests": requests}
    if as_msgpack:
        response = httpx.post(f"{fuzzed_server.url}/v1/logprobs", content=codec.encode(body),
                              headers={"content-type": "application/msgpack"}, timeout=60)
        results = codec.decode(response.content)["results"] if response.status_code == 200 else None
    else:
        response = httpx.post(f"{fuzzed_server.url}/v1/logprobs", json=body, timeout=60)
        results = response.json()["results"] if response.status_code == 200 else None
    assert response.status_code == 200, response.text
    for request, result in zip(requests, results):
        expected = len(request["input_ids"]) - request["response_start"]
        assert len(result["log_probs"]) == expected
        assert all(value is not None and value <= 1e-6 for value in list(result["log_probs"]))
        assert (result["entropy"] is not None) == bool(request.get("return_entropy"))
        assert (result["mismatch"] is not None) == ("rollout_log_probs" in request)
