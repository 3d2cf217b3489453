"""Bounds a request or a config can break, refused with a reason naming the field instead of
an engine error, a NaN answer or a refusal that no retry can cure."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_engine_server.errors import InvalidRequest
from model_engine_server.http.completions_schema import parse_completions_body
from model_engine_server.protocol import LogProbRequest
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.temperature import MAX_TEMPERATURE, MIN_TEMPERATURE
from tests.fakes import FakeExecutor


@pytest.mark.parametrize("token", [2**63, -(2**63) - 1, 2**70])
async def test_a_token_id_beyond_64_bits_is_an_invalid_request_not_a_worker_failure(token):
    server = ModelEngineServer(FakeExecutor(), SchedulerConfig())
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as refused:
        await server.submit({"input_ids": [1, 2, token], "response_start": 1})
    assert refused.value.field == "input_ids"
    [outcome] = await server.score([{"input_ids": [1, token], "response_start": 1}])
    assert isinstance(outcome, InvalidRequest)
    assert server.status()["rejected_total"] == 2
    await server.shutdown()


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-46, 1e-38, MIN_TEMPERATURE / 2, MAX_TEMPERATURE * 2, float("inf"), float("nan")])
def test_a_temperature_outside_the_range_is_refused_naming_it(temperature):
    with pytest.raises(InvalidRequest, match="between") as refused:
        LogProbRequest.parse({"input_ids": [1, 2], "response_start": 1, "temperature": temperature})
    assert refused.value.field == "temperature"


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.6, 1.0, MAX_TEMPERATURE])
def test_temperatures_inside_the_range_are_accepted(temperature):
    assert LogProbRequest.parse({"input_ids": [1, 2], "response_start": 1, "temperature": temperature}).temperature == temperature


def test_the_configured_default_temperature_has_the_same_range():
    with pytest.raises(ValidationError, match="default_temperature"):
        SchedulerConfig(default_temperature=1e-9)
    assert SchedulerConfig(default_temperature=MIN_TEMPERATURE).default_temperature == MIN_TEMPERATURE


def test_completions_take_zero_or_a_scoring_temperature():
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 0, "echo": True, "logprobs": 1}
    assert parse_completions_body({**body, "temperature": 0}).temperature == 0
    with pytest.raises(InvalidRequest, match="between") as refused:
        parse_completions_body({**body, "temperature": 1e-9})
    assert refused.value.field == "temperature"


def test_a_queue_smaller_than_one_batch_is_a_config_error():
    with pytest.raises(ValidationError, match="max_queued_tokens=1000 must be at least max_tokens_per_batch=2048"):
        SchedulerConfig(max_tokens_per_batch=2048, max_queued_tokens=1000)
    assert SchedulerConfig(max_tokens_per_batch=2048, max_queued_tokens=2048).max_queued_tokens == 2048


async def test_a_weight_version_past_int64_is_refused_everywhere_it_can_enter():
    """Once accepted: version 2**64 then broke every msgpack answer (it cannot encode it), and
    no smaller version could follow it."""
    from model_engine_server import codec
    from model_engine_server.errors import WeightSyncError
    from model_engine_server.http.schemas import UpdateFromDiskBody
    from model_engine_server.http.wire import decode_weights
    from model_engine_server.weight_session import MAX_WEIGHT_VERSION

    server = ModelEngineServer(FakeExecutor(), SchedulerConfig())
    with pytest.raises(WeightSyncError, match="weight versions stop at"):
        await server.begin_weight_update(MAX_WEIGHT_VERSION + 1)
    assert server.weights.version == 0 and not server.weights.updating
    with pytest.raises(ValidationError, match="weight_version"):
        UpdateFromDiskBody(model_path="/m", weight_version=2**64)
    with pytest.raises(InvalidRequest, match="version") as refused:
        decode_weights(codec.encode({"version": 2**63, "tensors": []}))
    assert refused.value.field == "version"
    await server.shutdown()


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [2**63, 0], [-1, 4]])
def test_a_weight_shape_torch_cannot_hold_is_an_invalid_request_not_a_500(shape):
    from model_engine_server import codec
    from model_engine_server.http.wire import decode_weights

    with pytest.raises(InvalidRequest, match="bad shape") as refused:
        decode_weights(codec.encode({"version": 1, "tensors": [["w", "float32", shape, b""]]}))
    assert refused.value.field == "tensors[0]"
