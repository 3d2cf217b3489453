"""Our packed row <-> verl's no-padding batch.

Our row drops each sequence's last token (it is only ever a target); verl's no-padding batch
holds whole sequences as nested (jagged) tensors and reads each position's label from the next
token of the row. So sequence k goes to verl whole: its tokens in our row plus its last target.
verl's output at position j of a sequence is the log-prob of token j + 1, so a score position p
of our row (in sequence k) is position p + k of verl's row, k being the tokens appended before it.

What verl's forward-only path reads (`TrainingWorker.infer_batch` -> the FSDP engine):
`input_ids` and `position_ids` (nested), `loss_mask` (only summed, for loss normalisation),
`temperature` (one per sequence) and the non-tensor switches `calculate_entropy`, `compute_loss`,
`use_dynamic_bsz` and `max_token_len_per_gpu`. No prompt/response split is needed: we read the
per-token outputs directly instead of through verl's `no_padding_2_padding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model_engine_server.packing import PackedBatch

if TYPE_CHECKING:
    from tensordict import TensorDict


@dataclass(frozen=True)
class VerlBatch:
    """A verl batch and where our scores sit in verl's flattened per-token outputs."""

    data: "TensorDict"
    score_positions: torch.Tensor  # [N] int64, indices into verl's flattened row
    num_tokens: int  # tokens in verl's row (ours plus one per sequence)


def sequence_of_each_score(batch: PackedBatch) -> torch.Tensor:
    """[N] index of the sequence each score belongs to."""
    counts = torch.tensor(batch.score_offsets, dtype=torch.long).diff()
    return torch.repeat_interleave(torch.arange(batch.num_sequences), counts)


def whole_sequences(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our row with each sequence's last token put back: (token ids, position ids, offsets),
    flat over the row, offsets [num_seqs + 1] marking the sequences."""
    n = batch.num_sequences
    ours = batch.cu_seqlens.to(torch.long)
    offsets = ours + torch.arange(n + 1)  # one more token per sequence before each boundary
    total = batch.num_tokens + n
    is_last = torch.zeros(total, dtype=torch.bool)
    is_last[offsets[1:] - 1] = True
    last_targets = batch.targets[torch.tensor(batch.score_offsets[1:], dtype=torch.long) - 1]
    ids = torch.empty(total, dtype=torch.long)
    ids[~is_last] = batch.input_ids[0]
    ids[is_last] = last_targets
    positions = torch.empty(total, dtype=torch.long)
    positions[~is_last] = batch.position_ids[0]
    positions[is_last] = ours.diff()  # the last token follows the row's L - 1 positions 0 .. L - 2
    return ids, positions, offsets


def per_sequence_temperatures(batch: PackedBatch, temperatures: torch.Tensor) -> torch.Tensor:
    """[num_seqs] float32 from our per-score temperatures (constant within a sequence)."""
    first_scores = torch.tensor(batch.score_offsets[:-1], dtype=torch.long)
    return temperatures.to(torch.float32).index_select(0, first_scores)


def to_verl_batch(batch: PackedBatch, temperatures: torch.Tensor, want_entropy: bool) -> VerlBatch:
    """verl's no-padding batch for `batch`, scored in one micro-batch (our adapter already
    sized the row to the token budget)."""
    if batch.shares_prompts:  # the adapter never shares prompts for this engine
        raise ValueError("verl's engine scores whole sequences; this row shares prompts")
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    ids, positions, offsets = whole_sequences(batch)
    loss_mask = torch.zeros_like(ids)
    verl_positions = batch.score_positions + sequence_of_each_score(batch)
    loss_mask[verl_positions + 1] = 1  # the response tokens themselves
    data = TensorDict(
        {
            "input_ids": torch.nested.nested_tensor_from_jagged(ids, offsets=offsets),
            "position_ids": torch.nested.nested_tensor_from_jagged(positions, offsets=offsets),
            "loss_mask": torch.nested.nested_tensor_from_jagged(loss_mask, offsets=offsets),
            "temperature": per_sequence_temperatures(batch, temperatures),
        },
        batch_size=[batch.num_sequences],
    )
    tu.assign_non_tensor(
        data, calculate_entropy=want_entropy, compute_loss=False, use_dynamic_bsz=True,
        max_token_len_per_gpu=int(ids.shape[0]),
    )
    return VerlBatch(data=data, score_positions=verl_positions, num_tokens=int(ids.shape[0]))


def flat_output(output: "TensorDict", key: str, verl_batch: VerlBatch) -> torch.Tensor:
    """One per-token output of verl (nested, in the batch's sequence order) as our scores [N]."""
    from verl.utils import tensordict_utils as tu

    nested = tu.get(output, key)
    flat = torch.cat(list(nested.unbind())) if nested.is_nested else nested.reshape(-1)
    if flat.shape[0] != verl_batch.num_tokens:
        raise RuntimeError(f"verl returned {flat.shape[0]} {key} values for a row of {verl_batch.num_tokens} tokens")
    return flat.index_select(0, verl_batch.score_positions.to(flat.device)).float()
