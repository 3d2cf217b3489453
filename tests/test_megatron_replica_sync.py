"""Issue 6's end-to-end check: a TP=2 Megatron replica on Ray takes a weight update through
`checkpoint_transport` and then scores exactly like a fresh TP=2 replica loaded from those weights."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from checkpoint_transport import TransportConfig
from clients.publisher import WeightPublisher
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.protocol import LogProbResult
from model_engine_server.tiny_model import perturbed_weights
from replica.manager import ReplicaManager
from tests.helpers import random_requests, reference_model
from tests.test_replica import assert_nothing_left, replica_config

pytest.importorskip("megatron.core")
pytest.importorskip("mbridge")

DEADLINE_S = 240.0


async def score_one_at_a_time(manager: ReplicaManager, requests) -> list[LogProbResult]:
    """Alone in its batch, a request's scores do not depend on its neighbours: exact comparisons."""
    results = []
    for request in requests:
        [outcome] = await asyncio.wait_for(manager.score([request]), DEADLINE_S)
        assert isinstance(outcome, LogProbResult), outcome
        results.append(outcome)
    return results


async def test_transport_update_into_tp2_replica_equals_fresh_tp2_load(ray_cluster, tiny_models, tmp_path):
    source = tiny_models["qwen2_untied"]
    new_weights = perturbed_weights(dict(build_engine("hf", EngineSpec(model_path=str(source))).export_weights()), seed=21, scale=0.05)
    updated_dir = tmp_path / "updated"
    fresh = reference_model(source)
    fresh.load_state_dict({**fresh.state_dict(), **new_weights}, strict=True)
    fresh.save_pretrained(updated_dir)
    requests = random_requests(5, 512, seed=41, max_len=250)

    def tp2(path):
        return replica_config(path, backend="megatron", gpus_per_replica_node=2, tensor_model_parallel_size=2)

    manager = await ReplicaManager(tp2(source)).start()
    try:
        before = await score_one_at_a_time(manager, requests)
        publisher = WeightPublisher(manager, TransportConfig(backend="gloo", timeout_s=120.0, bucket_bytes=1 << 20))
        try:
            report = await asyncio.wait_for(publisher.update_weights(new_weights, version=1), DEADLINE_S)
        finally:
            await publisher.close()
        assert report.ok and len(report.receives) == 2, report.error
        updated = await score_one_at_a_time(manager, requests)
    finally:
        await manager.shutdown()

    manager = await ReplicaManager(tp2(updated_dir)).start()
    try:
        reloaded = await score_one_at_a_time(manager, requests)
    finally:
        await manager.shutdown()
    await assert_nothing_left()

    for old, new, expected in zip(before, updated, reloaded):
        assert new.weight_version == 1 and expected.weight_version == 0
        np.testing.assert_array_equal(new.log_probs, expected.log_probs)
        np.testing.assert_array_equal(new.entropy, expected.entropy)
        assert np.abs(old.log_probs - new.log_probs).max() > 1e-3  # the update changed the scores
