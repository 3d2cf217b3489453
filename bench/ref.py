"""Reference mode: one call asking for old AND ref log-probs against each alone, in one run.

The server built from its config with `enable_ref_mode` hosts the policy and the frozen
reference on replicas of their own (here two in-process replicas: an engine each, on a thread
each). Timed side by side, rounds interleaved, least of each kept:

- `policy_only_s`: a call of N trajectories for old log-probs (+ entropy) only;
- `ref_only_s`: the same call sent to the reference service alone;
- `both_s`: the same call with `return_ref_log_probs`, answered as one result per trajectory.

Concurrency is read from the results themselves: each half's compute interval (queue wait ->
end of its batch, from the result's `timings`, both measured from the same submission) and
how much of the shorter one the other covers (`overlap_fraction`, 1 = fully concurrent, 0 =
one after the other). On a CPU the two replicas share the cores, so `both_s` is near
`policy_only_s + ref_only_s` even though they run at the same time; on separate devices it
approaches the slower of the two. The results of `both` must equal each alone.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Target, fixed_targets
from model_engine_server.config import load_config
from model_engine_server.launch import build_service
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.reference import PolicyWithReference
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model

MODEL = TinyModelShape(
    arch="qwen2", vocab_size=32_768, hidden_size=256, intermediate_size=768, num_layers=4,
    num_heads=4, num_kv_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)
SECTION = "model_engine_server"
TARGETS = [
    Target("overlap_fraction", ">=", 0.5),
    Target("both_s", "<=", "sequential_s", 1.1),  # never slower than scoring one after the other
    Target("max_abs_diff_log_probs", "<=", 1e-5),
    Target("max_abs_diff_ref_log_probs", "<=", 1e-5),
]
targets = fixed_targets(TARGETS)


def trajectories(count: int, length: int, vocab_size: int, seed: int = 0) -> list[LogProbRequest]:
    """`count` sequences of `length` tokens, the last three quarters of each a response."""
    rng = random.Random(seed)
    return [
        LogProbRequest(request_id=f"t{index}", input_ids=[rng.randrange(vocab_size) for _ in range(length)],
                       response_start=length // 4, temperature=0.9, return_entropy=True)
        for index in range(count)
    ]


def compute_window(results: list[LogProbResult], prefix: str = "") -> tuple[float, float]:
    """[first compute start, last compute end] of one half, in ms after the call was submitted."""
    starts = [r.timings[f"{prefix}queue_ms"] for r in results]
    ends = [r.timings[f"{prefix}queue_ms"] + r.timings[f"{prefix}compute_ms"] for r in results]
    return min(starts), max(ends)


def overlap_fraction(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Share of the shorter interval that the other covers."""
    shorter = min(a[1] - a[0], b[1] - b[0])
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / shorter if shorter > 0 else 0.0


async def _timed(call) -> tuple[float, list[LogProbResult]]:  # call: () -> awaitable outcomes
    started = time.perf_counter()
    outcomes = await call()
    elapsed = time.perf_counter() - started
    failed = [o for o in outcomes if not isinstance(o, LogProbResult)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return elapsed, outcomes


async def _measure(service: PolicyWithReference, requests: list[LogProbRequest], rounds: int) -> dict[str, Any]:
    assert service.reference is not None
    with_ref = [r.model_copy(update={"return_ref_log_probs": True}) for r in requests]
    calls = {
        "policy_only": lambda: service.score(requests),
        "ref_only": lambda: service.reference.score(requests),  # type: ignore[union-attr]
        "both": lambda: service.score(with_ref),
    }
    for call in calls.values():  # warm-up: first-call allocations, thread start
        await _timed(call)
    best: dict[str, tuple[float, list[LogProbResult]]] = {}
    names = list(calls)
    for round_index in range(rounds):
        for name in names[round_index % 3:] + names[: round_index % 3]:  # rotate the order each round
            elapsed, results = await _timed(calls[name])
            if name not in best or elapsed < best[name][0]:
                best[name] = (elapsed, results)
    both = best["both"][1]
    policy_window, ref_window = compute_window(both), compute_window(both, "ref_")
    diff = lambda xs, ys: max(float(np.abs(x - y).max()) for x, y in zip(xs, ys))  # noqa: E731
    policy_only_s, ref_only_s, both_s = best["policy_only"][0], best["ref_only"][0], best["both"][0]
    return {
        "policy_only_s": policy_only_s,
        "ref_only_s": ref_only_s,
        "both_s": both_s,
        "sequential_s": policy_only_s + ref_only_s,
        "both_vs_sequential": both_s / (policy_only_s + ref_only_s),
        "both_vs_slowest": both_s / max(policy_only_s, ref_only_s),
        "policy_compute_window_ms": [round(v, 2) for v in policy_window],
        "ref_compute_window_ms": [round(v, 2) for v in ref_window],
        "overlap_fraction": overlap_fraction(policy_window, ref_window),
        "max_abs_diff_log_probs": diff([r.log_probs for r in both], [r.log_probs for r in best["policy_only"][1]]),
        "max_abs_diff_ref_log_probs": diff([r.ref_log_probs for r in both], [r.log_probs for r in best["ref_only"][1]]),
    }


async def _run(quick: bool) -> dict[str, Any]:
    count, length, rounds = (4, 256, 3) if quick else (8, 512, 5)
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as folder:
        model_dir = make_tiny_model(Path(folder) / "policy", MODEL, seed=0)
        config = load_config(None, [
            f"{SECTION}.model_path={model_dir}", f"{SECTION}.enable_ref_mode=true",
            f"{SECTION}.scheduler.max_wait_ms=1", f"{SECTION}.scheduler.max_tokens_per_batch={count * length}",
        ]).server
        service = build_service(config)
        await service.start()
        try:
            figures = await _measure(service, trajectories(count, length, MODEL.vocab_size), rounds)
            info, _ = await service.weight_layout()
        finally:
            await service.shutdown()
    return {
        "requests_per_call": count,
        "tokens_per_request": length,
        "rounds": rounds,
        "model": f"{MODEL.arch}, hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, vocab {MODEL.vocab_size}",
        "replicas": "policy and reference: one in-process replica each (own engine, own thread)",
        "device": info.device,
        **figures,
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(quick))
