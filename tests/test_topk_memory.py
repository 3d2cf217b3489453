"""Top-100 log-probs of 8,192 tokens at Qwen2's 151,936-token vocabulary peak far below the 5 GB of
full fp32 logits: the chunked step never holds a `[tokens, vocab]` tensor, with top-k on or off.

Peak memory is the process's extra resident set at its peak (`bench.common.measure_peak_bytes`,
VmHWM reset just before the step), as `bench memory` measures it. A small hidden size keeps the
run to seconds; the logits' size, which is what is bounded, depends only on tokens x vocab.
"""

from __future__ import annotations

import pytest
import torch

from bench.memory import VOCAB_SIZE, top_k_peak
from model_engine_server.logprobs import LMHead, chunk_tokens_for

NUM_TOKENS = 8192
FULL_LOGITS_BYTES = NUM_TOKENS * VOCAB_SIZE * 4  # 4.98 GB


@pytest.mark.slow
def test_top_100_of_8192_tokens_at_a_151936_vocabulary_peaks_far_below_full_logits():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(NUM_TOKENS, 16, generator=generator)
    head = LMHead(0.3 * torch.randn(VOCAB_SIZE, 16, generator=generator))
    targets = torch.randint(0, VOCAB_SIZE, (NUM_TOKENS,), generator=generator)
    temperatures = torch.full((NUM_TOKENS,), 0.7)

    scores, peak = top_k_peak(hidden, head, targets, temperatures, top_k=100)

    # two reused chunk buffers of 110 x 151,936 fp32 (64 MB each) plus the [8192, 100] results;
    # a single [tokens, vocab] fp32 tensor would be FULL_LOGITS_BYTES on its own
    workspace = 2 * chunk_tokens_for(VOCAB_SIZE) * VOCAB_SIZE * 4
    assert workspace <= 128 * 1024 * 1024
    assert 0 < peak < FULL_LOGITS_BYTES / 8, f"peak {peak / 2**20:.0f} MiB"
    assert scores.top_k_ids.shape == scores.top_k_log_probs.shape == (NUM_TOKENS, 100)
    assert scores.target_ranks.shape == (NUM_TOKENS,)

    # and it is the top-100: the first rows against torch.topk of the full log_softmax
    rows = 64
    full = torch.log_softmax((hidden[:rows] @ head.weight.T) / 0.7, dim=-1)
    torch.testing.assert_close(scores.top_k_log_probs[:rows], full.topk(100, dim=-1).values, atol=1e-5, rtol=0)
    target_log_probs = full.gather(1, targets[:rows, None])[:, 0]
    torch.testing.assert_close(scores.log_probs[:rows], target_log_probs, atol=1e-5, rtol=0)
    # ranks count the tokens strictly more likely; ones within rounding of the target may go either way
    surely_above = (full > target_log_probs[:, None] + 1e-5).sum(1) + 1
    maybe_above = (full > target_log_probs[:, None] - 1e-5).sum(1) + 1
    ranks = scores.target_ranks[:rows]
    assert bool(((surely_above <= ranks) & (ranks <= maybe_above)).all())
