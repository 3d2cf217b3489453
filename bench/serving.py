"""Serving overhead: HTTP + msgpack + scheduler against a direct engine call, same requests, same run.

The model and requests are the scoring benchmark's (a ~100M-parameter Qwen2 with a 151,936-token
vocabulary, prompts of 64-512 tokens and responses log-uniform in 16-4,096, 8,192-token
batches), in fp32: the dtype of the exactness claims and of the scoring benchmark's headline
figures, and on CPUs without bf16 units (avx512_bf16/AMX) the faster one: the less compute a
request costs, the larger the same serving cost is against it. The paths, timed one after
the other in each repeat:

- direct: `ModelEngineServerAdapter.score(all requests)`, one call, no scheduler;
- scheduler: `ModelEngineServer.submit` in this process from `CLIENTS` concurrent callers;
- http: `CLIENTS` concurrent `HttpLogProbClient`s (msgpack) on 127.0.0.1, each sending one
  request per call in a closed loop, against `create_app` over `build_local_server` running
  in a child process, as `serve` runs it: callers and server share no GIL.

`overhead_fraction = 1 - http_tokens_per_s / direct_tokens_per_s`; when every request is served
(the normal case) both paths scored the same tokens, so it equals `1 - http_rps / direct_rps`.
Load is bounded in count (`CLIENTS` calls in flight) and time (no new call after the time limit;
each call has a deadline), so a stuck server ends the benchmark with failures, not a hang.

msgpack against JSON: the cost of one call without compute, over a real uvicorn on 127.0.0.1
whose service replays the direct path's results (same request and result sizes), one call at a
time: client encoding, HTTP, server parsing and validation, result encoding, client decoding.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import torch

from bench.common import Target, fixed_targets
from bench.scoring import MODEL, TOKEN_BUDGET, rl_length_mix
from bench.serving_servers import ReplayService, model_server_process
from clients.http_client import HttpLogProbClient
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import ModelEngineError
from model_engine_server.executor import InProcessExecutor
from model_engine_server.http.app import create_app
from model_engine_server.http.thread_server import ServerThread
from model_engine_server.protocol import LogProbRequest, LogProbResult, ScoreOutput
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig
from model_engine_server.tiny_model import make_tiny_model

DTYPE = "float32"
CLIENTS = 16  # two full batches of the length mix in flight: the engine never waits for a caller
CALL_TIMEOUT_S = 900.0
REQUESTS = {True: 16, False: 40}  # quick, full: the scoring benchmark's full set is 40
REPEATS = {True: 1, False: 2}
TIME_LIMIT_S = {True: 900.0, False: 1800.0}
WIRE_REPEATS = 3
TARGETS = [Target("overhead_fraction", "<=", 0.1)]
targets = fixed_targets(TARGETS)


# ---------------------------------------------------------------- figures from timings
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def overhead_fraction(direct_tokens_per_s: float, served_tokens_per_s: float) -> float:
    """The share of the direct path's throughput a serving path loses (negative: it was faster)."""
    if direct_tokens_per_s <= 0:
        raise ValueError("the direct path's throughput must be positive")
    return 1.0 - served_tokens_per_s / direct_tokens_per_s


# ---------------------------------------------------------------- closed-loop load
@dataclass
class LoadRun:
    """What a closed-loop run saw: every issued request is either in `results` or in `failures`."""

    results: dict[str, Any] = field(default_factory=dict)  # request_id -> result
    failures: dict[str, str] = field(default_factory=dict)  # request_id -> reason
    latencies_s: dict[str, float] = field(default_factory=dict)  # request_id -> send to answer, served only
    tokens_served: int = 0
    wall_s: float = 0.0

    @property
    def issued(self) -> int:
        return len(self.results) + len(self.failures)

    @property
    def requests_per_s(self) -> float:
        return len(self.results) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_served / self.wall_s if self.wall_s > 0 else 0.0


