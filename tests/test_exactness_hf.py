"""Log-probs and entropy of the packed, chunked server path against plain transformers.

Tolerance: 1e-5 absolute, fp32 (measured differences are around 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.packing import PackedBatch, pack_sequences
from tests.helpers import random_requests, reference_log_probs, reference_model

TOLERANCE = 1e-5


@pytest.mark.parametrize("checkpoint", ["qwen2_tied", "llama_untied", "qwen3_tied"])
def test_packed_log_probs_and_entropy_equal_plain_transformers(tiny_models, checkpoint):
    path = tiny_models[checkpoint]
    engine = build_engine("hf", EngineSpec(model_path=str(path)))
    # a small chunk so several chunks and micro-batches are exercised
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=2048, logprob_chunk_mb=1)
    assert adapter.chunk_tokens < 1000
    requests = random_requests(30, engine.info.vocab_size, seed=hash(checkpoint) % 1000)
    outputs = adapter.score(requests)
    reference = reference_model(path)
    for request, output in zip(requests, outputs):
        expected_log_probs, expected_entropy = reference_log_probs(reference, request)
        assert output.log_probs.shape == (request.num_response_tokens,)
        torch.testing.assert_close(torch.from_numpy(output.log_probs), expected_log_probs, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(output.entropy), expected_entropy, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
def test_packed_sequences_do_not_attend_to_each_other(tiny_model, attention):
    """Scores of a sequence must not depend on what is packed before it (our per-sequence
    attention, and transformers' block-diagonal mask from reset position ids)."""
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model), attn_implementation=attention))
    requests = random_requests(3, engine.info.vocab_size, seed=7, min_len=40, max_len=60)
    batch = pack_sequences([r.input_ids for r in requests], [r.response_start for r in requests])
    temperatures = torch.ones(batch.targets.shape[0])
    packed, _ = engine.score_packed(batch, temperatures, False, None)
    alone = [
        engine.score_packed(pack_sequences([r.input_ids], [r.response_start]), torch.ones(r.num_response_tokens), False, None)[0]
        for r in requests
    ]
    per_sequence = packed.tensor_split(batch.score_offsets[1:-1])
    for k, expected in enumerate(alone):
        torch.testing.assert_close(per_sequence[k], expected, atol=TOLERANCE, rtol=0)

    # The same comparison has the power to catch leakage: boundaries and positions that run on
    # across sequences make later sequences see earlier ones, and the scores move far beyond tolerance.
    leaky = PackedBatch(
        input_ids=batch.input_ids,
        position_ids=torch.arange(batch.num_tokens).unsqueeze(0),
        cu_seqlens=torch.tensor([0, batch.num_tokens], dtype=torch.int32),
        score_positions=batch.score_positions,
        targets=batch.targets,
        score_offsets=batch.score_offsets,
    )
    leaked, _ = engine.score_packed(leaky, temperatures, False, None)
    assert (leaked.tensor_split(batch.score_offsets[1:-1])[2] - alone[2]).abs().max() > 100 * TOLERANCE


def test_bf16_engine_is_close_to_fp32(tiny_model):
    fp32 = ModelEngineServerAdapter(build_engine("hf", EngineSpec(model_path=str(tiny_model))))
    bf16 = ModelEngineServerAdapter(build_engine("hf", EngineSpec(model_path=str(tiny_model), dtype="bfloat16")))
    requests = random_requests(4, 512, seed=3, max_len=100)
    for a, b in zip(fp32.score(requests), bf16.score(requests)):
        assert a.log_probs.dtype == b.log_probs.dtype
        assert abs(a.log_probs - b.log_probs).max() < 0.1
