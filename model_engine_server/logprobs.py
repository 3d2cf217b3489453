"""Log-probs and entropy of target tokens, in tiles of tokens x vocabulary.

Full fp32 logits for 8,192 tokens at a 151,936-token vocabulary take 5 GB; here at most one
tile of `rows x columns` logits exists at a time (two buffers: the logits and their `exp`).
A tile spans many tokens and a slice of the vocabulary, so each LM-head GEMM is wide on both
sides and every head row is read once per token block; a tile of ~100 tokens across the whole
vocabulary instead re-reads the 0.5-1 GB head for every 100 tokens (about half the GEMM rate
on a 2-core CPU, bench/notes/scoring_shapes_full_4096.md). The softmax statistics of each tile (max, sum
of exp, expected logit) merge into running ones per token, the online-softmax way. With tensor
parallelism each rank holds a vocab shard of the LM head; the statistics are merged across the
group the same way, as scalars per token, never the logits themselves.

For hidden state h, LM head W (shard), temperature T and target y:
    z = (h @ W.T) / T,   lse = log sum exp z,   log p(y) = z[y] - lse,
    entropy = lse - sum softmax(z) * z.

Top-k (optional): the k largest `z - lse` of each token, which needs each token's whole shard
in one tile (the target's rank is counted against the target logit, known only once every
column is seen): there tiles are `chunk` tokens by the whole shard. Each shard's top-k is
merged over the group by one all-gather of `[chunk, k]` values and ids, so the cost is
`[tokens, k]`, never `[tokens, vocab]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024
TILE_MAX_ROWS = 4096  # tokens per tile; more only grows the per-token statistics
TILE_MIN_COLUMNS = 1024  # vocabulary columns per tile, at least, where the budget allows


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
    """How many tokens' fp32 logits over the whole shard fit in `chunk_bytes` (at least 1): the
    memory budget of one tile, in those units (a tile may be more tokens by fewer columns).

    The step holds two such buffers (logits and their `exp`), so the budget is split in two.
    """
    return max(1, chunk_bytes // (2 * 4 * max(1, vocab_shard_size)))


@dataclass(frozen=True)
class TileShape:
    rows: int  # tokens
    columns: int  # vocabulary columns of this rank's shard


def tile_shape(num_tokens: int, vocab_shard_size: int, chunk_tokens: int, whole_shard: bool) -> TileShape:
    """The tile for a budget of `chunk_tokens x vocab_shard_size` logits: as many tokens as fit
    with at least `TILE_MIN_COLUMNS` columns (up to `TILE_MAX_ROWS`, the tokens split into
    equal blocks), then as many columns as the budget leaves; `whole_shard` (top-k) keeps every column and takes `chunk_tokens` rows."""
    if whole_shard:
        return TileShape(max(1, min(num_tokens, chunk_tokens)), vocab_shard_size)
    budget = chunk_tokens * vocab_shard_size
    most_rows = max(1, min(TILE_MAX_ROWS, budget // min(vocab_shard_size, TILE_MIN_COLUMNS)))
    blocks = -(-max(1, num_tokens) // most_rows)
    rows = -(-max(1, num_tokens) // blocks)  # equal blocks: 4,097 tokens are 2 x 2,049, not 4,096 + 1
    return TileShape(rows, max(1, min(vocab_shard_size, budget // rows)))


def _all_reduce(tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    if group is None:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


@dataclass
class _SoftmaxStats:
    """Per token, over the vocabulary columns seen so far: their largest logit `max`,
    `sum_exp` = sum exp(z - max), `weighted` = sum exp(z - max) (z - max) (entropy only) and the
    target's logit z[y] (0 while y is not among them). Two sets over disjoint columns merge
    exactly, whatever their order: tiles of one shard, then shards of one head."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    weighted: torch.Tensor | None
    target: torch.Tensor

    def merged(self, other: "_SoftmaxStats") -> "_SoftmaxStats":
        top = torch.maximum(self.max, other.max)
        mine, theirs = self._rescaled(top), other._rescaled(top)
        weighted = None if mine[1] is None or theirs[1] is None else mine[1] + theirs[1]
        return _SoftmaxStats(top, mine[0] + theirs[0], weighted, self.target + other.target)

    def _rescaled(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sum_exp` and `weighted` relative to a new max `top` >= `max`."""
        shift = self.max - top
        scale = shift.exp()
        weighted = None if self.weighted is None else scale * (self.weighted + shift * self.sum_exp)
        return scale * self.sum_exp, weighted

    def over_shards(self, group: Any) -> "_SoftmaxStats":
        """The same statistics over every rank's shard: one max and one sum all-reduce."""
        if group is None:
            return self
        top = _all_reduce(self.max.clone(), "max", group)
        sum_exp, weighted = self._rescaled(top)
        parts = [sum_exp, self.target] + ([] if weighted is None else [weighted])
        reduced = _all_reduce(torch.stack(parts), "sum", group)
        return _SoftmaxStats(top, reduced[0], reduced[2] if weighted is not None else None, reduced[1])

    def log_probs_and_entropy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`log p(y)`, `max + lse` of the shifted logits (to turn any logit into a log-prob)
        and the entropy (None without `weighted`)."""
        log_sum_exp = self.sum_exp.log()
        log_probs = (self.target - self.max) - log_sum_exp
        entropy = None if self.weighted is None else log_sum_exp - self.weighted / self.sum_exp
        return log_probs, self.max + log_sum_exp, entropy


class _Workspace:
    """The two tile buffers every tile reuses, flat so a narrower last tile is still contiguous.

    Allocating a fresh 100 MB tensor per tile costs more than the arithmetic on it on a CPU
    (the pages fault in on first touch, for every tile); reused buffers fault once per call.
    """

    def __init__(self, tile: TileShape, head: LMHead, hidden_dtype: torch.dtype) -> None:
        device = head.weight.device
        size = tile.rows * tile.columns
        self.logits = torch.empty(size, dtype=torch.float32, device=device)
        self.work = torch.empty_like(self.logits)
        # Low-precision matmuls write their own dtype; fp32 ones write straight into `logits`.
        self.matmul_out = None if hidden_dtype == torch.float32 else torch.empty(size, dtype=hidden_dtype, device=device)

    @staticmethod
    def view(buffer: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        return buffer[: rows * columns].view(rows, columns)


def _tile_logits(
    hidden: torch.Tensor, head: LMHead, columns: slice, scale: torch.Tensor, folded: bool, workspace: _Workspace
) -> torch.Tensor:
    """`z = (h @ W[columns].T + b) / T` for one tile, in the workspace.

    `folded` (fp32, no bias): the caller has already multiplied `hidden` by 1/T (a `[rows,
    hidden]` multiply instead of a pass over the tile); otherwise 1/T is applied to the fp32
    logits, so in lower precision the temperature never rounds in bf16.
    """
    rows, width = hidden.shape[0], columns.stop - columns.start
    logits = _Workspace.view(workspace.logits, rows, width)
    weight = head.weight[columns]
    if folded:
        return torch.matmul(hidden, weight.T, out=logits)
    out = logits if workspace.matmul_out is None else _Workspace.view(workspace.matmul_out, rows, width)
    if head.bias is None:
        torch.matmul(hidden, weight.T, out=out)
    else:
        torch.addmm(head.bias[columns], hidden, weight.T, out=out)
    if out is not logits:
        logits.copy_(out)
    return logits.mul_(scale)


def _tile_stats(
    logits: torch.Tensor, local_target: torch.Tensor, want_entropy: bool, workspace: _Workspace
) -> _SoftmaxStats:
    """The tile's statistics; `local_target` is the target's column within the tile. Leaves
    `logits` shifted by the tile's max (`z - max`), which top-k and the rank count read."""
    rows, width = logits.shape
    owned = (local_target >= 0) & (local_target < width)
    target = logits.gather(1, local_target.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
    target = torch.where(owned, target, torch.zeros_like(target))
    tile_max = logits.amax(dim=1)
    logits.sub_(tile_max.unsqueeze(1))
    exp_shifted = _Workspace.view(workspace.work, rows, width)
    torch.exp(logits, out=exp_shifted)
    sum_exp = exp_shifted.sum(dim=1)
    weighted = exp_shifted.mul_(logits).sum(dim=1) if want_entropy else None
    return _SoftmaxStats(tile_max, sum_exp, weighted, target)


def _row_block_stats(
    hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, inverse_temperature: torch.Tensor,
    want_entropy: bool, columns: int, workspace: _Workspace,
) -> tuple[_SoftmaxStats, torch.Tensor]:
    """Local statistics of one block of tokens over this rank's shard, tile by tile; and the
    last tile's logits (the whole shard, shifted by its max, where `columns` covers it)."""
    scale = inverse_temperature.unsqueeze(1)
    folded = workspace.matmul_out is None and head.bias is None
    scaled = hidden * scale if folded else hidden
    local_target = targets - head.vocab_start
    stats: _SoftmaxStats | None = None
    logits = torch.empty(0)
    for start in range(0, head.vocab_shard_size, columns):
        span = slice(start, min(start + columns, head.vocab_shard_size))
        logits = _tile_logits(scaled, head, span, scale, folded, workspace)
        tile = _tile_stats(logits, local_target - start, want_entropy, workspace)
        stats = tile if stats is None else stats.merged(tile)
    assert stats is not None  # a head has at least one row
    return stats, logits


def _shard_top_k(
    shifted: torch.Tensor, local_max: torch.Tensor, head: LMHead, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` largest logits `[rows, k]` (unshifted, so shards compare) and their global
    token ids, over the whole vocabulary: each shard's own top-k, all-gathered (k values per
    token per shard, never the logits) and reduced to the top-k of the union."""
    k_local = min(top_k, head.vocab_shard_size)
    values, ids = shifted.topk(k_local, dim=1)
    values = values.add_(local_max.unsqueeze(1))
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


def _top_k_and_ranks(
    shifted: torch.Tensor, local: _SoftmaxStats, merged: _SoftmaxStats, normaliser: torch.Tensor,
    head: LMHead, top_k: int, workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one tile over the whole shard (`shifted` = z - local max): the top-k ids, their
    log-probs and the target's exact rank, as vLLM reports it: 1 + how many tokens are strictly
    more likely (one compare over the tile, summed over the shards). The compare writes 0/1 into
    the second buffer, free once its sums are taken: a bool tensor's `.sum` first copies it to
    int64 (8 bytes x the tile, twice the buffer; `bench memory` saw the top-k peak double).
    fp32 counts are exact below 2**24 per shard. The target is shifted by the same local max as
    the tile, the same rounding as its own entry, so it never counts against itself."""
    top_values, top_ids = _shard_top_k(shifted, local.max, head, top_k)
    threshold = (merged.target - local.max).unsqueeze(1)
    above = _Workspace.view(workspace.work, *shifted.shape)
    greater = torch.gt(shifted, threshold, out=above).sum(dim=1).to(torch.int64)
    ranks = _all_reduce(greater, "sum", head.group).add_(1)
    return top_ids, top_values - normaliser.unsqueeze(1), ranks


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
    tile = tile_shape(num_tokens, head.vocab_shard_size, chunk_tokens or chunk_tokens_for(head.vocab_shard_size), top_k > 0)
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
    workspace = _Workspace(tile, head, hidden.dtype)
    with torch.profiler.record_function("logprobs"):  # a label for bench/profile.py; microseconds once per batch when not profiling
        for start in range(0, num_tokens, tile.rows):
            rows = slice(start, min(start + tile.rows, num_tokens))
            local, shifted = _row_block_stats(
                hidden[rows], head, targets[rows], inverse_temperature[rows], want_entropy, tile.columns, workspace
            )
            merged = local.over_shards(head.group)
            log_probs[rows], normaliser, block_entropy = merged.log_probs_and_entropy()
            if entropy is not None and block_entropy is not None:
                entropy[rows] = block_entropy
            if top_ids is not None and top_log_probs is not None and target_ranks is not None:
                top_ids[rows], top_log_probs[rows], target_ranks[rows] = _top_k_and_ranks(
                    shifted, local, merged, normaliser, head, k, workspace
                )
    return ChunkedScores(log_probs, entropy, top_ids, top_log_probs, target_ranks)


