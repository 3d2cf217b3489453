"""Log-probs and entropy of target tokens, in chunks of tokens.

Full fp32 logits for 8,192 tokens at a 151,936-token vocabulary take 5 GB; here at most
`chunk_tokens x vocab` logits exist at a time. With tensor parallelism each rank holds a vocab
shard of the LM head; the softmax statistics (max, sum of exp, expected logit) are all-reduced
across the group as scalars per token, never the logits themselves.

For hidden state h, LM head W (shard), temperature T and target y:
    z = (h @ W.T) / T,   lse = log sum exp z,   log p(y) = z[y] - lse,
    entropy = lse - sum softmax(z) * z.
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
    """How many tokens' fp32 logits fit in `chunk_bytes` (at least 1)."""
    return max(1, chunk_bytes // (4 * max(1, vocab_shard_size)))


def _all_reduce(tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    if group is None:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


def _chunk_stats(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    inverse_temperature: torch.Tensor,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = hidden @ head.weight.T
    if head.bias is not None:
        logits = logits + head.bias
    logits = logits.float()
    logits.mul_(inverse_temperature.unsqueeze(1))

    local_max = logits.max(dim=1).values
    global_max = _all_reduce(local_max.clone(), "max", head.group)
    logits.sub_(global_max.unsqueeze(1))  # z - m, in place: no second [chunk, vocab] tensor
    local_target = targets - head.vocab_start
    owned = (local_target >= 0) & (local_target < head.vocab_shard_size)
    target_logit = logits.gather(1, local_target.clamp(0, head.vocab_shard_size - 1).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

    if want_entropy:
        probs_unnormalised = logits.exp()
        sum_exp = probs_unnormalised.sum(dim=1)
        weighted = (probs_unnormalised * logits).sum(dim=1)
        del probs_unnormalised
        reduced = _all_reduce(torch.stack([sum_exp, weighted, target_logit]), "sum", head.group)
        sum_exp, weighted, target_logit = reduced[0], reduced[1], reduced[2]
    else:
        sum_exp = logits.exp_().sum(dim=1)
        reduced = _all_reduce(torch.stack([sum_exp, target_logit]), "sum", head.group)
        sum_exp, target_logit = reduced[0], reduced[1]

    log_sum_exp = sum_exp.log()  # of the shifted logits
    log_probs = target_logit - log_sum_exp
    entropy = log_sum_exp - weighted / sum_exp if want_entropy else None
    return log_probs, entropy


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
    if hidden.dim() != 2 or targets.shape != (hidden.shape[0],) or temperatures.shape != targets.shape:
        raise ValueError(
            f"expected hidden [N, H] and targets/temperatures [N], got {tuple(hidden.shape)}, "
            f"{tuple(targets.shape)}, {tuple(temperatures.shape)}"
        )
    num_tokens = hidden.shape[0]
    chunk = chunk_tokens or chunk_tokens_for(head.vocab_shard_size)
    inverse_temperature = temperatures.to(device=hidden.device, dtype=torch.float32).reciprocal()
    targets = targets.to(hidden.device)
    log_probs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(log_probs) if want_entropy else None
    with torch.profiler.record_function("logprobs"):  # a label for bench/profile.py; microseconds once per batch when not profiling
        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            chunk_log_probs, chunk_entropy = _chunk_stats(
                hidden[start:stop], head, targets[start:stop], inverse_temperature[start:stop], want_entropy
            )
            log_probs[start:stop] = chunk_log_probs
            if entropy is not None and chunk_entropy is not None:
                entropy[start:stop] = chunk_entropy
    return log_probs, entropy


def full_logits_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: full `log_softmax` over materialised logits `[N, V]` (tests, baselines)."""
    if isinstance(temperature, torch.Tensor):
        scaled = logits.float() / temperature.float().unsqueeze(-1)
    else:
        scaled = logits.float() / temperature
    log_softmax = torch.log_softmax(scaled, dim=-1)
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy
