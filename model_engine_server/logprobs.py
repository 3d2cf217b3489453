"""Log-probs and entropy of target tokens, in chunks of tokens.

Full fp32 logits for 8,192 tokens at a 151,936-token vocabulary take 5 GB; here at most
`chunk_tokens x vocab` logits exist at a time. With tensor parallelism each rank holds a vocab
shard of the LM head; the softmax statistics (max, sum of exp, expected logit) are all-reduced
across the group as scalars per token, never the logits themselves.

For hidden state h, LM head W (shard), temperature T and target y:
    z = (h @ W.T) / T,   lse = log sum exp z,   log p(y) = z[y] - lse,
    entropy = lse - sum softmax(z) * z.

Top-k (optional): the k largest `z - lse` of each token, taken per chunk (and per vocab shard,
then merged over the group by one all-gather of `[chunk, k]` values and ids), so the cost is
`[tokens, k]`, never `[tokens, vocab]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024


@dataclass
class LMHead:
    """The output projection as one rank sees it: rows `vocab_start .. vocab_start+rows-1`."""

    weight: torch.Tensor  # [vocab_shard, hidden]
    bias: torch.Tensor | None = None
    vocab_start: int = 0
    group: Any = None  # torch.distributed process group over the vocab shards, or None

    @property
    def vocab_shard_size(self) -> int:
        return int(self.weight.shape[0])


def chunk_tokens_for(vocab_shard_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many tokens' fp32 logits fit in `chunk_bytes` (at least 1).

    The step holds two such buffers (logits and their `exp`), so the budget is split in two.
    """
    return max(1, chunk_bytes // (2 * 4 * max(1, vocab_shard_size)))


def _all_reduce(tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    if group is None:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


class _Workspace:
    """The two `[chunk, vocab_shard]` fp32 buffers every chunk reuses.

    Allocating a fresh 100 MB tensor per chunk costs more than the arithmetic on it on a CPU
    (the pages fault in on first touch, for every chunk); reused buffers fault once per call.
    """

    def __init__(self, rows: int, head: LMHead, hidden_dtype: torch.dtype) -> None:
        device = head.weight.device
        self.logits = torch.empty(rows, head.vocab_shard_size, dtype=torch.float32, device=device)
        self.work = torch.empty_like(self.logits)
        # Low-precision matmuls write their own dtype; fp32 ones write straight into `logits`.
        self.matmul_out = (
            None if hidden_dtype == torch.float32 else torch.empty(rows, head.vocab_shard_size, dtype=hidden_dtype, device=device)
        )


def _chunk_logits(
    hidden: torch.Tensor, head: LMHead, inverse_temperature: torch.Tensor, workspace: _Workspace
) -> torch.Tensor:
    """`z = (h @ W.T + b) / T` for one chunk, in the workspace.

    In fp32 without a bias the 1/T is folded into the hidden states (a `[chunk, hidden]` multiply
    instead of a pass over `[chunk, vocab]`); otherwise it is applied to the fp32 logits, so in
    lower precision the temperature never rounds in bf16.
    """
    rows = hidden.shape[0]
    logits = workspace.logits[:rows]
    scale = inverse_temperature.unsqueeze(1)
    if workspace.matmul_out is None and head.bias is None:
        return torch.matmul(hidden * scale, head.weight.T, out=logits)
    out = logits if workspace.matmul_out is None else workspace.matmul_out[:rows]
    if head.bias is None:
        torch.matmul(hidden, head.weight.T, out=out)
    else:
        torch.addmm(head.bias, hidden, head.weight.T, out=out)
    if out is not logits:
        logits.copy_(out)
    return logits.mul_(scale)


def _chunk_stats(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    inverse_temperature: torch.Tensor,
    want_entropy: bool,
    workspace: _Workspace,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    logits = _chunk_logits(hidden, head, inverse_temperature, workspace)
    local_max = logits.amax(dim=1)
    global_max = _all_reduce(local_max, "max", head.group)
    logits.sub_(global_max.unsqueeze(1))  # z - m, in place
    local_target = targets - head.vocab_start
    owned = (local_target >= 0) & (local_target < head.vocab_shard_size)
    target_logit = logits.gather(1, local_target.clamp(0, head.vocab_shard_size - 1).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

    # `logits` (z - m) stays intact through the exp pass below (its exp goes to the second
    # buffer), so the top-k and the rank count read the same values the log-probs do
    shifted_top = _shard_top_k(logits, head, top_k) if top_k > 0 else None

    exp_shifted = workspace.work[: logits.shape[0]]
    torch.exp(logits, out=exp_shifted)
    sum_exp = exp_shifted.sum(dim=1)
    if want_entropy:
        weighted = exp_shifted.mul_(logits).sum(dim=1)  # sum exp(z - m) * (z - m)
        reduced = _all_reduce(torch.stack([sum_exp, weighted, target_logit]), "sum", head.group)
        sum_exp, weighted, target_logit = reduced[0], reduced[1], reduced[2]
    else:
        reduced = _all_reduce(torch.stack([sum_exp, target_logit]), "sum", head.group)
        sum_exp, target_logit = reduced[0], reduced[1]

    log_sum_exp = sum_exp.log()  # of the shifted logits
    log_probs = target_logit - log_sum_exp
    entropy = log_sum_exp - weighted / sum_exp if want_entropy else None
    top = None
    if shifted_top is not None:
        top_values, top_ids = shifted_top
        # the target's exact rank, as vLLM reports it: 1 + how many tokens are strictly more
        # likely (one compare over the chunk's logits, summed over the shards). The compare
        # writes 0/1 into the second buffer, free once its sums are taken: a bool tensor's `.sum`
        # first copies it to int64 (8 bytes x [chunk, vocab_shard], twice the buffer; `bench
        # memory` saw the top-k peak double). fp32 counts are exact below 2**24 per shard.
        greater = torch.gt(logits, target_logit.unsqueeze(1), out=exp_shifted).sum(dim=1).to(torch.int64)
        ranks = _all_reduce(greater, "sum", head.group).add_(1)
        top = (top_ids, top_values - log_sum_exp.unsqueeze(1), ranks)
    return log_probs, entropy, top


def _shard_top_k(shifted: torch.Tensor, head: LMHead, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest shifted logits `[rows, k]` and their global token ids, over the whole
    vocabulary: each shard's own top-k, all-gathered (k values per token per shard, never the
    logits) and reduced to the top-k of the union."""
    k_local = min(top_k, head.vocab_shard_size)
    values, ids = shifted.topk(k_local, dim=1)
    ids = ids.add_(head.vocab_start)
    if head.group is None:
        return values, ids
    import torch.distributed as dist

    if k_local < top_k:  # a shard smaller than k: pad to k columns, so every rank gathers one shape
        pad = top_k - k_local
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], dim=1)

    world = dist.get_world_size(group=head.group)
    gathered_values = [torch.empty_like(values) for _ in range(world)]
    gathered_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(gathered_values, values.contiguous(), group=head.group)
    dist.all_gather(gathered_ids, ids.contiguous(), group=head.group)
    all_values, all_ids = torch.cat(gathered_values, dim=1), torch.cat(gathered_ids, dim=1)
    best_values, where = all_values.topk(min(top_k, all_values.shape[1]), dim=1)
    return best_values, all_ids.gather(1, where)


@dataclass
class ChunkedScores:
    """Everything one chunked pass computes for `N` scored positions."""

    log_probs: torch.Tensor  # [N] fp32
    entropy: torch.Tensor | None = None  # [N] fp32
    top_k_ids: torch.Tensor | None = None  # [N, k] int64, most likely first
    top_k_log_probs: torch.Tensor | None = None  # [N, k] fp32
    target_ranks: torch.Tensor | None = None  # [N] int64: 1 + tokens strictly more likely than the target


@torch.inference_mode()
def chunked_log_probs(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    temperatures: torch.Tensor,
    want_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target (and entropy) from hidden states `[N, H]`; both fp32 `[N]`.

    `temperatures` is per token (`[N]`), so one packed batch can mix requests sampled at
    different temperatures.
    """
    scores = chunked_scores(hidden, head, targets, temperatures, want_entropy, 0, chunk_tokens)
    return scores.log_probs, scores.entropy


@torch.inference_mode()
def chunked_scores(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    temperatures: torch.Tensor,
    want_entropy: bool = False,
    top_k: int = 0,
    chunk_tokens: int | None = None,
) -> ChunkedScores:
    """`chunked_log_probs`, plus (when `top_k > 0`) each position's `top_k` most likely tokens
    and their log-probs under the same tempered distribution, `[N, min(top_k, vocab)]`, and the
    target's exact rank in it (what vLLM's `prompt_logprobs` report)."""
    if hidden.dim() != 2 or targets.shape != (hidden.shape[0],) or temperatures.shape != targets.shape:
        raise ValueError(
            f"expected hidden [N, H] and targets/temperatures [N], got {tuple(hidden.shape)}, "
            f"{tuple(targets.shape)}, {tuple(temperatures.shape)}"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    num_tokens = hidden.shape[0]
    chunk = chunk_tokens or chunk_tokens_for(head.vocab_shard_size)
    inverse_temperature = temperatures.to(device=hidden.device, dtype=torch.float32).reciprocal()
    targets = targets.to(hidden.device)
    log_probs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(log_probs) if want_entropy else None
    top_ids = top_log_probs = target_ranks = None
    k = 0
    if top_k > 0:
        # the vocabulary's size, not the shard's: every rank ends with the same global top-k
        vocab = head.vocab_shard_size if head.group is None else _global_vocab(head)
        k = min(top_k, vocab)
        top_ids = torch.empty(num_tokens, k, dtype=torch.int64, device=hidden.device)
        top_log_probs = torch.empty(num_tokens, k, dtype=torch.float32, device=hidden.device)
        target_ranks = torch.empty(num_tokens, dtype=torch.int64, device=hidden.device)
    if num_tokens == 0:
        return ChunkedScores(log_probs, entropy, top_ids, top_log_probs, target_ranks)
    workspace = _Workspace(min(chunk, num_tokens), head, hidden.dtype)
    with torch.profiler.record_function("logprobs"):  # a label for bench/profile.py; microseconds once per batch when not profiling
        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            chunk_log_probs, chunk_entropy, chunk_top = _chunk_stats(
                hidden[start:stop], head, targets[start:stop], inverse_temperature[start:stop], want_entropy, workspace,
                k,
            )
            log_probs[start:stop] = chunk_log_probs
            if entropy is not None and chunk_entropy is not None:
                entropy[start:stop] = chunk_entropy
            if top_ids is not None and top_log_probs is not None and target_ranks is not None and chunk_top is not None:
                top_ids[start:stop], top_log_probs[start:stop], target_ranks[start:stop] = chunk_top
    return ChunkedScores(log_probs, entropy, top_ids, top_log_probs, target_ranks)


def _global_vocab(head: LMHead) -> int:
    """Sum of the shards' sizes (shards may differ by padding), agreed over the group."""
    size = torch.tensor([head.vocab_shard_size], dtype=torch.int64, device=head.weight.device)
    return int(_all_reduce(size, "sum", head.group).item())


@torch.inference_mode()
def full_logits_log_probs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path, as a trainer computes it without fused kernels: full-vocab logits
    `[N, V]` in the head's dtype, then fp32, scaled by the temperature, `log_softmax`, a gather
    of the targets and the entropy of the same distribution. The tests' truth and the
    benchmarks' baseline, so written as lean as a careful trainer is (in place where it can):
    the comparison is not against a straw man."""
    logits = torch.nn.functional.linear(hidden, lm_head_weight, bias).float()
    logits.div_(temperature.float().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature)
    log_softmax = torch.log_softmax(logits, dim=-1)
    del logits
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp().mul_(log_softmax)).sum(-1)
    return log_probs, entropy
