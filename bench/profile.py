"""Where the time of one scoring batch goes: `torch.profiler` over the server path, summarised.

`python -m bench.profile [--quick] [--json FILE]`, or `python -m bench profile`. The batch is the
scoring benchmark's first token-budget batch (its model, its RL length mix, 8,192 tokens),
scored by `ModelEngineServerAdapter.score` after an unprofiled warm-up of the same batch, in
fp32 and in bf16 (`bf16_` keys). `--shape qwen2.5-1.5b` profiles that real shape (repeatable;
`--shape toy` is the default above), in fp32 on the full scoring mix (40 requests) scaled to
`--max-tokens` (default 4,096) as `bench scoring` scales it, under the shape's key.
Shares of the batch's wall time, which sum to 1:

- `matmul_share`: aten::mm/addmm/bmm/matmul/linear and what runs under them, outside attention:
  the body's projections and MLP, and the LM head (its part alone: `lm_head_matmul_share`);
- `attention_share`: scaled_dot_product_attention and everything under it;
- `logprob_share`: the chunked log-prob routine (`record_function("logprobs")` in
  `model_engine_server/logprobs.py`) less its LM-head matmuls: max, exp, sums, gather, and
  the chunk loop's own Python;
- `packing_share`: `record_function("packing")` in the adapter: building the packed row and
  the per-token temperatures, Python included;
- `other_share`: every other op (embedding, norms, activations, rotary, copies, concatenation);
- `python_share`: the rest, wall time spent in no op: the model modules' Python, the adapter's
  splitting of results per request, the profiler's own bookkeeping.

`matmul_fraction_of_gemm_rate`: the matmuls' own FLOP rate (linear layers and LM head, counted
from the architecture, over their profiled time) against a square GEMM measured in the same run.

On CUDA the op times are the kernels' device times, so `python_share` is the GPU's idle time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench import shapes
from bench.common import fixed_targets
from bench.flops import gemm_flops_per_s, linear_flops
from bench.scoring import FULL, MODEL, TOKEN_BUDGET, rl_length_mix, scale_to_tokens
from bench.scoring_predict import server_work
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.cpu_heap import keep_freed_memory
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.packing import split_by_token_budget
from model_engine_server.protocol import LogProbRequest

BATCH_RANGE = "scoring_batch"
LOGPROB_RANGE = "logprobs"  # the labels model_engine_server puts around its own steps
PACKING_RANGE = "packing"
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                        "aten::addmv", "aten::mv", "aten::_addmm_activation"})
CATEGORIES = ("matmul", "attention", "logprob", "packing", "other")
TOP_OPS = 12
REQUESTS_DRAWN = 40  # the scoring benchmark's full request set; its first batch is profiled
TARGETS: list[Any] = []  # a profile informs; it promises nothing
targets = fixed_targets(TARGETS)


@dataclass(frozen=True)
class OpTime:
    """One profiled event: its own time (children excluded) and the events it ran inside."""

    name: str
    self_us: float
    ancestors: tuple[str, ...]  # outermost first
    is_range: bool = False  # a `record_function` label rather than an op


def is_attention(name: str) -> bool:
    lowered = name.lower()
    return "scaled_dot_product" in lowered or "attention" in lowered or "flash_attn" in lowered


def categorise(op: OpTime) -> str:
    """The category an op's own time belongs to; attention wins over matmul (its math path
    runs bmm), matmul over the labelled ranges (the LM head runs inside `logprobs`)."""
    names = (*op.ancestors, op.name)
    if op.is_range:
        return {LOGPROB_RANGE: "logprob", PACKING_RANGE: "packing"}.get(op.name, "python")
    if any(is_attention(name) for name in names):
        return "attention"
    if any(name in MATMUL_OPS for name in names):
        return "matmul"
    if LOGPROB_RANGE in op.ancestors:
        return "logprob"
    if PACKING_RANGE in op.ancestors:
        return "packing"
    return "other"


def summarise(ops: Iterable[OpTime], wall_us: float, top: int = TOP_OPS) -> dict[str, Any]:
    """Shares of `wall_us` per category, `python_share` the remainder, and the top ops by own time
    (per op name and category).

    A label's own time (the Python between the ops inside it) counts for its category; the
    outer batch label's own time is left to `python_share`."""
    if wall_us <= 0:
        raise ValueError("wall time must be positive")
    totals = dict.fromkeys(CATEGORIES, 0.0)
    lm_head_us = 0.0
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])  # (name, category) -> calls, us
    for op in ops:
        category = categorise(op)
        if category in totals:
            totals[category] += op.self_us
        if category == "matmul" and LOGPROB_RANGE in op.ancestors:
            lm_head_us += op.self_us
        if not op.is_range:
            by_op[op.name, category][0] += 1
            by_op[op.name, category][1] += op.self_us
    shares = {f"{category}_share": total / wall_us for category, total in totals.items()}
    shares["python_share"] = 1.0 - sum(shares.values())
    ranked = sorted(by_op.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return {
        **shares,
        "lm_head_matmul_share": lm_head_us / wall_us,
        "top_ops": {  # an op that runs in two categories (aten::max in log-probs and elsewhere) has two rows
            f"{name} ({category})": f"{us / wall_us:.1%} of wall, {int(calls)} calls, {us / 1000:,.1f} ms"
            for (name, category), (calls, us) in ranked
        },
    }


def op_times(events: Iterable[Any], device_time: bool = False) -> list[OpTime]:
    """`OpTime`s from `torch.profiler` events (CPU-side events; on CUDA their kernels' time)."""
    ops = []
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        labels = (BATCH_RANGE, LOGPROB_RANGE, PACKING_RANGE)
        is_range = bool(getattr(event, "is_user_annotation", False)) or event.name in labels
        self_us = event.self_cpu_time_total
        if device_time and event.name != PACKING_RANGE:  # the GPU's view: kernel time; packing runs
            self_us = 0.0 if is_range else event.self_device_time_total  # before any kernel, GPU idle
        ops.append(OpTime(event.name, float(self_us), tuple(reversed(ancestors)), is_range))
    return ops


def profiled_score(
    adapter: ModelEngineServerAdapter, requests: Sequence[LogProbRequest]
) -> tuple[list[OpTime], float, float]:
    """Score `requests` under the profiler: (op times, wall us of the batch label, wall s outside)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        with record_function(BATCH_RANGE):
            adapter.score(requests)
            if cuda:
                torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    events = profiler.events()
    batch_us = next(float(e.cpu_time_total) for e in events if e.name == BATCH_RANGE)
    return op_times(events, device_time=cuda), batch_us, wall_s


def first_batch(requests: Sequence[LogProbRequest], token_budget: int) -> list[LogProbRequest]:
    """The first micro-batch the adapter forms from `requests`."""
    group = split_by_token_budget([r.num_tokens for r in requests], token_budget)[0]
    return [requests[i] for i in group]


def profile_batch(model_path: str, dtype: str, batch: Sequence[LogProbRequest], token_budget: int,
                  time_unprofiled: bool) -> dict[str, Any]:
    """The summary of one profiled batch on a freshly loaded engine."""
    engine = build_engine("hf", EngineSpec(model_path=model_path, dtype=dtype))
    adapter = ModelEngineServerAdapter(engine, token_budget)
    adapter.score(batch)  # warm-up: first-call allocations and kernel choices are not the steady state
    figures: dict[str, Any] = {}
    if time_unprofiled:
        start = time.perf_counter()
        adapter.score(batch)
        figures["unprofiled_wall_s"] = time.perf_counter() - start
    ops, batch_us, wall_s = profiled_score(adapter, batch)
    figures["wall_s"] = wall_s
    figures["profiled_events"] = len(ops)
    figures.update(summarise(ops, batch_us))
    figures.update(matmul_rate(engine, adapter, batch, figures["matmul_share"] * batch_us / 1e6))
    return figures


def matmul_rate(engine: Any, adapter: ModelEngineServerAdapter, batch: Sequence[LogProbRequest],
                matmul_s: float) -> dict[str, float]:
    """The profiled matmuls' own FLOP rate (linear layers and LM head, counted from the
    architecture) against a square GEMM of the same dtype measured now: how much of the batch's
    GEMM work still runs below the machine's rate, apart from everything that is not a GEMM."""
    work = [item for group in adapter.micro_batches(list(batch))
            for item in server_work([batch[i] for i in group], adapter.share_prompts)]
    flops = linear_flops(engine.model.config, work)
    if matmul_s <= 0:  # no matmul time seen (a profiler that recorded none): no rate to state
        return {"matmul_flops": flops, "matmul_s": matmul_s}
    gemm = gemm_flops_per_s(engine.spec.torch_dtype())
    return {"matmul_flops": flops, "matmul_s": matmul_s, "matmul_flops_per_s": flops / matmul_s,
            "gemm_flops_per_s": gemm, "matmul_fraction_of_gemm_rate": flops / matmul_s / gemm}


