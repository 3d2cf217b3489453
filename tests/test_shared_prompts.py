"""Shared prompts: the samples of one GRPO group are packed with one copy of their prompt.

Checked against plain transformers (each sequence alone, full vocab, 1e-5 fp32) on groups of
varied size and length mixed with unshared requests, under a budget that cuts a group. A
mis-built layout (a response that does not see its prompt) is shown to fail the same check.
"""

from __future__ import annotations

import random

import pytest
import torch

from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.packing import (
    MIN_SHARED_PROMPT_TOKENS, pack_sequences, prompt_groups, prompt_key, split_shared_by_token_budget,
)
from model_engine_server.protocol import LogProbRequest
from tests.helpers import random_requests, reference_log_probs, reference_model

TOLERANCE = 1e-5


def grpo_requests(groups: int, vocab_size: int, seed: int) -> list[LogProbRequest]:
    """`groups` prompts, each with several sampled responses (some of one token), interleaved
    with unshared requests, in a shuffled order as a fully-async rollout would finish them."""
    rng = random.Random(seed)
    requests = random_requests(4, vocab_size, seed=seed + 1, min_len=3, max_len=80)
    for group in range(groups):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(MIN_SHARED_PROMPT_TOKENS, 90))]
        for sample in range(rng.randint(2, 5)):
            response = [rng.randrange(vocab_size) for _ in range(rng.choice([1, rng.randint(2, 120)]))]
            requests.append(LogProbRequest(
                request_id=f"g{group}-{sample}", input_ids=prompt + response, response_start=len(prompt),
                temperature=rng.choice([0.7, 1.0]), return_entropy=True,
            ))
    rng.shuffle(requests)
    return requests


def test_packing_puts_each_prompt_in_the_row_once():
    prompt = list(range(100, 116))
    assert len(prompt) >= MIN_SHARED_PROMPT_TOKENS
    sequences = [prompt + [1, 2], [9, 8, 3], prompt + [4], prompt + [3, 3, 3]]
    starts = [16, 1, 16, 16]
    assert prompt_groups(sequences, starts) == [[0, 2, 3], [1]]
    batch = pack_sequences(sequences, starts, share_prompts=True)
    # the prompt, tails [1] and [3, 3] (the one-token response has no tail), then [9, 8] whole
    assert batch.input_ids[0].tolist() == prompt + [1, 3, 3, 9, 8]
    assert batch.position_ids[0].tolist() == [*range(16), 16, 16, 17, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 16, 17, 19, 21]
    assert batch.segment_prefixes == [-1, 0, 0, -1]
    # scores stay in request order; each member's first score is the prompt's last position
    assert batch.score_offsets == [0, 2, 4, 5, 8]
    assert batch.score_positions.tolist() == [15, 16, 19, 20, 15, 15, 17, 18]
    assert batch.targets.tolist() == [1, 2, 8, 3, 4, 3, 3, 3]
    unshared = pack_sequences(sequences, starts)
    assert not unshared.shares_prompts and unshared.num_tokens == 17 + 2 + 16 + 18


def test_prompts_too_short_to_pay_off_are_not_shared():
    sequences = [[5, 6, 7, 1], [5, 6, 7, 2]]
    assert prompt_groups(sequences, [3, 3]) == [[0], [1]]
    assert not pack_sequences(sequences, [3, 3], share_prompts=True).shares_prompts
    assert prompt_key(sequences[0], 3) is None
    long_prompt = list(range(20))
    assert prompt_key(long_prompt + [1], 20) == prompt_key(long_prompt + [2, 3], 20) != prompt_key(long_prompt + [1], 19)


def test_budget_counts_a_prompt_once_and_cuts_only_groups_that_do_not_fit():
    prompt = list(range(20))
    sequences = [prompt + [1] * 5 for _ in range(4)] + [[1] * 12]
    starts = [20] * 4 + [6]
    # the group costs 20 + 4 * 5 = 40: it fits a 40-token budget whole, the other sequence apart
    assert split_shared_by_token_budget(sequences, starts, 40) == [[0, 1, 2, 3], [4]]
    # with 34 tokens it is cut into runs that each pay the prompt: 20 + 5 + 5, twice
    assert split_shared_by_token_budget(sequences, starts, 34) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("checkpoint", ["qwen2_tied", "llama_untied", "qwen3_tied"])
def test_shared_prompts_equal_plain_transformers(tiny_models, checkpoint):
    path = tiny_models[checkpoint]
    engine = build_engine("hf", EngineSpec(model_path=str(path)))
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=220, logprob_chunk_mb=1)
    assert adapter.share_prompts
    requests = grpo_requests(6, engine.info.vocab_size, seed=sorted(tiny_models).index(checkpoint))
    batches = adapter.micro_batches(requests)
    packed = [pack_sequences([requests[i].input_ids for i in b], [requests[i].response_start for i in b], True)
              for b in batches]
    assert any(batch.shares_prompts for batch in packed)
    # some group is cut across micro-batches (each part pays the prompt again)
    batch_of = {requests[i].request_id: k for k, b in enumerate(batches) for i in b}
    spans = {}
    for request_id, k in batch_of.items():
        spans.setdefault(request_id.split("-")[0], set()).add(k)
    assert any(len(ks) > 1 for group, ks in spans.items() if group.startswith("g"))
    outcomes = adapter.score(requests)
    reference = reference_model(path)
    for request, outcome in zip(requests, outcomes, strict=True):
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(outcome.log_probs), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(outcome.entropy), expected_entropy, atol=TOLERANCE, rtol=0)