async def closed_loop(
    call: Callable[[LogProbRequest], Awaitable[Any]],
    requests: Sequence[LogProbRequest],
    concurrency: int,
    time_limit_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> LoadRun:
    """`concurrency` callers each send the next unsent request and wait for its answer, until
    every request was sent or `time_limit_s` has passed (then calls in flight still finish;
    `call` must bound its own wait). A raised exception is that request's failure."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    unsent = iter(requests)  # shared by the callers; one event loop, so no lock is needed
    run = LoadRun()
    start = clock()
    deadline = start + time_limit_s

    async def caller() -> None:
        while clock() < deadline:
            request = next(unsent, None)
            if request is None:
                return
            sent = clock()
            try:
                result = await call(request)
            except Exception as error:  # noqa: BLE001 - recorded per request, never dropped
                run.failures[request.request_id] = f"{type(error).__name__}: {error}"
                continue
            run.latencies_s[request.request_id] = clock() - sent
            run.results[request.request_id] = result
            run.tokens_served += request.num_tokens

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.wall_s = clock() - start
    return run


def load_figures(run: LoadRun, direct_tokens_per_s: float, prefix: str) -> dict[str, Any]:
    figures: dict[str, Any] = {
        f"{prefix}rps": run.requests_per_s,
        f"{prefix}tokens_per_s": run.tokens_per_s,
        f"{prefix}served": len(run.results),
        f"{prefix}failed": len(run.failures),
        f"{prefix}overhead_fraction": overhead_fraction(direct_tokens_per_s, run.tokens_per_s),
    }
    if run.latencies_s:
        figures[f"{prefix}p50_ms"] = percentile(list(run.latencies_s.values()), 50) * 1000
        figures[f"{prefix}p99_ms"] = percentile(list(run.latencies_s.values()), 99) * 1000
    if run.failures:
        figures[f"{prefix}first_failure"] = next(iter(run.failures.values()))
    return figures


def outside_scheduler_ms(run: LoadRun) -> list[float]:
    """Per served call: client-seen latency minus the scheduler's own queue + compute time
    (`timings.total_ms` of the result): HTTP, codecs, parsing and the event loops."""
    return [
        run.latencies_s[request_id] * 1000 - result.timings["total_ms"]
        for request_id, result in run.results.items()
        if "total_ms" in result.timings
    ]


# ---------------------------------------------------------------- the paths
async def http_load(url: str, requests: Sequence[LogProbRequest], clients: int, time_limit_s: float,
                    wire: str = "msgpack") -> LoadRun:
    """`clients` concurrent callers over one pooled client, one request per call."""
    client = HttpLogProbClient(url, wire=wire, timeout_s=CALL_TIMEOUT_S, max_connections=clients)
    try:
        return await closed_loop(lambda r: _first(client.score([r])), requests, clients, time_limit_s)
    finally:
        await client.close()


async def _first(outcomes: Awaitable[list[Any]]) -> Any:
    """The one outcome of a one-request call; its error raised, so the load run records it."""
    outcome = (await outcomes)[0]
    if isinstance(outcome, ModelEngineError):
        raise outcome
    return outcome


async def scheduler_load(adapter: ModelEngineServerAdapter, config: SchedulerConfig,
                         requests: Sequence[LogProbRequest], clients: int, time_limit_s: float) -> LoadRun:
    """The same load on the scheduler in this process: batching cost without HTTP."""
    server = ModelEngineServer(InProcessExecutor(adapter), config)
    try:
        return await closed_loop(lambda r: server.submit(r, CALL_TIMEOUT_S), requests, clients, time_limit_s)
    finally:
        await server.shutdown()


def direct_score(adapter: ModelEngineServerAdapter, requests: Sequence[LogProbRequest]) -> tuple[float, list[ScoreOutput]]:
    start = time.perf_counter()
    outcomes = adapter.score(requests)
    seconds = time.perf_counter() - start
    failed = [o for o in outcomes if isinstance(o, ModelEngineError)]
    if failed:
        raise RuntimeError(f"the direct path failed {len(failed)} requests, e.g. {failed[0]}")
    return seconds, outcomes  # type: ignore[return-value]


async def sequential_calls(url: str, wire: str, requests: Sequence[LogProbRequest]) -> tuple[float, dict[str, Any]]:
    """Seconds for one call per request, one at a time, after a first call opened the connection."""
    client = HttpLogProbClient(url, wire=wire, timeout_s=CALL_TIMEOUT_S, max_connections=1)
    try:
        await _first(client.score(requests[:1]))
        answers: dict[str, Any] = {}
        start = time.perf_counter()
        for request in requests:
            answers[request.request_id] = await _first(client.score([request]))
        return time.perf_counter() - start, answers
    finally:
        await client.close()


def _same_arrays(a: Any, b: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def measure_wire(requests: Sequence[LogProbRequest], results: Sequence[LogProbResult], repeats: int) -> dict[str, Any]:
    """msgpack against JSON bodies: the same calls on a replay server, best of `repeats`."""
    best = {"msgpack": math.inf, "json": math.inf}
    identical = True
    expected = {result.request_id: result for result in results}
    with ServerThread(create_app(ReplayService(results))) as server:
        for _ in range(repeats):
            for wire in best:  # interleaved, so both see the same background load
                seconds, answers = asyncio.run(sequential_calls(server.url, wire, requests))
                best[wire] = min(best[wire], seconds)
                identical &= all(
                    _same_arrays(answers[i].log_probs, r.log_probs) and _same_arrays(answers[i].entropy, r.entropy)
                    for i, r in expected.items()
                )
    return {
        "msgpack_ms_per_call": best["msgpack"] / len(requests) * 1000,
        "json_ms_per_call": best["json"] / len(requests) * 1000,
        "msgpack_speedup_vs_json": best["json"] / best["msgpack"],
        "wire_results_identical": identical,
    }


@dataclass
class PathTimings:
    """The best repeat of each path: direct seconds and outputs, and the two load runs."""

    direct_s: float = math.inf
    direct: dict[str, ScoreOutput] = field(default_factory=dict)  # request_id -> output
    scheduler: LoadRun | None = None
    http: LoadRun | None = None
    parameters: int = 0


def time_paths(model_path: str, requests: Sequence[LogProbRequest], dtype: str, clients: int, repeats: int,
               time_limit_s: float) -> PathTimings:
    """Each repeat times the three paths back to back; each path keeps its best repeat."""
    spec = EngineSpec(model_path=model_path, dtype=dtype)
    config = SchedulerConfig(max_tokens_per_batch=TOKEN_BUDGET, request_timeout_s=CALL_TIMEOUT_S)
    adapter = ModelEngineServerAdapter(build_engine("hf", spec), config.max_tokens_per_batch, spec.logprob_chunk_mb)
    best = PathTimings(parameters=adapter.engine.info.num_parameters)
    with model_server_process(model_path, dtype, config) as url:
        # warm-up of both engines alike: first-call allocations, thread pools, connections
        adapter.score(requests[:2])
        asyncio.run(http_load(url, requests[:2], clients, time_limit_s))

        def direct() -> None:
            seconds, outputs = direct_score(adapter, requests)
            if seconds < best.direct_s:
                best.direct_s, best.direct = seconds, {r.request_id: o for r, o in zip(requests, outputs)}

        def scheduler() -> None:
            run = asyncio.run(scheduler_load(adapter, config, requests, clients, time_limit_s))
            if best.scheduler is None or run.tokens_per_s > best.scheduler.tokens_per_s:
                best.scheduler = run

        def http() -> None:
            run = asyncio.run(http_load(url, requests, clients, time_limit_s))
            if best.http is None or run.tokens_per_s > best.http.tokens_per_s:
                best.http = run

        paths = [direct, scheduler, http]
        for repeat in range(repeats):  # each repeat starts one path later: no path is always first
            for path in paths[repeat % 3:] + paths[: repeat % 3]:
                path()
    return best


def max_abs_diff(results: dict[str, Any], reference: dict[str, ScoreOutput]) -> float:
    """Largest log-prob or entropy difference of served results from the direct path's."""
    diffs = [0.0]
    for request_id, result in results.items():
        expected = reference[request_id]
        diffs.append(float(np.abs(result.log_probs - expected.log_probs).max()))
        if result.entropy is not None and expected.entropy is not None:
            diffs.append(float(np.abs(result.entropy - expected.entropy).max()))
    return max(diffs)


def measure_serving(model_path: str, requests: Sequence[LogProbRequest], dtype: str, clients: int,
                    repeats: int, time_limit_s: float, wire_repeats: int = WIRE_REPEATS) -> dict[str, Any]:
    """All figures of the benchmark for one checkpoint."""
    timed = time_paths(model_path, requests, dtype, clients, repeats, time_limit_s)
    assert timed.scheduler is not None and timed.http is not None
    direct_tokens_per_s = sum(r.num_tokens for r in requests) / timed.direct_s
    figures: dict[str, Any] = {
        "parameters": timed.parameters,
        "direct_rps": len(requests) / timed.direct_s,
        "direct_tokens_per_s": direct_tokens_per_s,
        **load_figures(timed.scheduler, direct_tokens_per_s, "scheduler_"),
        **load_figures(timed.http, direct_tokens_per_s, "http_"),
    }
    figures["overhead_fraction"] = figures.pop("http_overhead_fraction")
    figures["p50_ms"] = figures.pop("http_p50_ms", None)
    figures["p99_ms"] = figures.pop("http_p99_ms", None)
    outside = outside_scheduler_ms(timed.http)
    if outside:
        figures["http_outside_scheduler_p50_ms"] = percentile(outside, 50)
    figures["max_abs_diff_http_vs_direct"] = max_abs_diff(timed.http.results, timed.direct)
    replayed = [LogProbResult(request_id=i, log_probs=o.log_probs, entropy=o.entropy, weight_version=0)
                for i, o in timed.direct.items()]
    figures.update(measure_wire(requests, replayed, wire_repeats))
    direct_ms_per_request = timed.direct_s / len(requests) * 1000
    figures["msgpack_call_fraction_of_compute"] = figures["msgpack_ms_per_call"] / direct_ms_per_request
    figures["json_call_fraction_of_compute"] = figures["json_ms_per_call"] / direct_ms_per_request
    return figures


def serving_requests(count: int, vocab_size: int) -> list[LogProbRequest]:
    """The scoring benchmark's length mix, asking for entropy as an RL trainer does."""
    return [r.model_copy(update={"return_entropy": True}) for r in rl_length_mix(count, vocab_size)]


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    requests = serving_requests(REQUESTS[quick], MODEL.vocab_size)
    figures: dict[str, Any] = {
        "model": f"{MODEL.arch}, hidden {MODEL.hidden_size}, {MODEL.num_layers} layers, vocab {MODEL.vocab_size:,}",
        "dtype": DTYPE,
        "requests": len(requests),
        "tokens": sum(r.num_tokens for r in requests),
        "response_tokens": sum(r.num_response_tokens for r in requests),
        "clients": CLIENTS,
        "token_budget": TOKEN_BUDGET,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = make_tiny_model(Path(folder) / "model", MODEL, seed=0)
        figures.update(measure_serving(str(path), requests, DTYPE, CLIENTS, REPEATS[quick], TIME_LIMIT_S[quick]))
    return figures
