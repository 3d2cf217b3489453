"""Forward FLOPs counted from the architecture, and the machine's dense GEMM rate measured now.

A multiply-add is 2 FLOPs. Per token: every linear layer of the body (attention projections,
MLP) and, only for scored positions, the LM head. Attention scores and their weighted sum
are causal: sequence of length L costs 2 x 2 x L(L+1)/2 x heads x head_dim per layer; a
response packed after a shared prompt of C tokens adds L x C scores for its rows.
Norms, activations, rotary and softmax are left out (a few percent), as MFU usually does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from bench.common import best_time


Work = tuple[int, int] | tuple[int, int, int]  # (input_tokens, scored_tokens[, context_tokens])


def forward_flops_split(config: Any, sequences: Sequence[Work]) -> tuple[float, float]:
    """(body FLOPs, LM-head FLOPs) of one forward over `(input_tokens, scored_tokens)` per
    sequence: the split that decides how much scoring response positions only can save. A third
    entry counts keys already in the row that the sequence's tokens also attend to (its shared
    prompt)."""
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    per_token = body_linear_flops_per_token(config)
    body = head = 0.0
    for length, scored, *context in sequences:
        keys = length * (length + 1) / 2 + length * sum(context)
        attention = config.num_hidden_layers * 2 * 2 * keys * heads * head_dim
        body += per_token * length + attention
        head += 2 * config.hidden_size * config.vocab_size * scored
    return body, head


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def body_linear_flops_per_token(config: Any) -> float:
    """The body's linear layers (attention projections, MLP) for one token, over every layer."""
    hidden, head_dim = config.hidden_size, _head_dim(config)
    projections = hidden * config.num_attention_heads * head_dim * 2 + hidden * config.num_key_value_heads * head_dim * 2
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    return 2 * config.num_hidden_layers * (projections + mlp)


def linear_flops(config: Any, sequences: Sequence[Work]) -> float:
    """The GEMM part of `forward_flops`: every linear layer, the LM head on scored positions;
    no attention scores (what a profile's matmul time is compared with)."""
    tokens = sum(length for length, _, *_ in sequences)
    scored = sum(scored for _, scored, *_ in sequences)
    return body_linear_flops_per_token(config) * tokens + 2 * config.hidden_size * config.vocab_size * scored


def forward_flops(config: Any, sequences: Sequence[Work]) -> float:
    """FLOPs of one forward over `(input_tokens, scored_tokens)` per sequence."""
    body, head = forward_flops_split(config, sequences)
    return body + head


def gemm_flops_per_s(dtype: torch.dtype, size: int | None = None, batch: int | None = None, repeats: int = 5) -> float:
    """Best rate of square matmuls of `dtype`: the ceiling the model's FLOP/s is compared with.

    On CUDA one 2048-square matmul per synchronize is mostly launch and synchronize latency,
    and too small to fill the GPU, so it understates the peak: there `batch` (default 20)
    8192-square matmuls run per timed step, one synchronize after them. On a CPU a 2048-square
    matmul already fills the cores, and one per step keeps the rate comparable with earlier
    records."""
    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    size = size or (8192 if on_cuda else 2048)
    batch = batch or (20 if on_cuda else 1)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def matmuls() -> None:
        for _ in range(batch):
            torch.mm(a, b, out=out)

    seconds = best_time(matmuls, repeats, warmup=2)
    return 2 * size**3 * batch / seconds


def masked_row_attention_flops(config: Any, row_lengths: Sequence[int]) -> float:
    """Attention scores and weighted values of SDPA with an explicit `[T, T]` mask over each
    packed row (how transformers runs packed rows, and verl on CPU): every query against every
    key of its row, masked or not, so the cost grows with the row's length squared."""
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    return config.num_hidden_layers * 2 * 2 * heads * head_dim * sum(length * length for length in row_lengths)


def sequence_attention_flops(config: Any, lengths: Sequence[int]) -> float:
    """The same over each sequence alone, causal: what `forward_flops_split` counts."""
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    return config.num_hidden_layers * 2 * 2 * heads * head_dim * sum(n * (n + 1) / 2 for n in lengths)
