"""The server fields of a verl `DataProto` batch, read back on the v0 (DataProto) trainer side.

verl's `AgentLoopWorker._postprocess` turns every key of `AgentLoopOutput.extra_fields` into a
`non_tensor_batch` column (an object array, one entry per sample), so the fields the scoring
agent loop attached arrive as columns named after `server_fields`. The batch's tensors keep
verl's layout: prompts left-padded, responses right-padded, `attention_mask` over both, so a
sample's response length is the number of ones in the response part of its attention mask
(tool tokens included: their `response_mask` is 0, but they are part of the response the model
reads, and verl's own recompute returns a value for them too).

A batch without the columns (the scoring agent loop did not run) reads as "not scored by the
server" for every sample, which the trainer's `on_missing` rule then handles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from verl import DataProto

from clients.verl import server_fields as sf


@dataclass(frozen=True)
class ServerColumns:
    """What the trainer reads of one batch to decide where each row's numbers come from."""

    samples: list[sf.SampleScores]
    response_lengths: list[int]
    names: list[str]  # "uid (row i)": the uid the rollouter gives a prompt is shared by its n responses
    width: int  # the padded response width, (bsz, width) is verl's layout

    @classmethod
    def of(cls, batch: DataProto) -> "ServerColumns":
        prompt_width = int(batch.batch["prompts"].shape[1])
        lengths = batch.batch["attention_mask"][:, prompt_width:].sum(dim=1).tolist()
        return cls(
            samples=[sf.SampleScores.from_fields(fields) for fields in _row_fields(batch)],
            response_lengths=[int(n) for n in lengths],
            names=sample_names(batch),
            width=int(batch.batch["responses"].shape[1]),
        )

    def padded(self, attribute: str, rows: Sequence[int]) -> torch.Tensor:
        """`(bsz, width)` float32: `attribute` of the samples in `rows`, exact zeros elsewhere and
        past each response."""
        wanted = set(rows)
        return sf.pad_rows([getattr(s, attribute) if row in wanted else None for row, s in enumerate(self.samples)],
                           self.width)

    def versions(self) -> list[int | None]:
        return [sample.version for sample in self.samples]


def _row_fields(batch: DataProto) -> list[dict[str, Any]]:
    columns = {name: batch.non_tensor_batch[name] for name in sf.FIELDS if name in batch.non_tensor_batch}
    return [{name: column[row] for name, column in columns.items()} for row in range(len(batch))]


def sample_names(batch: DataProto) -> list[str]:
    """How messages name each row: its uid and row, or the row alone."""
    uids = batch.non_tensor_batch.get("uid")
    if uids is None:
        return [f"row {row}" for row in range(len(batch))]
    return [f"{uid} (row {row})" for row, uid in enumerate(uids)]


def token_ids(batch: DataProto, rows: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Unpadded prompt and response ids of `rows` (what the server scores)."""
    prompts, responses = batch.batch["prompts"], batch.batch["responses"]
    prompt_width = int(prompts.shape[1])
    mask = batch.batch["attention_mask"].bool()
    prompt_ids, response_ids = [], []
    for row in rows:
        prompt_ids.append(prompts[row][mask[row, :prompt_width]].tolist())
        response_ids.append(responses[row][mask[row, prompt_width:]].tolist())
    return prompt_ids, response_ids


def result_rows(results: Sequence[Any], rows: Sequence[int], attribute: str, bsz: int, width: int) -> torch.Tensor:
    """`(bsz, width)` float32 holding `attribute` of each result at its row, zeros elsewhere."""
    values: list[Any] = [None] * bsz
    for row, result in zip(rows, results, strict=True):
        values[row] = getattr(result, attribute)
    return sf.pad_rows(values, width)


def rows_only(mask: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """`mask` with every row outside `rows` zeroed (metrics over some rows only)."""
    keep = torch.zeros(mask.shape[0], 1, dtype=mask.dtype)
    keep[list(rows)] = 1
    return mask * keep
