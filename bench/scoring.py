"""Scoring throughput: the server path against a trainer's recompute and a naive padded path.

On each measured model (below; first a ~100M-parameter toy with a 151,936-token vocabulary,
whose LM head costs as much as the body, as in real small policies), on an RL-like length mix,
timed side by side in one run:

- server: packed token-budget batches, LM head on response positions only, chunked log-probs;
- packed full logits: the same packing, full-vocab logits for every position, `log_softmax`, gather;
- padded: micro-batches of a fixed number of sequences, right-padded, full logits;
- verl: verl's own `TrainingWorker.infer_batch` (remove-padding, dynamic batch size with the same
  token budget, same dtype), fed as its trainer feeds it (`bench/scoring_verl.py`): the baseline
  a verl user compares against. Skipped, with a note, where verl is not installed;
- verl fused: the same worker on verl's fused-linear log-prob path (`use_fused_kernels`, its
  `torch` backend; figures `verl_fused_*`, `speedup_vs_verl_fused`). `speedup_vs_verl` stays
  against verl's plain path, its default and, on the CPUs measured, the faster of the two.

All paths must give the same log-probs; every path is warmed once, untimed, then each round
times every path once (each round starting one path later), rounds repeated, least of each kept. Model FLOP/s counts the forward from the architecture
(response-only LM head counted as such) over the dense GEMM FLOP/s measured in the same run.

Every measured shape runs unless `--shape` picks some: the toy, then the real model shapes
(`bench/shapes.py`: Qwen2.5-0.5B, -1.5B, full configs, random weights, fp32 only), each nested
under its key in the JSON; the toy stays at the top level. The real shapes' length mix is
scaled down to about `--max-tokens` tokens (default 4,096: the same requests, shorter; fewer
tokens, not a smaller model); `--quick` times that same mix once instead of best of 2. Every
shape also reports its FLOP split and the causes of its ratio to verl
(`bench/scoring_causes.py`), with `speedup_vs_verl_without_attention`: the ratio less the
attention factor, derived, and the GPU-relevant figure (verl runs flash-attn varlen there, so
that factor does not carry over). The run ends with predictions - labelled as such - for the
7B and 32B shapes (`bench/scoring_predict.py`). Every fp32 run, the toy's included, also reports
each path's distance from a float64 forward (`bench/scoring_fp64.py`).

`--group-size N` makes the mix GRPO-like: N sampled responses per prompt (verl's
`rollout.n`), the same length distribution otherwise. The server then packs each prompt once
per micro-batch; verl and the baselines score every sample whole, as they do.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench import scoring_causes, scoring_fp64, scoring_predict, scoring_verl, shapes
from bench.common import Target, alternating_best
from bench.flops import forward_flops, gemm_flops_per_s
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.cpu_heap import keep_freed_memory, release_free_memory
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.engines.hf import HFEngine
from model_engine_server.logprobs import full_logits_log_probs
from model_engine_server.packing import pack_sequences, split_by_token_budget
from model_engine_server.protocol import LogProbRequest
from model_engine_server.tiny_model import TinyModelShape

MODEL = shapes.TOY
TOKEN_BUDGET = 8192
PADDED_SEQUENCES_PER_BATCH = 2
TARGETS = [
    Target("speedup_vs_verl", ">=", 1.5),
    Target("max_abs_diff_vs_verl", "<=", 1e-5),
    Target("speedup_vs_padded", ">=", 2.0),
    Target("speedup_vs_packed", ">=", 1.1),
    Target("mfu", ">=", 0.6),
    Target("bf16_speedup_vs_padded", ">=", 2.0),
    Target("bf16_speedup_vs_packed", ">=", 1.1),
    Target("bf16_mfu", ">=", 0.5),
    Target("bf16_speedup_vs_verl", ">=", 1.5),
]
SHAPE_TARGETS = [Target("speedup_vs_verl", ">=", 1.5), Target("max_abs_diff_vs_verl", "<=", 1e-5),
                 Target("mfu", ">=", 0.6)]  # for every measured shape, under its key


@dataclass(frozen=True)
class Size:
    """How much one run scores. The model stays the benchmark's own for full and quick runs;
    `TEST_SIZE` exists only so the test suite can run the whole benchmark in seconds.
    The real shapes draw `real_shape_requests` requests, scaled to about `real_shape_tokens`
    tokens unless `--max-tokens` says otherwise (the toy's mix is never scaled). A quick run
    keeps the full run's real-shape mix and times it once: the 10-request mix scaled to the same
    tokens is another mix (a quarter as many sequences, each 4x as long), so it would measure
    something other than what the full run measures."""

    model: TinyModelShape
    requests: int
    repeats: int
    max_response: int = 4096
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    real_shape_requests: int = 40
    real_shape_tokens: int = 4096


FULL = Size(MODEL, requests=40, repeats=2)
QUICK = Size(MODEL, requests=10, repeats=1)
TEST_SIZE = Size(TinyModelShape(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2),
                 requests=3, repeats=1, max_response=64, dtypes=("float32",), real_shape_requests=4,
                 real_shape_tokens=300)


def rl_length_mix(
    count: int, vocab_size: int, seed: int = 0, max_response: int = 4096, group_size: int = 1
) -> list[LogProbRequest]:
    """Prompts of 64-512 tokens, responses log-uniform between 16 and `max_response` tokens;
    consecutive runs of `group_size` requests share their prompt (the last run may be shorter)."""
    rng = random.Random(seed)
    requests: list[LogProbRequest] = []
    prompt: list[int] = []
    for index in range(count):  # draws in the order of the unshared mix, which group size 1 keeps
        prompt_length = rng.randint(64, 512) if index % group_size == 0 else len(prompt)
        response = int(round(math.exp(rng.uniform(math.log(16), math.log(max_response)))))
        if index % group_size == 0:
            prompt = [rng.randrange(vocab_size) for _ in range(prompt_length)]
        ids = prompt + [rng.randrange(vocab_size) for _ in range(response)]
        requests.append(LogProbRequest(request_id=str(index), input_ids=ids, response_start=len(prompt), temperature=0.9))
    return requests


@torch.inference_mode()
def packed_full_logits(
    engine: HFEngine, requests: list[LogProbRequest], token_budget: int = TOKEN_BUDGET
) -> list[torch.Tensor]:
    """Per request, in request order (the budget's first-fit groups are not in order)."""
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(requests)
    for group in split_by_token_budget([r.num_tokens for r in requests], token_budget):
        chosen = [requests[i] for i in group]
        batch = pack_sequences([r.input_ids for r in chosen], [r.response_start for r in chosen])
        hidden = engine.hidden_states(batch)  # every position, as a trainer's forward returns
        row_targets = torch.cat([torch.tensor(r.input_ids[1:]) for r in chosen]).to(hidden.device)
        temperatures = torch.full((hidden.shape[0],), chosen[0].temperature, device=hidden.device)
        log_probs, _ = full_logits_log_probs(hidden, engine.lm_head().weight, row_targets, temperatures,
                                             want_entropy=False)  # the server path is timed without it too
        scored = log_probs.index_select(0, batch.score_positions.to(hidden.device)).cpu().split(
            [r.num_response_tokens for r in chosen])  # on the CPU, as the server's outputs are
        for index, values in zip(group, scored):
            outputs[index] = values
    return outputs


@torch.inference_mode()
def padded_full_logits(engine: HFEngine, requests: list[LogProbRequest]) -> list[torch.Tensor]:
    """Padded rows need a padding mask: transformers' own SDPA path, as a trainer would run."""
    packed_attention = engine.model.config._attn_implementation
    engine.model.set_attn_implementation("sdpa")
    try:
        return _padded_full_logits(engine, requests)
    finally:
        engine.model.set_attn_implementation(packed_attention)


def _padded_full_logits(engine: HFEngine, requests: list[LogProbRequest]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    padded_tokens = 0
    for start in range(0, len(requests), PADDED_SEQUENCES_PER_BATCH):
        chosen = requests[start : start + PADDED_SEQUENCES_PER_BATCH]
        width = max(r.num_tokens for r in chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        mask = torch.zeros(len(chosen), width, dtype=torch.long)
        for row, request in enumerate(chosen):
            ids[row, : request.num_tokens] = torch.tensor(request.input_ids)
            mask[row, : request.num_tokens] = 1
        padded_tokens += ids.numel()
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        hidden = engine.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        temperatures = torch.full((targets.shape[0],), chosen[0].temperature, device=engine.device)
        log_probs, _ = full_logits_log_probs(flat_hidden, engine.lm_head().weight, targets, temperatures,
                                             want_entropy=False)
        log_probs = log_probs.view(len(chosen), width - 1).cpu()  # on the CPU, as the server's outputs are
        outputs.extend(log_probs[row, r.response_start - 1 : r.num_tokens - 1] for row, r in enumerate(chosen))
    padded_full_logits.padded_tokens = padded_tokens  # type: ignore[attr-defined]
    return outputs


def _paths(engine: HFEngine, verl: "scoring_verl.VerlEngine | None", adapter: ModelEngineServerAdapter,
           requests: list[LogProbRequest]) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Every timed path on `requests`, each giving CPU log-probs (the server's outputs are
    numpy arrays; on CUDA the others copy theirs back, so every comparison is on one device)."""
    steps: dict[str, Callable[[], list[torch.Tensor]]] = {
        "server": lambda: [torch.from_numpy(o.log_probs) for o in adapter.score(requests)],
        "packed": lambda: packed_full_logits(engine, requests),
        "padded": lambda: padded_full_logits(engine, requests),
    }
    if verl is not None:
        steps["verl"] = lambda: scoring_verl.verl_recompute(verl, requests)
        steps["verl_fused"] = lambda: scoring_verl.verl_recompute(verl, requests, fused=True)
    return steps


def _measure(
    engine: HFEngine, verl: "scoring_verl.VerlEngine | None", requests: list[LogProbRequest], repeats: int, prefix: str
) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    """The figures, and the server's and verl's log-probs (for the float64 anchor)."""
    adapter = ModelEngineServerAdapter(engine, TOKEN_BUDGET)
    total_tokens = sum(r.num_tokens for r in requests)
    for warm_up in _paths(engine, verl, adapter, requests[:2]).values():
        warm_up()  # every path once, untimed: first-call allocations, thread pools, kernels
    steps = _paths(engine, verl, adapter, requests)
    # Each path starts from a trimmed heap: under a kept heap, the full-logits paths' freed
    # blocks (5-6 GB each, of other sizes than the next path's) stayed resident and a quick toy
    # run was OOM-killed at 24 GiB. Within a call, a path still reuses its own freed blocks.
    timed = alternating_best(steps, repeats, between=release_free_memory)
    server_s, server = timed["server"]
    agreement = max(scoring_verl.agreement(server, timed[name][1]) for name in ("packed", "padded"))
    work = [item for batch in adapter.micro_batches(requests)  # what the server path has to compute
            for item in scoring_predict.server_work([requests[i] for i in batch], adapter.share_prompts)]
    flops = forward_flops(engine.model.config, work)
    gemm = gemm_flops_per_s(engine.spec.torch_dtype())
    figures: dict[str, Any] = {
        "tokens_per_s": total_tokens / server_s,
        "packed_full_logits_tokens_per_s": total_tokens / timed["packed"][0],
        "padded_tokens_per_s": total_tokens / timed["padded"][0],
        "speedup_vs_packed": timed["packed"][0] / server_s,
        "speedup_vs_padded": timed["padded"][0] / server_s,
        "padding_fraction": 1 - total_tokens / padded_full_logits.padded_tokens,  # type: ignore[attr-defined]
        "model_flops_per_s": flops / server_s,
        "gemm_flops_per_s": gemm,
        "mfu": flops / server_s / gemm,
        "max_abs_diff_between_paths": agreement,
    }
    outputs = {"server": server}
    if verl is None:
        figures.update(scoring_verl.skipped_figures(""))
    else:
        verl_s, outputs["verl"] = timed["verl"]
        figures["verl_tokens_per_s"] = total_tokens / verl_s
        figures["speedup_vs_verl"] = verl_s / server_s
        # the ratio if the server's FLOPs ran at the square-GEMM rate measured in this run: a
        # reference, not a bound (CPU MFU has exceeded 1: the model's GEMMs can run faster than
        # the one square shape timed)
        figures["speedup_vs_verl_at_gemm_rate"] = figures["speedup_vs_verl"] / figures["mfu"]
        figures["max_abs_diff_vs_verl"] = scoring_verl.agreement(server, outputs["verl"])
        verl_fused_s, verl_fused = timed["verl_fused"]
        figures["verl_fused_backend"] = scoring_verl.FUSED_BACKEND
        figures["verl_fused_tokens_per_s"] = total_tokens / verl_fused_s
        figures["speedup_vs_verl_fused"] = verl_fused_s / server_s
        figures["max_abs_diff_vs_verl_fused"] = scoring_verl.agreement(server, verl_fused)
        figures["verl_fused_vs_plain_max_abs_diff"] = scoring_verl.agreement(outputs["verl"], verl_fused)
    figures.update(repacking_drift(engine, verl, requests, outputs))
    return {f"{prefix}{key}": value for key, value in figures.items()}, outputs


def repacking_drift(engine: HFEngine, verl: "scoring_verl.VerlEngine | None", requests: list[LogProbRequest],
                    outputs: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """How far each path's own numbers move when only its micro-batch packing changes (the
    same requests at half the budget or half their tokens, whichever is less, so at least two
    micro-batches; untimed): the floor under `max_abs_diff_vs_verl`, which compares two
    packings of two computations. verl attends over the whole packed row, so a sequence's place
    in it changes its rounding; the server attends per sequence, and moves only as far as its
    GEMMs round another row count differently."""
    half = min(TOKEN_BUDGET, sum(r.num_tokens for r in requests)) // 2
    budget = max(half, max(r.num_tokens for r in requests))  # every request still fits
    # Smaller batches could carve new blocks out of a kept heap that the timed passes left in
    # pieces. At 1.5B, with verl's model beside ours, used memory peaked at 22.6 of 23.6 GiB
    # (14.2 since the baselines stopped computing entropy), and one run without these trims was
    # OOM-killed in that phase (where in it is not known).
    release_free_memory()
    repacked = ModelEngineServerAdapter(engine, budget).score(requests)
    drift = {"server_repacked_max_abs_diff": scoring_verl.agreement(
        outputs["server"], [torch.from_numpy(o.log_probs) for o in repacked])}
    if verl is not None:
        again = scoring_verl.verl_recompute(verl, requests, token_budget=budget)
        drift["verl_repacked_max_abs_diff"] = scoring_verl.agreement(outputs["verl"], again)
    release_free_memory()
    return drift


def scale_to_tokens(requests: list[LogProbRequest], max_tokens: int | None) -> list[LogProbRequest]:
    """The same requests with prompt and response each shortened by one factor, so the set has
    about `max_tokens` tokens (at least 4 of each per request); unchanged when it fits already."""
    total = sum(r.num_tokens for r in requests)
    if max_tokens is None or total <= max_tokens:
        return requests
    factor = max_tokens / total
    scaled = []
    for r in requests:
        prompt = max(4, round(r.response_start * factor))
        response = max(4, round(r.num_response_tokens * factor))
        ids = r.input_ids[:prompt] + r.input_ids[r.response_start : r.response_start + response]
        scaled.append(r.model_copy(update={"input_ids": ids, "response_start": prompt}))
    return scaled


def _request_figures(requests: list[LogProbRequest]) -> dict[str, Any]:
    return {"requests": len(requests), "tokens": sum(r.num_tokens for r in requests),
            "response_tokens": sum(r.num_response_tokens for r in requests)}


def _measure_dtype(path: Path, dtype: str, requests: list[LogProbRequest], repeats: int) -> dict[str, Any]:
    """Every path in one dtype on freshly loaded engines; in fp32 also the causes of the ratio
    and each path's distance from a float64 forward (the toy's too: what an exact path would
    measure against verl is verl's own distance from it)."""
    prefix = "" if dtype == "float32" else "bf16_"
    engine = build_engine("hf", EngineSpec(model_path=str(path), dtype=dtype))
    verl = scoring_verl.build_verl(str(path), dtype, TOKEN_BUDGET) if scoring_verl.verl_available() else None
    try:
        figures: dict[str, Any] = {"parameters": engine.info.num_parameters}
        measured, outputs = _measure(engine, verl, requests, repeats, prefix)  # type: ignore[arg-type]
        figures.update(measured)
        if dtype == "float32":
            figures.update(scoring_causes.measure_causes(engine, requests, TOKEN_BUDGET, repeats))  # type: ignore[arg-type]
    finally:
        if verl is not None:
            verl.close()
    del engine, verl  # the float64 model needs their memory
    release_free_memory()  # and a kept heap would keep it
    if dtype == "float32":
        figures.update(scoring_fp64.errors_vs_float64(path, figures["parameters"], requests, outputs))
    return figures


def shape_requests(name: str, size: Size, max_tokens: int | None, group_size: int = 1) -> list[LogProbRequest]:
    """The mix shape `name` scores at this size: the toy's own, a real shape's scaled to
    `max_tokens` (None: the size's `real_shape_tokens`). The report reads it too, to tell a
    record made with another mix than today's command draws (`bench/report_scoring.py`)."""
    real = shapes.MEASURED[name]
    vocab_size = size.model.vocab_size if real is None else real.vocab_size
    count = size.requests if real is None else size.real_shape_requests
    requests = rl_length_mix(count, vocab_size, max_response=size.max_response, group_size=group_size)
    return requests if real is None else scale_to_tokens(requests, max_tokens or size.real_shape_tokens)


def measure_shape(name: str, size: Size, max_tokens: int | None, folder: Path, group_size: int = 1) -> dict[str, Any]:
    """One shape's figures: the toy in every dtype of the size on its own mix, a real shape in
    fp32 on the mix scaled to `max_tokens` (None: the size's `real_shape_tokens`)."""
    toy = shapes.MEASURED[name] is None
    requests = shape_requests(name, size, max_tokens, group_size)
    path = shapes.make_model(name, folder, toy=size.model)
    figures: dict[str, Any] = {"shape": name, "group_size": group_size, **_request_figures(requests)}
    figures.update(scoring_predict.flop_figures(_hf_config(path), requests))
    for dtype in size.dtypes if toy else ("float32",):
        figures.update(_measure_dtype(path, dtype, requests, size.repeats))
    rest = scoring_causes.rest_factor(figures)
    if rest is not None:
        figures["factor_rest"] = rest
    without_attention = scoring_causes.without_attention(figures)
    if without_attention is not None:  # derived: the part of the lead that a GPU's verl leaves
        figures["speedup_vs_verl_without_attention"] = without_attention
    return figures


def _hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def targets(figures: dict[str, Any]) -> list[Target]:
    """The toy's targets where the toy ran, and `SHAPE_TARGETS` under every measured shape's key."""
    chosen = list(TARGETS) if "tokens_per_s" in figures else []
    for name in shapes.MEASURED:
        key = shapes.shape_key(name)
        if key and key in figures:
            chosen += [Target(f"{key}.{t.key}", t.op, t.threshold, t.factor) for t in SHAPE_TARGETS]
    return chosen


def _prediction_source(figures: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The largest measured shape with verl's figures (its component rates feed the predictions)."""
    for name in reversed(list(shapes.MEASURED)):
        key = shapes.shape_key(name)
        measured = figures.get(key) if key else figures
        if measured and "verl_tokens_per_s" in measured:
            return measured, name
    return None, None


def run(quick: bool = False, shape: list[str] | None = None, max_tokens: int | None = None,
        group_size: int = 1, cpu_heap: str = "keep") -> dict[str, Any]:
    """Every requested shape (default: every measured one) at the run's size; sizes are module
    attributes so a test can swap in `TEST_SIZE`. `cpu_heap="keep"` runs every path, verl's too, with freed
    memory kept in the heap, as a server's own process runs (`model_engine_server/cpu_heap.py`);
    it lasts for the rest of the process."""
    size = QUICK if quick else FULL
    torch.manual_seed(0)
    kept = cpu_heap == "keep" and keep_freed_memory()
    figures: dict[str, Any] = {"torch_threads": torch.get_num_threads(),  # every path, verl's included, in-process
                               "cpu_heap": "keep" if kept else "system"}
    for name in shape or list(shapes.MEASURED):
        with tempfile.TemporaryDirectory(prefix="bench-scoring-") as folder:  # a 1.5B checkpoint is 6 GB
            measured = measure_shape(name, size, max_tokens, Path(folder), group_size)
        release_free_memory()  # the next shape starts from what it needs, not this one's peak
        shapes.place(figures, name, measured)
    measured, source = _prediction_source(figures)
    full_mix = rl_length_mix(FULL.requests, 151_936, max_response=FULL.max_response, group_size=group_size)
    figures.update(scoring_predict.predictions(full_mix, measured, source, TOKEN_BUDGET))
    return figures
