"""Packing sequences into one padding-free row, and the index maps back to requests.

Sequence k of length L_k contributes its first L_k - 1 tokens to the row (the last token is
only ever a target, never an input that predicts something we need). Position ids restart at
0 for every sequence, and `cu_seqlens` marks the boundaries, so attention stays within a
sequence. The row positions whose outputs we need are those predicting response tokens:
`offset_k + response_start_k - 1 .. offset_k + L_k - 2`.

With `share_prompts`, sequences whose prompts (`ids[:response_start]`) are identical - the n
samples of one GRPO group - share one copy of it: the prompt is a segment of its own, and each
member's response follows as a segment that continues it (`segment_prefixes`), with positions
starting at the prompt's length. The member's first score comes from the prompt's last
position. The prompt's forward is then paid once per group, not once per sample; only an
engine whose attention reads `segment_prefixes` may be given such a batch.
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
    # per segment of `cu_seqlens`: the index of the prompt segment it continues, or -1; None when
    # no sequence shares its prompt (every segment is a whole sequence)
    segment_prefixes: list[int] | None = None

    @property
    def shares_prompts(self) -> bool:
        return self.segment_prefixes is not None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return len(self.score_offsets) - 1

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max().item()) if self.num_sequences else 0


def _check(ids: Sequence[int], response_start: int) -> None:
    if len(ids) < 2 or not 1 <= response_start < len(ids):
        raise ValueError(f"bad sequence: length {len(ids)}, response_start {response_start}")


# Shorter prompts are not shared: the tokens saved would not pay for the extra attention call
# per response segment (a whole-prompt scoring request, response_start 1, shares only a BOS).
MIN_SHARED_PROMPT_TOKENS = 8


def prompt_key(ids: Sequence[int], response_start: int) -> tuple[int, int] | None:
    """Equal for requests whose prompts can be shared (a hash: for routing and budgeting,
    where a collision only misjudges a batch's size; packing compares the tokens); None for a
    prompt too short to share."""
    if response_start < MIN_SHARED_PROMPT_TOKENS:
        return None
    return response_start, hash(tuple(ids[:response_start]))


def prompt_groups(sequences: Sequence[Sequence[int]], response_starts: Sequence[int]) -> list[list[int]]:
    """Indices of sequences with identical shareable prompts, groups in order of first
    appearance (every other sequence is a group of its own)."""
    groups: dict[tuple[int, ...] | int, list[int]] = {}
    for index, (ids, response_start) in enumerate(zip(sequences, response_starts)):
        key = tuple(ids[:response_start]) if response_start >= MIN_SHARED_PROMPT_TOKENS else index
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def prompt_group_runs(
    sequences: Sequence[Sequence[int]], response_starts: Sequence[int], max_cost: int
) -> tuple[list[list[int]], list[int]]:
    """Prompt groups, each cut into runs costing at most `max_cost` tokens packed with their
    prompt once (a run pays the prompt again; one sequence is never cut), and each run's cost."""
    runs: list[list[int]] = []
    costs: list[int] = []
    for group in prompt_groups(sequences, response_starts):
        prompt = response_starts[group[0]]
        run: list[int] = []
        cost = 0
        for index in group:
            extra = len(sequences[index]) - prompt
            if run and cost + extra > max_cost:
                runs.append(run)
                costs.append(cost)
                run, cost = [], 0
            cost += extra if run else len(sequences[index])
            run.append(index)
        runs.append(run)
        costs.append(cost)
    return runs, costs


class _Row:
    """The packed row under construction; scores are kept per sequence, in input order."""

    def __init__(self, count: int) -> None:
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.boundaries = [0]
        self.prefixes: list[int] = []
        self.scores: list[list[int]] = [[] for _ in range(count)]
        self.targets: list[Sequence[int]] = [() for _ in range(count)]

    def segment(self, ids: Sequence[int], first_position: int, prefix: int = -1) -> int:
        """Append a segment; returns its row offset."""
        offset = len(self.tokens)
        self.tokens.extend(ids)
        self.positions.extend(range(first_position, first_position + len(ids)))
        self.boundaries.append(len(self.tokens))
        self.prefixes.append(prefix)
        return offset

    def whole(self, index: int, ids: Sequence[int], response_start: int) -> None:
        """A sequence of its own: one segment, its scores from `response_start - 1` on."""
        offset = self.segment(ids[:-1], 0)
        self.scores[index] = list(range(offset + response_start - 1, offset + len(ids) - 1))
        self.targets[index] = ids[response_start:]

    def shared(self, members: list[int], sequences: Sequence[Sequence[int]], response_start: int) -> None:
        """The prompt once, then each member's response as a segment continuing it; a member's
        first score is read at the prompt's last position (a one-token response has no tail)."""
        prompt_offset = self.segment(sequences[members[0]][:response_start], 0)
        prompt_segment = len(self.prefixes) - 1
        for index in members:
            ids = sequences[index]
            tail = ids[response_start:-1]
            offset = self.segment(tail, response_start, prompt_segment) if tail else len(self.tokens)
            self.scores[index] = [prompt_offset + response_start - 1, *range(offset, offset + len(tail))]
            self.targets[index] = ids[response_start:]

    def batch(self, sharing: bool) -> PackedBatch:
        score_offsets = [0]
        for scores in self.scores:
            score_offsets.append(score_offsets[-1] + len(scores))
        return PackedBatch(
            input_ids=torch.tensor([self.tokens], dtype=torch.long),
            position_ids=torch.tensor([self.positions], dtype=torch.long),
            cu_seqlens=torch.tensor(self.boundaries, dtype=torch.int32),
            score_positions=torch.tensor([p for scores in self.scores for p in scores], dtype=torch.long),
            targets=torch.tensor([t for targets in self.targets for t in targets], dtype=torch.long),
            score_offsets=score_offsets,
            segment_prefixes=self.prefixes if sharing else None,
        )


def pack_sequences(
    sequences: Sequence[Sequence[int]], response_starts: Sequence[int], share_prompts: bool = False
) -> PackedBatch:
    """Pack token-id sequences (each of length >= 2, 1 <= response_start < length); with
    `share_prompts`, identical prompts are packed once (see the module docstring)."""
    if len(sequences) != len(response_starts):
        raise ValueError("one response_start per sequence is required")
    for ids, response_start in zip(sequences, response_starts):
        _check(ids, response_start)
    row = _Row(len(sequences))
    groups = prompt_groups(sequences, response_starts) if share_prompts else [[i] for i in range(len(sequences))]
    for members in groups:
        if len(members) == 1:
            row.whole(members[0], sequences[members[0]], response_starts[members[0]])
        else:
            row.shared(members, sequences, response_starts[members[0]])
    return row.batch(sharing=any(len(members) > 1 for members in groups))


def split_shared_by_token_budget(
    sequences: Sequence[Sequence[int]], response_starts: Sequence[int], token_budget: int
) -> list[list[int]]:
    """`split_by_token_budget` for batches packed with `share_prompts`: a prompt group costs its
    prompt once, and stays in one micro-batch unless it alone exceeds the budget (then it is cut
    into runs that fit, each paying the prompt again)."""
    runs, costs = prompt_group_runs(sequences, response_starts, token_budget)
    return [[index for item in group for index in runs[item]] for group in split_by_token_budget(costs, token_budget)]


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
