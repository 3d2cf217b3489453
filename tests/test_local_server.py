"""The scheduler over a real HF engine in this process: the path `serve` takes on one device."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import InvalidRequest, WeightSyncError
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.service import LogProbService
from model_engine_server.tiny_model import perturbed_weights
from tests.helpers import random_requests, reference_log_probs, reference_model

TOLERANCE = 1e-5


async def test_concurrent_requests_equal_reference(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(max_tokens_per_batch=1024))
    assert isinstance(server, LogProbService)
    requests = random_requests(12, 512, seed=3, max_len=300)
    results = await asyncio.gather(*(server.submit(r) for r in requests))
    reference = reference_model(tiny_model)
    for request, result in zip(requests, results):
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(result.entropy), expected_entropy, atol=TOLERANCE, rtol=0)
        assert result.weight_version == 0
    assert server.status()["batches_total"] < len(requests)  # concurrent requests were batched together
    await server.shutdown()


async def test_update_weights_equals_fresh_engine_of_new_weights(tiny_model, tmp_path):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)))
    engine = server.executor.adapter.engine
    new_weights = perturbed_weights(dict(engine.export_weights()), seed=11, scale=0.05)
    assert await server.update_weights(new_weights.items(), version=1) == 1

    # an independent checkpoint of the new weights, loaded from disk by plain transformers
    fresh = reference_model(tiny_model)
    fresh.load_state_dict({**fresh.state_dict(), **new_weights}, strict=True)
    fresh_dir = tmp_path / "fresh"
    fresh.save_pretrained(fresh_dir)
    reference = reference_model(fresh_dir)

    requests = random_requests(6, 512, seed=5)
    results = await server.score(requests)
    for request, result in zip(requests, results):
        assert result.weight_version == 1
        expected, _ = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs), expected, atol=TOLERANCE, rtol=0)
    await server.shutdown()


async def test_failed_sync_keeps_version_and_refuses_until_complete(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=30))
    weights = dict(server.executor.adapter.engine.export_weights())
    partial = list(weights.items())[:-1]
    with pytest.raises(WeightSyncError, match="missing"):
        await server.update_weights(partial, version=1)
    status = server.status()
    assert status["weight_version"] == 0 and status["weights_incomplete"]

    request = random_requests(1, 512, seed=9)[0]
    waiting = asyncio.ensure_future(server.submit(request))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "a request was scored on incomplete weights"
    assert await server.update_weights(weights.items(), version=2) == 2
    assert (await waiting).weight_version == 2
    await server.shutdown()


async def test_out_of_vocab_request_fails_alone(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)))
    good = random_requests(2, 512, seed=1)
    bad = {"input_ids": [1, 2, 512], "response_start": 1}
    outcomes = await server.score([good[0], bad, good[1]])
    assert isinstance(outcomes[1], InvalidRequest) and "input_ids" in str(outcomes[1])
    assert all(hasattr(o, "log_probs") for o in (outcomes[0], outcomes[2]))
    await server.shutdown()
