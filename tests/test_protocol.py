"""Request validation messages and the msgpack codec."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from model_engine_server import codec
from model_engine_server.errors import InvalidRequest
from model_engine_server.protocol import LogProbRequest, LogProbResult, MismatchStats, RequestLimits, check_against_limits

LIMITS = RequestLimits(vocab_size=100, max_seq_len=50, max_tokens_per_batch=40)


@pytest.mark.parametrize(
    "payload, field, words",
    [
        ({"input_ids": [], "response_start": 1}, "input_ids", "empty"),
        ({"input_ids": [5], "response_start": 1}, "input_ids", "at least 2"),
        ({"input_ids": [1, 2, 3], "response_start": 0}, "response_start", ">= 1"),
        ({"input_ids": [1, 2, 3], "response_start": 3}, "response_start", "< len"),
        ({"input_ids": [1, 2, 3], "response_start": 1, "temperature": 0.0}, "temperature", "between 1e-06 and 1e+06"),
        ({"input_ids": [1, 2, 3], "response_start": 1, "temperature": -1}, "temperature", "between 1e-06 and 1e+06"),
        ({"input_ids": [1, 2, 3], "response_start": 1, "temperature": math.nan}, "temperature", "between 1e-06 and 1e+06"),
        ({"input_ids": [1, 2, 3], "response_start": 1, "temperature": math.inf}, "temperature", "between 1e-06 and 1e+06"),
        ({"input_ids": [1, 2, 3], "response_start": 1, "rollout_log_probs": [0.1]}, "rollout_log_probs", "one value per"),
        ({"input_ids": "abc", "response_start": 1}, "input_ids", "list"),
        ({"input_ids": [1, 2], "response_start": 1, "surprise": 1}, "surprise", "not permitted"),
        ({"response_start": 1}, "input_ids", "required"),
    ],
)
def test_invalid_request_names_the_field(payload, field, words):
    with pytest.raises(InvalidRequest) as caught:
        LogProbRequest.parse(payload)
    assert caught.value.field == field
    assert words in caught.value.message
    assert caught.value.message.startswith(field)


@pytest.mark.parametrize(
    "ids, words",
    [([1, 100], "outside the vocabulary"), ([-1, 2], "outside the vocabulary"), (list(range(45)), "token budget")],
)
def test_limits_are_checked_with_a_readable_message(ids, words):
    with pytest.raises(InvalidRequest, match=words):
        check_against_limits(LogProbRequest(input_ids=ids, response_start=1), LIMITS)


def test_longer_than_max_seq_len_is_refused():
    limits = RequestLimits(vocab_size=100, max_seq_len=10, max_tokens_per_batch=40)
    with pytest.raises(InvalidRequest, match="maximum length 10"):
        check_against_limits(LogProbRequest(input_ids=list(range(11)), response_start=1), limits)


def test_request_accepts_numpy_arrays():
    request = LogProbRequest.parse({"input_ids": np.arange(5, dtype=np.int32), "response_start": 2})
    assert request.input_ids == [0, 1, 2, 3, 4] and request.num_response_tokens == 3


def test_codec_sends_arrays_as_raw_bytes_and_round_trips():
    log_probs = np.linspace(-3, 0, 1000, dtype=np.float32)
    data = codec.encode({"log_probs": log_probs, "n": 3})
    assert len(data) < 1000 * 4 + 64  # raw float32, not a list of msgpack floats (9 bytes each)
    decoded = codec.decode(data)
    assert decoded["n"] == 3 and decoded["log_probs"].dtype == np.float32
    np.testing.assert_array_equal(decoded["log_probs"], log_probs)


def test_result_round_trips_through_the_codec():
    result = LogProbResult("a", np.array([-1.5, -0.25], dtype=np.float32), 3, entropy=np.array([1.0, 2.0], np.float32),
                           mismatch=MismatchStats(0.1, 0.2, 0.01), timings={"total_ms": 1.0})
    back = LogProbResult.from_wire(codec.decode(codec.encode(result.to_wire())))
    assert back.weight_version == 3 and back.mismatch == result.mismatch
    np.testing.assert_array_equal(back.log_probs, result.log_probs)
    np.testing.assert_array_equal(back.entropy, result.entropy)


@pytest.mark.parametrize(
    "data",
    [
        codec.encode({"a": np.arange(10)})[:-3],  # truncated
        b"\xc1",  # reserved byte
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["|O", [1]]) + b"x")),  # object dtype
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<f4", [10]]) + b"1234")),  # size mismatch
        msgpack.packb(msgpack.ExtType(42, b"")),  # unknown extension
    ],
)
def test_malformed_msgpack_is_an_invalid_request(data):
    with pytest.raises(InvalidRequest) as caught:
        codec.decode(data)
    assert caught.value.field == "body"


def test_oversized_body_is_refused_before_parsing():
    with pytest.raises(InvalidRequest, match="exceeds the limit"):
        codec.decode(b"\x00" * 100, max_bytes=10)


@pytest.mark.parametrize("value", [float("-inf"), float("inf"), float("nan")])
def test_non_finite_rollout_log_probs_are_refused_naming_the_position(value):
    with pytest.raises(ValidationError, match="rollout_log_probs must be finite.* at response position 1"):
        LogProbRequest(input_ids=[1, 2, 3, 4], response_start=2, rollout_log_probs=[-0.5, value])


def test_the_agent_loop_scores_a_sample_whose_rollout_log_probs_are_not_finite_without_them():
    from clients.agent_loop import build_request

    request = build_request([1, 2], [3, 4], 1.0, rollout_log_probs=[-0.5, float("-inf")])
    assert request.rollout_log_probs is None and request.num_response_tokens == 2
    assert build_request([1, 2], [3, 4], 1.0, rollout_log_probs=[-0.5, -1.0]).rollout_log_probs == [-0.5, -1.0]