def _global_vocab(head: LMHead) -> int:
    """Sum of the shards' sizes (shards may differ by padding), agreed over the group."""
    size = torch.tensor([head.vocab_shard_size], dtype=torch.int64, device=head.weight.device)
    return int(_all_reduce(size, "sum", head.group).item())


@overload
def full_logits_log_probs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None, want_entropy: Literal[True] = True,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def full_logits_log_probs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None, *, want_entropy: Literal[False],
) -> tuple[torch.Tensor, None]: ...


@torch.inference_mode()
def full_logits_log_probs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    want_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference path, as a trainer computes it without fused kernels: full-vocab logits
    `[N, V]` in the head's dtype, then fp32, scaled by the temperature, `log_softmax`, a gather
    of the targets and (when `want_entropy`) the entropy of the same distribution. The tests'
    truth and the benchmarks' baseline, so written as lean as a careful trainer is (in place
    where it can): the comparison is not against a straw man, nor against work the compared
    path skips."""
    logits = torch.nn.functional.linear(hidden, lm_head_weight, bias).float()
    logits.div_(temperature.float().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature)
    log_softmax = torch.log_softmax(logits, dim=-1)
    del logits
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return log_probs, None
    entropy = -(log_softmax.exp().mul_(log_softmax)).sum(-1)
    return log_probs, entropy
