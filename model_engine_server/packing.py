"""Packing sequences into one padding-free row, and the index maps back to requests.

Sequence k of length L_k contributes its first L_k - 1 tokens to the row (the last token is
only ever a target, never an input that predicts something we need). Position ids restart at
0 for every sequence, and `cu_seqlens` marks the boundaries, so attention stays within a
sequence. The row positions whose outputs we need are those predicting response tokens:
`offset_k + response_start_k - 1 .. offset_k + L_k - 2`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    """One packed row plus everything needed to map outputs back to sequences."""

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64, reset per sequence
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32, boundaries in the row
    score_positions: torch.Tensor  # [N] int64, row positions whose hidden state predicts a response token
    targets: torch.Tensor  # [N] int64, the response tokens
    score_offsets: list[int]  # [num_seqs + 1], sequence k's scores are [score_offsets[k], score_offsets[k+1])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return len(self.score_offsets) - 1

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max().item()) if self.num_sequences else 0


def pack_sequences(sequences: Sequence[Sequence[int]], response_starts: Sequence[int]) -> PackedBatch:
    """Pack token-id sequences (each of length >= 2, 1 <= response_start < length)."""
    if len(sequences) != len(response_starts):
        raise ValueError("one response_start per sequence is required")
    row: list[int] = []
    positions: list[int] = []
    boundaries = [0]
    score_positions: list[int] = []
    targets: list[int] = []
    score_offsets = [0]
    for ids, response_start in zip(sequences, response_starts):
        length = len(ids)
        if length < 2 or not 1 <= response_start < length:
            raise ValueError(f"bad sequence: length {length}, response_start {response_start}")
        offset = len(row)
        row.extend(ids[:-1])
        positions.extend(range(length - 1))
        boundaries.append(len(row))
        score_positions.extend(range(offset + response_start - 1, offset + length - 1))
        targets.extend(ids[response_start:])
        score_offsets.append(len(targets))
    return PackedBatch(
        input_ids=torch.tensor([row], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        score_positions=torch.tensor(score_positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        score_offsets=score_offsets,
    )


def split_by_token_budget(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Greedy first-fit groups of indices whose summed lengths stay within `token_budget`.

    Order within the input is kept for the first item of each group; a length above the budget
    gets a group of its own (callers refuse those earlier; this never loops forever).
    """
    groups: list[list[int]] = []
    totals: list[int] = []
    for index, length in enumerate(lengths):
        for group_index, total in enumerate(totals):
            if total + length <= token_budget:
                groups[group_index].append(index)
                totals[group_index] += length
                break
        else:
            groups.append([index])
            totals.append(length)
    return groups
