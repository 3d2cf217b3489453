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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = _chunk_logits(hidden, head, inverse_temperature, workspace)
    local_max = logits.amax(dim=1)
    global_max = _all_reduce(local_max, "max", head.group)
    logits.sub_(global_max.unsqueeze(1))  # z - m, in place
    local_target = targets - head.vocab_start
    owned = (local_target >= 0) & (local_target < head.vocab_shard_size)
    target_logit = logits.gather(1, local_target.clamp(0, head.vocab_shard_size - 1).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

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
    if num_tokens == 0:
        return log_probs, entropy
    workspace = _Workspace(min(chunk, num_tokens), head, hidden.dtype)
    with torch.profiler.record_function("logprobs"):  # a label for bench/profile.py; microseconds once per batch when not profiling
        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            chunk_log_probs, chunk_entropy = _chunk_stats(
                hidden[start:stop], head, targets[start:stop], inverse_temperature[start:stop], want_entropy, workspace
            )
            log_probs[start:stop] = chunk_log_probs
            if entropy is not None and chunk_entropy is not None:
                entropy[start:stop] = chunk_entropy
    return log_probs, entropy


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