def profile_shape(name: str, quick: bool, max_tokens: int | None) -> dict[str, Any]:
    """The first batch of the scoring benchmark's full mix on shape `name`: the toy in fp32 and
    bf16 (`bf16_` keys), a real shape in fp32 on the mix scaled to `max_tokens` (None: as a
    full `bench scoring` run scales it)."""
    real = shapes.MEASURED[name]
    requests = rl_length_mix(REQUESTS_DRAWN, MODEL.vocab_size if real is None else real.vocab_size)
    scaled = requests if real is None else scale_to_tokens(requests, max_tokens or FULL.real_shape_tokens)
    batch = first_batch(scaled, TOKEN_BUDGET)
    figures: dict[str, Any] = {
        "batch_requests": len(batch),
        "batch_tokens": sum(r.num_tokens for r in batch),
        "batch_response_tokens": sum(r.num_response_tokens for r in batch),
    }
    dtypes = (("float32", ""), ("bfloat16", "bf16_")) if real is None else (("float32", ""),)
    with tempfile.TemporaryDirectory() as folder:
        path = str(shapes.make_model(name, Path(folder)))
        for dtype, prefix in dtypes:
            summary = profile_batch(path, dtype, batch, TOKEN_BUDGET, time_unprofiled=not quick)
            figures.update({f"{prefix}{key}": value for key, value in summary.items()})
    return figures


