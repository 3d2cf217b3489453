"""The chunked log-prob math against a full log_softmax, alone (no model)."""

from __future__ import annotations

import pytest
import torch

from model_engine_server.logprobs import LMHead, chunk_tokens_for, chunked_log_probs, full_logits_log_probs


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_full_log_softmax(chunk_tokens, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator)
    weight = torch.randn(300, 16, generator=generator)
    bias = torch.randn(300, generator=generator) if with_bias else None
    targets = torch.randint(0, 300, (50,), generator=generator)
    temperatures = torch.tensor([0.6, 1.0, 1.3, 2.0, 0.9] * 10)
    log_probs, entropy = chunked_log_probs(hidden, LMHead(weight, bias), targets, temperatures, True, chunk_tokens)
    expected_log_probs, expected_entropy = full_logits_log_probs(hidden, weight, targets, temperatures, bias)
    torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_hidden_scores_its_bf16_logits_in_fp32(with_bias):
    """bf16 weights: the logits are rounded to bf16 once (as a trainer's bf16 LM head does), then
    temperature and softmax run in fp32, so the result equals the fp32 math on those logits."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=generator).bfloat16()
    weight = torch.randn(200, 16, generator=generator).bfloat16()
    bias = torch.randn(200, generator=generator).bfloat16() if with_bias else None
    targets = torch.randint(0, 200, (30,), generator=generator)
    temperatures = torch.tensor([0.7, 1.0, 1.5] * 10)
    log_probs, entropy = chunked_log_probs(hidden, LMHead(weight, bias), targets, temperatures, True, 8)
    # the reference rounds its logits to bf16 as a bf16 nn.Linear head does, then runs in fp32
    expected_log_probs, expected_entropy = full_logits_log_probs(hidden, weight, targets, temperatures, bias)
    torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)


def test_entropy_is_skipped_when_not_asked():
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    log_probs, entropy = chunked_log_probs(hidden, LMHead(weight), torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert entropy is None and log_probs.shape == (4,)


def _vocab_parallel_rank(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(10, 8, generator=generator), torch.randn(40, 8, generator=generator)
    targets = torch.randint(0, 40, (10,), generator=generator)
    shard = 40 // world_size
    head = LMHead(weight[rank * shard : (rank + 1) * shard], vocab_start=rank * shard, group=dist.group.WORLD)
    log_probs, entropy = chunked_log_probs(hidden, head, targets, torch.full((10,), 0.7), True, 3)
    results[rank] = (log_probs, entropy)
    dist.destroy_process_group()


def test_vocab_parallel_shards_over_gloo_equal_the_unsharded_math():
    """Two ranks each holding half the LM head rows (as TP ranks do) give the full result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_vocab_parallel_rank, args=(2, port, results), nprocs=2, join=True)
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(10, 8, generator=generator), torch.randn(40, 8, generator=generator)
    targets = torch.randint(0, 40, (10,), generator=generator)
    expected_log_probs, expected_entropy = full_logits_log_probs(hidden, weight, targets, 0.7)
    for rank in range(2):
        log_probs, entropy = results[rank]
        torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)


def test_chunk_size_follows_the_memory_budget():
    budget, vocab = 128 * 1024 * 1024, 151_936
    chunk = chunk_tokens_for(vocab, budget)
    two_fp32_buffers = 2 * 4 * vocab  # logits and their exp
    assert chunk * two_fp32_buffers <= budget < (chunk + 1) * two_fp32_buffers
    assert chunk_tokens_for(10**9, 1) == 1
