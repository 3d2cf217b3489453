"""The serving benchmark's machinery and the profile summariser (bench/serving.py, bench/profile.py).

No timed assertions: the figures' arithmetic is checked on fakes with a virtual clock, and the
real paths (a child process serving a tiny model over HTTP, a profiled batch) are checked for
what they must get right whatever the machine's load: every request answered, the same
log-probs on every path, shares that add up.
"""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.profile import OpTime, categorise, first_batch, profile_batch, summarise
from bench.serving import LoadRun, closed_loop, load_figures, measure_serving, overhead_fraction, percentile
from model_engine_server.protocol import LogProbRequest


def make_requests(count: int, seed: int = 0, vocab: int = 512) -> list[LogProbRequest]:
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        prompt, response = rng.randint(2, 40), rng.randint(2, 120)
        ids = [rng.randrange(vocab) for _ in range(prompt + response)]
        requests.append(LogProbRequest(request_id=str(index), input_ids=ids, response_start=prompt,
                                       temperature=0.9, return_entropy=True))
    return requests


class VirtualClock:
    """Time that moves only when a fake call says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- percentiles and overhead
@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=100))
def test_percentile_agrees_with_numpy_linear_interpolation(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentiles_of_a_known_list():
    values = [float(v) for v in range(1, 101)]  # 1..100, shuffled: order must not matter
    random.Random(0).shuffle(values)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_values_and_out_of_range_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_overhead_fraction_is_the_throughput_lost_against_the_direct_path():
    assert overhead_fraction(100.0, 90.0) == pytest.approx(0.1)
    assert overhead_fraction(100.0, 100.0) == 0.0
    assert overhead_fraction(100.0, 110.0) == pytest.approx(-0.1)  # faster than direct: negative, not clipped
    with pytest.raises(ValueError):
        overhead_fraction(0.0, 1.0)


def test_overhead_on_tokens_equals_overhead_on_requests_when_the_same_requests_are_served():
    tokens = 12_345
    direct_s, served_s, count = 4.0, 5.0, 16
    by_tokens = overhead_fraction(tokens / direct_s, tokens / served_s)
    assert by_tokens == pytest.approx(1 - (count / served_s) / (count / direct_s))


# ---------------------------------------------------------------- closed-loop load
async def test_closed_loop_answers_every_request_with_at_most_its_concurrency_in_flight():
    requests = make_requests(23)
    in_flight, most = 0, 0

    async def call(request: LogProbRequest) -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (int(request.request_id) % 3))
        in_flight -= 1
        return f"scored {request.request_id}"

    run = await closed_loop(call, requests, concurrency=4, time_limit_s=600)
    assert most == 4
    assert run.results == {r.request_id: f"scored {r.request_id}" for r in requests}
    assert not run.failures
    assert set(run.latencies_s) == set(run.results)
    assert run.tokens_served == sum(r.num_tokens for r in requests)


async def test_closed_loop_records_a_raised_error_as_that_requests_failure_and_goes_on():
    requests = make_requests(6)

    async def call(request: LogProbRequest) -> str:
        if request.request_id == "2":
            raise TimeoutError("no answer")
        return "ok"

    run = await closed_loop(call, requests, concurrency=2, time_limit_s=600)
    assert run.failures == {"2": "TimeoutError: no answer"}
    assert set(run.results) == {"0", "1", "3", "4", "5"}
    assert run.issued == 6
    assert run.tokens_served == sum(r.num_tokens for r in requests if r.request_id != "2")
    figures = load_figures(run, direct_tokens_per_s=1.0, prefix="x_")
    assert figures["x_failed"] == 1 and figures["x_served"] == 5
    assert figures["x_first_failure"] == "TimeoutError: no answer"


async def test_closed_loop_sends_nothing_new_after_its_time_limit_but_finishes_what_it_sent():
    clock = VirtualClock()
    requests = make_requests(10)

    async def call(request: LogProbRequest) -> str:
        clock.now += 1.0  # each call takes one virtual second
        return "ok"

    run = await closed_loop(call, requests, concurrency=1, time_limit_s=2.5, clock=clock)
    assert list(run.results) == ["0", "1", "2"]  # sent at t=0, 1, 2; at t=3 the limit had passed
    assert run.wall_s == 3.0
    assert run.requests_per_s == 1.0
    assert list(run.latencies_s.values()) == [1.0, 1.0, 1.0]


def test_load_figures_report_throughput_overhead_and_latency_percentiles():
    requests = make_requests(4)
    run = LoadRun(results={r.request_id: "ok" for r in requests},
                  latencies_s={r.request_id: s for r, s in zip(requests, (0.1, 0.2, 0.3, 0.4))},
                  tokens_served=1000, wall_s=2.0)
    figures = load_figures(run, direct_tokens_per_s=1000.0, prefix="http_")
    assert figures["http_rps"] == 2.0 and figures["http_tokens_per_s"] == 500.0
    assert figures["http_overhead_fraction"] == pytest.approx(0.5)
    assert figures["http_p50_ms"] == pytest.approx(250.0)
    assert figures["http_p99_ms"] == pytest.approx(397.0)


def test_tiny_model_over_http_gives_the_direct_paths_log_probs(tiny_model):
    requests = make_requests(10, seed=3)
    figures = measure_serving(str(tiny_model), requests, "float32", clients=3, repeats=1, time_limit_s=300,
                              wire_repeats=1)
    assert figures["http_served"] == figures["scheduler_served"] == len(requests)
    assert figures["http_failed"] == figures["scheduler_failed"] == 0
    assert figures["max_abs_diff_http_vs_direct"] <= 1e-5
    assert figures["wire_results_identical"] is True
    assert figures["overhead_fraction"] == pytest.approx(1 - figures["http_rps"] / figures["direct_rps"])
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["msgpack_speedup_vs_json"] > 0


# ---------------------------------------------------------------- profile summary
def test_categories_put_attention_before_matmul_and_the_lm_head_matmul_under_matmul():
    sdpa = ("scoring_batch", "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math")
    assert categorise(OpTime("aten::bmm", 1.0, sdpa)) == "attention"
    assert categorise(OpTime("aten::mm", 1.0, ("scoring_batch", "logprobs", "aten::matmul"))) == "matmul"
    assert categorise(OpTime("aten::transpose", 1.0, ("scoring_batch", "aten::linear", "aten::t"))) == "matmul"
    assert categorise(OpTime("aten::exp", 1.0, ("scoring_batch", "logprobs"))) == "logprob"
    assert categorise(OpTime("aten::lift_fresh", 1.0, ("scoring_batch", "adapter", "packing"))) == "packing"
    assert categorise(OpTime("aten::rms_norm", 1.0, ("scoring_batch",))) == "other"
    assert categorise(OpTime("packing", 1.0, ("scoring_batch",), is_range=True)) == "packing"


def test_summary_shares_cover_the_wall_time_and_python_is_the_remainder():
    ops = [
        OpTime("scoring_batch", 5.0, (), is_range=True),
        OpTime("packing", 4.0, ("scoring_batch",), is_range=True),
        OpTime("aten::lift_fresh", 1.0, ("scoring_batch", "packing")),
        OpTime("aten::mm", 40.0, ("scoring_batch", "aten::linear")),
        OpTime("aten::_scaled_dot_product_flash_attention_for_cpu", 10.0, ("scoring_batch", "aten::scaled_dot_product_attention")),
        OpTime("logprobs", 2.0, ("scoring_batch",), is_range=True),
        OpTime("aten::mm", 20.0, ("scoring_batch", "logprobs", "aten::matmul")),
        OpTime("aten::exp", 8.0, ("scoring_batch", "logprobs")),
        OpTime("aten::silu", 4.0, ("scoring_batch",)),
        OpTime("aten::exp", 1.0, ("scoring_batch",)),  # the same op outside log-probs: its own row
    ]
    summary = summarise(ops, wall_us=100.0, top=3)
    assert "aten::exp (other)" in summarise(ops, wall_us=100.0)["top_ops"]
    assert summary["matmul_share"] == pytest.approx(0.60)
    assert summary["lm_head_matmul_share"] == pytest.approx(0.20)
    assert summary["attention_share"] == pytest.approx(0.10)
    assert summary["logprob_share"] == pytest.approx(0.10)
    assert summary["packing_share"] == pytest.approx(0.05)
    assert summary["other_share"] == pytest.approx(0.05)
    assert summary["python_share"] == pytest.approx(0.10)  # 5 of the batch label's own time, 5 unaccounted
    assert list(summary["top_ops"]) == [
        "aten::mm (matmul)", "aten::_scaled_dot_product_flash_attention_for_cpu (attention)", "aten::exp (logprob)"
    ]
    assert summary["top_ops"]["aten::mm (matmul)"].startswith("60.0% of wall, 2 calls")


def test_profile_of_a_tiny_model_batch_has_shares_that_sum_to_one(tiny_model):
    batch = first_batch(make_requests(12, seed=5), token_budget=600)
    summary = profile_batch(str(tiny_model), "float32", batch, token_budget=600, time_unprofiled=False)
    shares = {key: value for key, value in summary.items() if key.endswith("_share") and key != "lm_head_matmul_share"}
    assert set(shares) == {"matmul_share", "attention_share", "logprob_share", "packing_share", "other_share", "python_share"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(-0.01 <= share <= 1.0 for share in shares.values()), shares  # no time counted twice
    assert summary["matmul_share"] > 0 and summary["logprob_share"] > 0 and summary["packing_share"] > 0
    assert summary["attention_share"] > 0
    assert 0 < summary["lm_head_matmul_share"] <= summary["matmul_share"]
    assert summary["top_ops"]
    assert 0 < summary["matmul_s"] < summary["wall_s"]
    assert summary["matmul_flops_per_s"] == pytest.approx(summary["matmul_flops"] / summary["matmul_s"])
    assert summary["matmul_fraction_of_gemm_rate"] > 0 and summary["gemm_flops_per_s"] > 0


def test_profile_of_a_real_shape_nests_its_fp32_figures_under_its_key(monkeypatch, tmp_path):
    """`python -m bench profile --shape S --max-tokens N` on a tiny stand-in shape: fp32 only,
    the mix scaled as `bench scoring` scales it; options other benchmarks do not take are refused."""
    from bench import profile, scoring, shapes
    from bench.__main__ import main
    from bench.shapes import QwenShape

    monkeypatch.setitem(shapes.MEASURED, "tiny-qwen", QwenShape("tiny-qwen", "tiny_qwen", 64, 2, 4, 2, 128, 512, True))
    monkeypatch.setattr(profile, "REQUESTS_DRAWN", 3)
    output = tmp_path / "profile.json"
    assert main(["profile", "--quick", "--cpu-heap", "system", "--shape", "tiny-qwen", "--max-tokens", "200",
                 "--json", str(output)]) == 0
    figures = json.loads(output.read_text())["figures"]
    shape = figures["tiny_qwen"]
    assert figures["cpu_heap"] == "system"
    assert "matmul_share" not in figures and not any(key.startswith("bf16_") for key in shape)
    expected = scoring.scale_to_tokens(scoring.rl_length_mix(3, 512), 200)
    assert shape["batch_tokens"] == sum(r.num_tokens for r in expected) <= 220
    assert 0 < shape["matmul_share"] < 1 and shape["matmul_fraction_of_gemm_rate"] > 0
    for wrong in (["profile", "--group-size", "2"], ["memory", "--shape", "tiny-qwen"], ["profile", "--max-tokens", "0"]):
        with pytest.raises(SystemExit):
            main(wrong)
