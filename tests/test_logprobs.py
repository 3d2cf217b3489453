"""The chunked log-prob math against a full log_softmax, alone (no model)."""

from __future__ import annotations

import pytest
import torch

from model_engine_server.logprobs import (
    TILE_MAX_ROWS,
    TILE_MIN_COLUMNS,
    LMHead,
    chunk_tokens_for,
    chunked_log_probs,
    full_logits_log_probs,
    tile_shape,
)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_tiles_across_the_vocabulary_merge_to_the_full_log_softmax(dtype, with_bias):
    """A budget of one token's logits over 5,001 columns makes tiles of 4 tokens by 1,250
    columns (the last one column wide): the running statistics merge across five tiles per
    token block, the max moving from tile to tile."""
    generator = torch.Generator().manual_seed(3)
    vocab = 5001
    hidden = torch.randn(37, 16, generator=generator).to(dtype)
    weight = torch.randn(vocab, 16, generator=generator).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (37,), generator=generator)
    targets[:3] = torch.tensor([0, vocab - 1, 1250])  # first, last and a tile's first column
    temperatures = torch.tensor([0.6, 1.0, 1.7] * 12 + [1.0])
    tile = tile_shape(37, vocab, 1, whole_shard=False)
    assert (tile.rows, tile.columns) == (4, 1250)
    log_probs, entropy = chunked_log_probs(hidden, LMHead(weight, bias), targets, temperatures, True, 1)
    expected_log_probs, expected_entropy = full_logits_log_probs(hidden, weight, targets, temperatures, bias)
    torch.testing.assert_close(log_probs, expected_log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=0)


def test_tile_shape_keeps_the_budget_and_spans_many_tokens():
    vocab = 151_936
    chunk = chunk_tokens_for(vocab)  # 110 tokens' whole-vocabulary logits per buffer
    for tokens in (1, 300, 2747, 4096):
        tile = tile_shape(tokens, vocab, chunk, whole_shard=False)
        assert tile.rows * tile.columns <= chunk * vocab
        assert tile.rows == min(tokens, TILE_MAX_ROWS)
        assert tile.columns >= TILE_MIN_COLUMNS
    assert tile_shape(TILE_MAX_ROWS + 1, vocab, chunk, whole_shard=False).rows == TILE_MAX_ROWS // 2 + 1  # equal blocks
    assert tile_shape(8192, vocab, chunk, whole_shard=True) == type(tile)(chunk, vocab)  # top-k: whole rows
    assert tile_shape(50, 300, 7, whole_shard=False).columns == 300  # a small vocabulary is one tile


def test_entropy_is_skipped_when_not_asked():
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    log_probs, entropy = chunked_log_probs(hidden, LMHead(weight), torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert entropy is None and log_probs.shape == (4,)


def _vocab_parallel_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden, weight = 3 * torch.randn(10, 8, generator=generator), torch.randn(vocab, 8, generator=generator)
    return hidden, weight, torch.randint(0, vocab, (10,), generator=generator)


def _vocab_parallel_rank(rank: int, world_size: int, port: int, vocab: int, chunk_tokens: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    hidden, weight, targets = _vocab_parallel_inputs(vocab)
    shard = vocab // world_size
    head = LMHead(weight[rank * shard : (rank + 1) * shard], vocab_start=rank * shard, group=dist.group.WORLD)
    log_probs, entropy = chunked_log_probs(hidden, head, targets, torch.full((10,), 0.7), True, chunk_tokens)
    results[rank] = (log_probs, entropy)
    dist.destroy_process_group()


@pytest.mark.parametrize("vocab, chunk_tokens", [(40, 3), (5002, 1)])
def test_vocab_parallel_shards_over_gloo_equal_the_unsharded_math(vocab, chunk_tokens):
    """Two ranks each holding half the LM head rows (as TP ranks do) give the full result; at
    5,002 rows each shard is itself three tiles wide, merged before the shards are."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_vocab_parallel_rank, args=(2, port, vocab, chunk_tokens, results), nprocs=2, join=True)
    hidden, weight, targets = _vocab_parallel_inputs(vocab)
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