def test_a_response_that_does_not_see_its_prompt_is_caught(tiny_model):
    """The check above can fail: the same row with the prompt links removed scores each
    response as if it had no prompt, far outside the tolerance."""
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model)))
    rng = random.Random(3)
    prompt = [rng.randrange(engine.info.vocab_size) for _ in range(30)]
    requests = [LogProbRequest(input_ids=prompt + [rng.randrange(engine.info.vocab_size) for _ in range(n)],
                               response_start=30, temperature=1.0) for n in (10, 25, 50)]
    batch = pack_sequences([r.input_ids for r in requests], [r.response_start for r in requests], True)
    temperatures = torch.ones(batch.targets.shape[0])
    shared, _ = engine.score_packed(batch, temperatures, False, None)
    batch.segment_prefixes = [-1] * len(batch.segment_prefixes)  # type: ignore[operator]
    cut_off, _ = engine.score_packed(batch, temperatures, False, None)
    reference = reference_model(tiny_model)
    expected = torch.cat([reference_log_probs(reference, r.model_copy(update={"temperature": 1.0}))[0] for r in requests])
    torch.testing.assert_close(shared, expected, atol=TOLERANCE, rtol=0)
    first_scores = torch.tensor(batch.score_offsets[:-1])
    later = torch.ones(len(expected), dtype=torch.bool)
    later[first_scores] = False  # the first score reads the prompt's own last position either way
    assert (cut_off[later] - expected[later]).abs().max() > 100 * TOLERANCE


def test_engines_without_prefix_attention_get_whole_sequences(tiny_model):
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model), attn_implementation="sdpa"))
    assert not engine.info.shares_prompts and not ModelEngineServerAdapter(engine).share_prompts
    switched_off = build_engine("hf", EngineSpec(model_path=str(tiny_model), share_prompts=False))
    assert not switched_off.info.shares_prompts and not ModelEngineServerAdapter(switched_off).share_prompts
    requests = grpo_requests(2, engine.info.vocab_size, seed=5)
    batch = pack_sequences([r.input_ids for r in requests], [r.response_start for r in requests], True)
    with pytest.raises(ValueError, match="cannot score shared prompts"):
        engine.score_packed(batch, torch.ones(batch.targets.shape[0]), False, None)


async def test_the_local_server_batches_a_group_by_its_shared_cost_and_stays_exact(tiny_model):
    """Scheduler, executor thread and engine together: the group's samples fill a batch counted
    with their prompt once (they would need several batches counted whole), and every answer
    equals transformers."""
    from model_engine_server.local import build_local_server
    from model_engine_server.protocol import LogProbResult
    from model_engine_server.scheduler import SchedulerConfig

    server = build_local_server(EngineSpec(model_path=str(tiny_model)),
                                scheduler=SchedulerConfig(max_tokens_per_batch=400, max_wait_ms=50))
    rng = random.Random(11)
    prompt = [rng.randrange(500) for _ in range(200)]
    group = [LogProbRequest(request_id=f"s{k}", input_ids=prompt + [rng.randrange(500) for _ in range(30)],
                            response_start=200, temperature=1.0, return_entropy=True) for k in range(6)]
    assert sum(r.num_tokens for r in group) > 3 * 400  # whole, at least four batches
    try:
        results = await server.score(group)
        batches = server.counters["batches"]
    finally:
        await server.shutdown()
    assert all(isinstance(r, LogProbResult) for r in results)
    assert batches == 1
    reference = reference_model(tiny_model)
    for request, result in zip(group, results):
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs.copy()), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(result.entropy.copy()), expected_entropy, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("response_len", [5, 40])  # shorter than the prompt (masked) and longer (recomputed rows)
def test_a_continuation_attends_exactly_as_its_whole_sequence(response_len):
    from model_engine_server.engines.packed_attention import packed_sdpa_attention

    torch.manual_seed(response_len)
    prompt_len, heads, kv_heads, dim = 20, 4, 2, 8
    total = prompt_len + 2 * response_len
    query = torch.randn(1, heads, total, dim, dtype=torch.float64)
    key, value = (torch.randn(1, kv_heads, total, dim, dtype=torch.float64) for _ in range(2))
    edges = torch.tensor([0, prompt_len, prompt_len + response_len, total], dtype=torch.int32)
    out, _ = packed_sdpa_attention(torch.nn.Module(), query, key, value, None, cu_seq_lens_q=edges,
                                   segment_prefixes=[-1, 0, 0])
    prompt = slice(0, prompt_len)
    for start in (prompt_len, prompt_len + response_len):
        member = slice(start, start + response_len)
        whole = torch.nn.functional.scaled_dot_product_attention(
            *(torch.cat([t[:, :, prompt], t[:, :, member]], dim=2) for t in (query, key, value)),
            is_causal=True, enable_gqa=True,
        ).transpose(1, 2)[0, prompt_len:]
        torch.testing.assert_close(out[0, member], whole, atol=1e-12, rtol=0)