def run(quick: bool = False, shape: list[str] | None = None, max_tokens: int | None = None,
        cpu_heap: str = "keep") -> dict[str, Any]:
    """Each requested shape (default: the toy, at the top level; real shapes under their key);
    `quick` skips the unprofiled timing (the profiler's cost). `cpu_heap="keep"` keeps freed
    memory in the heap for the rest of the process, as the server's process and `bench
    scoring` run (without it every activation's fresh pages fault in, inside the timed ops)."""
    torch.manual_seed(0)
    kept = cpu_heap == "keep" and keep_freed_memory()
    figures: dict[str, Any] = {"device": "cuda" if torch.cuda.is_available() else "cpu",
                               "torch_threads": torch.get_num_threads(), "cpu_heap": "keep" if kept else "system"}
    for name in shape or ["toy"]:
        shapes.place(figures, name, profile_shape(name, quick, max_tokens))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no unprofiled timing run")
    parser.add_argument("--json", type=Path, help="write the record here (as `python -m bench profile --json` does)")
    parser.add_argument("--shape", action="append", choices=list(shapes.MEASURED), help="repeatable (default: toy)")
    parser.add_argument("--max-tokens", type=int, help="scale the real shapes' length mix to ~this many tokens (default: 4096)")
    parser.add_argument("--cpu-heap", choices=["keep", "system"], help="keep freed CPU memory for reuse (default)")
    args = parser.parse_args(argv)
    from bench.__main__ import print_record, run_benchmark

    record = run_benchmark("profile", args.quick, shape=args.shape, max_tokens=args.max_tokens, cpu_heap=args.cpu_heap)
    record["command"] = "python -m bench.profile " + shlex.join(sys.argv[1:] if argv is None else argv)
    print_record(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
