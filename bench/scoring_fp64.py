"""How far each fp32 path is from the truth: a float64 transformers forward of every sequence alone.

`max_abs_diff_vs_verl` compares two fp32 computations; both drift by ~1e-5 from exact arithmetic
(measured on the 6-layer toy as on 28-layer Qwen2.5-1.5B), so a gap between them says little
about which is right, and an exact path would sit as far from verl as verl sits from float64.
This anchors each path to a float64 reference (eager attention, full-vocab `log_softmax`, one
sequence at a time) on the same requests. transformers computes the rope angles in fp32 in every
dtype, so the reference shares that table with the fp32 paths and measures the arithmetic after
it. It needs 8 bytes per parameter on top of what is loaded, so it runs only when the machine
has that memory free (after the fp32 engines are closed); otherwise the figures say it was
skipped.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import psutil
import torch

from model_engine_server.protocol import LogProbRequest

HEADROOM = 1.25  # activations of one sequence, and the allocator's slack
ROWS_PER_CHUNK = 256  # float64 logits of this many positions at a time


@torch.no_grad()
def float64_log_probs(model_path: Path, requests: list[LogProbRequest]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float64, attn_implementation="eager", local_files_only=True
    ).eval()
    try:
        head = model.get_output_embeddings()
        outputs = []
        for request in requests:
            hidden = model.base_model(torch.tensor([request.input_ids])).last_hidden_state[0]
            predicting = hidden[request.response_start - 1 : -1]
            targets = torch.tensor(request.input_ids[request.response_start :])
            chunks = []
            for start in range(0, len(targets), ROWS_PER_CHUNK):
                logits = head(predicting[start : start + ROWS_PER_CHUNK]) / request.temperature
                rows = targets[start : start + ROWS_PER_CHUNK]
                chunks.append(torch.log_softmax(logits, dim=-1).gather(1, rows[:, None])[:, 0])
            outputs.append(torch.cat(chunks))
        return outputs
    finally:
        del model
        gc.collect()


def fits(num_parameters: int) -> bool:
    return psutil.virtual_memory().available > HEADROOM * 8 * num_parameters


def errors_vs_float64(
    model_path: Path, num_parameters: int, requests: list[LogProbRequest], paths: dict[str, list[torch.Tensor]]
) -> dict[str, Any]:
    """`max/p99/mean_abs_diff_vs_fp64` per path (`server`, `verl`, ...), or why it was not measured."""
    gc.collect()
    if not fits(num_parameters):
        needed = HEADROOM * 8 * num_parameters / 2**30
        available = psutil.virtual_memory().available / 2**30
        return {"fp64_reference": f"skipped: needs ~{needed:.1f} GiB free, {available:.1f} GiB was"}
    truth = float64_log_probs(model_path, requests)
    figures: dict[str, Any] = {}
    for name, values in paths.items():
        figures.update(distances(name, values, truth))
    return figures


def distances(name: str, values: list[torch.Tensor], truth: list[torch.Tensor]) -> dict[str, float]:
    """Max, p99 and mean |path - float64| over every scored token: the max is one token, and on a
    deep model two fp32 paths can each own the worst token of the other's comparison."""
    gaps = torch.cat([torch.zeros(0, dtype=torch.float64)]
                     + [(a.double() - b).abs().flatten() for a, b in zip(values, truth, strict=True)])
    if gaps.numel() == 0:
        return {}
    return {
        f"{name}_max_abs_diff_vs_fp64": gaps.max().item(),
        f"{name}_p99_abs_diff_vs_fp64": torch.quantile(gaps, 0.99).item(),
        f"{name}_mean_abs_diff_vs_fp64": gaps.mean().item(),
    }
