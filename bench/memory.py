"""Peak memory of the log-prob step: chunked (the server) against full fp32 logits (a trainer).

8,192 tokens at a 151,936-token vocabulary: full fp32 logits alone take 5 GB, and the
trainer-style `log_softmax` allocates a second tensor of that size. The chunked path holds
one chunk of logits at a time (`logprob_chunk_mb`, default 128 MB). Both compute the log-prob
of every target and the entropy; their results must agree within 1e-5.

Top-k (k = 20 and 100, what vLLM clients ask for as `prompt_logprobs`) runs in the same chunks:
each chunk's top-k is taken from its logits buffer and the target's rank is counted in the
second buffer, so the extra memory is the `[tokens, k]` result, not a `[tokens, vocab]` tensor.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from bench.common import Target, measure_peak_bytes, fixed_targets
from model_engine_server.logprobs import (
    ChunkedScores,
    LMHead,
    chunk_tokens_for,
    chunked_log_probs,
    chunked_scores,
    full_logits_log_probs,
)

VOCAB_SIZE = 151_936
HIDDEN_SIZE = 896  # Qwen2-0.5B's width
TOP_KS = (20, 100)
TARGETS = [
    Target("memory_ratio", ">=", 8.0),
    Target("max_abs_diff", "<=", 1e-5),
    Target("chunked_vs_float64_entropy", "<=", 1e-5),
    Target("top_100_vs_full_logits", ">=", 8.0),
    Target("top_k_max_abs_diff", "<=", 1e-5),
]
targets = fixed_targets(TARGETS)


def _inputs(num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, LMHead, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = torch.randn(num_tokens, HIDDEN_SIZE, generator=generator).to(device)
    weight = (0.05 * torch.randn(VOCAB_SIZE, HIDDEN_SIZE, generator=generator)).to(device)
    targets = torch.randint(0, VOCAB_SIZE, (num_tokens,), generator=generator).to(device)
    temperatures = torch.full((num_tokens,), 0.7, device=device)
    return hidden, LMHead(weight), targets, temperatures


def top_k_peak(
    hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, temperatures: torch.Tensor, top_k: int,
    chunk_tokens: int | None = None,
) -> tuple[ChunkedScores, int]:
    """The server's chunked step with `top_k` (log-probs, entropy, top-k, ranks) and its peak extra
    memory in bytes (`measure_peak_bytes`); shared with the test that bounds it."""
    gc.collect()
    return measure_peak_bytes(
        lambda: chunked_scores(hidden, head, targets, temperatures, True, top_k, chunk_tokens))


def _top_k_check(
    hidden: torch.Tensor, head: LMHead, temperatures: torch.Tensor, scores: ChunkedScores, rows: int = 512
) -> float:
    """Largest distance of the chunked top-k log-probs from `torch.topk` of the full fp32
    `log_softmax` on the first `rows` tokens (values, not ids: exact ties may order freely)."""
    assert scores.top_k_log_probs is not None
    logits = (hidden[:rows] @ head.weight.T) / temperatures[:rows].unsqueeze(1)
    expected = torch.log_softmax(logits, dim=-1).topk(scores.top_k_log_probs.shape[1], dim=-1).values
    return (scores.top_k_log_probs[:rows] - expected).abs().max().item()


def _float64_check(
    hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, temperatures: torch.Tensor, chunk_tokens: int
) -> dict[str, float]:
    """Which fp32 path is nearer the truth: both against float64 on the first 512 tokens.

    At this vocabulary the entropy's 151,936-term fp32 sums carry ~1e-5 of rounding; the
    float64 figures show where it comes from.
    """
    logits = (hidden.double() @ head.weight.double().T) / temperatures.double().unsqueeze(1)
    log_softmax = torch.log_softmax(logits, dim=-1)
    exact_lp = log_softmax.gather(1, targets.unsqueeze(1)).squeeze(1)
    exact_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    chunked_lp, chunked_entropy = chunked_log_probs(hidden, head, targets, temperatures, True, chunk_tokens)
    full_lp, full_entropy = full_logits_log_probs(hidden, head.weight, targets, temperatures)
    error = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    return {
        "chunked_vs_float64_log_probs": error(chunked_lp, exact_lp),
        "chunked_vs_float64_entropy": error(chunked_entropy, exact_entropy),  # type: ignore[arg-type]
        "full_vs_float64_log_probs": error(full_lp, exact_lp),
        "full_vs_float64_entropy": error(full_entropy, exact_entropy),
    }


def run(quick: bool = False) -> dict[str, Any]:
    num_tokens = 8192  # the size in both modes: the comparison is the point, and it takes seconds
    hidden, head, targets, temperatures = _inputs(num_tokens)
    chunk_tokens = chunk_tokens_for(VOCAB_SIZE)

    def chunked() -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, entropy = chunked_log_probs(hidden, head, targets, temperatures, True, chunk_tokens)
        return log_probs, entropy  # type: ignore[return-value]

    def full() -> tuple[torch.Tensor, torch.Tensor]:
        return full_logits_log_probs(hidden, head.weight, targets, temperatures)

    gc.collect()
    (chunked_lp, chunked_entropy), chunked_peak = measure_peak_bytes(chunked)
    gc.collect()
    (full_lp, full_entropy), full_peak = measure_peak_bytes(full)
    precision = _float64_check(hidden[:512], head, targets[:512], temperatures[:512], chunk_tokens)
    full_logits_bytes = num_tokens * VOCAB_SIZE * 4
    top_k: dict[str, Any] = {}
    diffs = []
    for k in TOP_KS:
        scores, peak = top_k_peak(hidden, head, targets, temperatures, k, chunk_tokens)
        top_k[f"top_{k}_peak_bytes"] = peak
        top_k[f"top_{k}_vs_full_logits"] = full_logits_bytes / max(1, peak)
        diffs.append(_top_k_check(hidden, head, temperatures, scores))
        del scores
    return {
        "num_tokens": num_tokens,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "chunk_tokens": chunk_tokens,
        "full_logits_bytes": full_logits_bytes,
        "chunked_peak_bytes": chunked_peak,
        "full_peak_bytes": full_peak,
        "memory_ratio": full_peak / max(1, chunked_peak),
        "max_abs_diff": (chunked_lp - full_lp).abs().max().item(),  # log-probs, chunked vs full
        "entropy_max_abs_diff": (chunked_entropy - full_entropy).abs().max().item(),
        **precision,
        **top_k,
        "top_k_max_abs_diff": max(diffs),  # over k = 20 and 100, against torch.topk of full logits
        "method": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM) reset via /proc/self/clear_refs",
    }
