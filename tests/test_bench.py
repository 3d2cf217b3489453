"""The benchmarks' own machinery: baselines compute the same thing, targets and reports are honest."""

from __future__ import annotations

import json

import pytest
import torch

from bench.common import Target, measure_peak_bytes
from bench.report import render
from model_engine_server.logprobs import LMHead, chunked_log_probs, full_logits_log_probs


def test_full_logits_baseline_equals_chunked_server_path():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=generator)
    weight = torch.randn(1000, 32, generator=generator) * 0.3
    targets = torch.randint(0, 1000, (300,), generator=generator)
    temperatures = torch.linspace(0.5, 1.5, 300)
    chunked_lp, chunked_entropy = chunked_log_probs(hidden, LMHead(weight), targets, temperatures, True, chunk_tokens=7)
    full_lp, full_entropy = full_logits_log_probs(hidden, weight, targets, temperatures)
    torch.testing.assert_close(chunked_lp, full_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_entropy, full_entropy, atol=1e-5, rtol=0)


def test_targets_compare_against_numbers_and_other_figures():
    figures = {"ratio": 9.0, "sync": {"pause_window_s": 1.05, "transfer_s": 1.0}}
    assert Target("ratio", ">=", 8.0).check(figures)["met"]
    assert not Target("ratio", ">=", 10.0).check(figures)["met"]
    assert Target("sync.pause_window_s", "<=", "sync.transfer_s", 1.1).check(figures)["met"]
    assert not Target("sync.pause_window_s", "<=", "sync.transfer_s", 1.0).check(figures)["met"]
    missing = Target("absent", ">=", 1.0).check(figures)
    assert missing["met"] is False and missing["measured"] is None


def test_peak_memory_probe_sees_a_large_temporary():
    """On the device the probe reads: CUDA's allocator where CUDA is present, else the process's
    resident set (a CPU block would be invisible to the CUDA counters)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def allocate() -> float:
        block = torch.ones(64 * 1024 * 1024 // 4, device=device)  # 64 MiB, freed on return
        return float(block[0])

    _, peak = measure_peak_bytes(allocate)
    assert 60 * 1024 * 1024 <= peak < 512 * 1024 * 1024


def test_scoring_baselines_equal_server_path(tiny_model):
    from bench.scoring import padded_full_logits, packed_full_logits, rl_length_mix
    from model_engine_server.adapter import ModelEngineServerAdapter
    from model_engine_server.engines.base import EngineSpec, build_engine
    from model_engine_server.packing import split_by_token_budget

    # pinned to the CPU: there the engine's own attention is always the packed one, which the
    # padded path must put back (on CUDA flash-attn may be installed and taken instead)
    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model), device="cpu"))
    packed_attention = engine.model.config._attn_implementation
    assert packed_attention != "sdpa"  # else the check below could not fail
    lengths = [300, 250, 100, 120]  # first-fit into 400 tokens: groups [0, 2], [1, 3] - not request order
    requests = [
        r.model_copy(update={"input_ids": r.input_ids[:length], "response_start": min(r.response_start, length // 2)})
        for r, length in zip(rl_length_mix(4, 512, seed=1), lengths)
    ]
    assert split_by_token_budget(lengths, 400) == [[0, 2], [1, 3]]
    server = [o.log_probs for o in ModelEngineServerAdapter(engine).score(requests)]
    for baseline in (packed_full_logits(engine, requests, token_budget=400), padded_full_logits(engine, requests)):
        for expected, got in zip(server, baseline):
            torch.testing.assert_close(got, torch.from_numpy(expected), atol=1e-5, rtol=0)
    assert engine.model.config._attn_implementation == packed_attention  # restored after the padded path


def test_quick_scoring_json_carries_the_verl_baseline(monkeypatch, tmp_path):
    """The whole `python -m bench scoring --quick --json F` path, on the test-only size (a tiny
    model, three short requests, fp32): the JSON names verl's figures, and verl's log-probs
    agree with the server's; without verl it says the baseline was skipped. No timing asserted."""
    from bench import scoring, scoring_verl
    from bench.__main__ import main

    monkeypatch.setattr(scoring, "QUICK", scoring.TEST_SIZE)
    output = tmp_path / "scoring.json"
    assert main(["scoring", "--quick", "--cpu-heap", "system", "--shape", "toy", "--json", str(output)]) == 0
    record = json.loads(output.read_text())
    figures = record["figures"]
    targets = {target["target"]: target for target in record["targets"]}
    # the report shows the target with the very figure measured and its verdict
    speed = targets["speedup_vs_verl >= 1.5"]
    rendered = render([record])
    if speed["measured"] is None:
        assert "| `speedup_vs_verl >= 1.5` | not measured | not measured |" in rendered
    else:
        assert speed["measured"] == figures["speedup_vs_verl"]
        verdict = "met" if figures["speedup_vs_verl"] >= 1.5 else "**missed**"
        assert f"| `speedup_vs_verl >= 1.5` | {figures['speedup_vs_verl']:.4g} | {verdict} |" in rendered
    # the toy is anchored to a float64 forward too, as the real shapes are (verl's path below)
    assert 0 < figures["server_max_abs_diff_vs_fp64"] <= 1e-5
    if not scoring_verl.verl_available():
        assert "verl not installed" in figures["verl_baseline"]
        assert targets["speedup_vs_verl >= 1.5"]["measured"] is None
        return
    assert figures["speedup_vs_verl"] > 0 and figures["verl_tokens_per_s"] > 0
    assert "| `speedup_vs_verl_without_attention` |" in rendered  # the GPU-relevant figure, derived
    assert 0 < figures["verl_max_abs_diff_vs_fp64"] <= 1e-5
    assert figures["speedup_vs_verl_at_gemm_rate"] == pytest.approx(figures["speedup_vs_verl"] / figures["mfu"])
    assert figures["max_abs_diff_vs_verl"] <= 1e-5
    assert targets["max_abs_diff_vs_verl <= 1e-05"]["met"]
    # verl's fused-linear path on the same worker: within 1e-5 of the server and of verl's plain path
    assert figures["verl_fused_tokens_per_s"] > 0 and figures["speedup_vs_verl_fused"] > 0
    assert figures["max_abs_diff_vs_verl_fused"] <= 1e-5 and figures["verl_fused_vs_plain_max_abs_diff"] <= 1e-5
    assert figures["verl_fused_backend"] == "torch"  # verl's default, the one the fused test below counts


def test_scoring_runs_every_measured_shape_unless_told_which(monkeypatch):
    """Without `--shape`, every measured shape runs, with `--max-tokens` passed on (None: each
    size's own default); the run loop alone, the shapes' own runs are tested above and below.
    A quick run keeps the full run's real-shape mix (it times it once)."""
    from bench import scoring, shapes

    seen: list[tuple[str, int | None]] = []

    def record(name, size, max_tokens, folder, group_size=1):
        seen.append((name, max_tokens))
        return {}

    monkeypatch.setattr(scoring, "measure_shape", record)
    scoring.run(quick=True, cpu_heap="system")
    assert seen == [(name, None) for name in shapes.MEASURED]
    seen.clear()
    scoring.run(quick=True, shape=["qwen2.5-0.5b"], max_tokens=100, cpu_heap="system")
    assert seen == [("qwen2.5-0.5b", 100)]
    quick, full = scoring.QUICK, scoring.FULL
    assert (quick.real_shape_requests, quick.real_shape_tokens) == (full.real_shape_requests, full.real_shape_tokens)
    assert quick.repeats < full.repeats


def test_verl_fused_path_runs_verls_fused_kernel_and_puts_the_plain_forward_back(monkeypatch, tiny_model):
    """`verl_recompute(..., fused=True)` goes through verl's fused-linear function (counted here),
    agrees with verl's plain path, and leaves the worker's model with the forward it had."""
    from bench import scoring_verl
    from bench.scoring import rl_length_mix

    if not scoring_verl.verl_available():
        pytest.skip("verl not installed")
    from importlib.resources import files

    from omegaconf import OmegaConf
    from verl.utils.experimental import torch_functional

    # the backend timed is the one verl's FSDP engine defaults to
    verl_model_defaults = OmegaConf.load(str(files("verl") / "trainer" / "config" / "model" / "hf_model.yaml"))
    assert verl_model_defaults.fused_kernel_options.impl_backend == scoring_verl.FUSED_BACKEND

    calls = []
    fused_chunk = torch_functional._fused_linear_for_ppo_fwd
    monkeypatch.setattr(torch_functional, "_fused_linear_for_ppo_fwd",
                        lambda *args, **kwargs: calls.append(1) or fused_chunk(*args, **kwargs))
    requests = [r.model_copy(update={"input_ids": r.input_ids[:150], "response_start": 40})
                for r in rl_length_mix(3, 512, seed=3)]
    verl = scoring_verl.build_verl(str(tiny_model), "float32", 400)
    try:
        model_class = type(verl.worker.engine.module)
        forward_before = model_class.forward
        plain = scoring_verl.verl_recompute(verl, requests)
        assert not calls
        fused = scoring_verl.verl_recompute(verl, requests, fused=True)
        assert calls  # verl's fused kernel scored the batch
        assert model_class.forward is forward_before
        assert not hasattr(verl.worker.engine.module, "_verl_fused_kernels_backend")
        assert scoring_verl.agreement(plain, fused) <= 1e-5
        assert scoring_verl.agreement(plain, scoring_verl.verl_recompute(verl, requests)) == 0  # plain again
    finally:
        verl.close()


def test_length_mix_scales_to_a_token_count_keeping_every_request():
    from bench.scoring import rl_length_mix, scale_to_tokens

    requests = rl_length_mix(10, 512)
    scaled = scale_to_tokens(requests, 1000)
    assert len(scaled) == len(requests)
    assert 900 <= sum(r.num_tokens for r in scaled) <= 1100
    for before, after in zip(requests, scaled):
        assert after.input_ids[: after.response_start] == before.input_ids[: after.response_start]
        assert after.input_ids[after.response_start :] == before.input_ids[before.response_start :][: after.num_response_tokens]
    assert scale_to_tokens(requests, 10**9) is requests


def test_lm_head_only_prediction_is_the_flop_ratio_of_all_positions_to_responses():
    from bench.scoring import rl_length_mix
    from bench.scoring_predict import flop_figures, lm_head_only_ratio, predictions
    from bench.shapes import QWEN25_7B

    requests = rl_length_mix(4, 512)
    flops = flop_figures(QWEN25_7B.hf_config(), requests)
    expected = (flops["body_flops"] + flops["lm_head_flops_all_positions"]) / (
        flops["body_flops"] + flops["lm_head_flops_response_only"])
    assert lm_head_only_ratio(flops) == expected and expected > 1
    assert 0 < flops["lm_head_flop_share_response_only"] < flops["lm_head_flop_share_all_positions"] < 1
    predicted = predictions(requests, measured=None, measured_name=None, token_budget=8192)
    assert set(predicted) == {"prediction_qwen2_5_7b", "prediction_qwen2_5_32b"}
    assert "predicted_speedup_vs_verl_cpu_rates" not in predicted["prediction_qwen2_5_7b"]  # no measured rates


def test_cpu_rate_prediction_on_the_measured_shape_gives_back_its_cause_times():
    """Applied to the shape it was measured on, the CPU-rate prediction is the ratio of the cause
    split's own times (masked-attention body + full head over body + response head), whatever
    verl's whole-path time in the other phase was."""
    from bench.scoring_predict import cpu_rates, cpu_rates_ratio

    flops = {"body_flops": 8e12, "body_flops_shared_prompts": 8e12, "lm_head_flops_response_only": 1e12,
             "lm_head_flops_all_positions": 1.5e12, "masked_row_attention_flops": 3e12, "sequence_attention_flops": 1e11}
    measured = {**flops, "tokens": 4000, "body_s": 40.0, "body_sdpa_mask_s": 50.0, "head_response_chunked_s": 4.0,
                "head_all_full_s": 6.0}
    for verl_tokens_per_s in (50.0, 200.0):  # verl's measured path, slow or fast, does not enter
        rates = cpu_rates({**measured, "verl_tokens_per_s": verl_tokens_per_s})
        assert cpu_rates_ratio(flops, rates) == pytest.approx((50.0 + 6.0) / (40.0 + 4.0))
    assert cpu_rates(measured) is None  # no verl run: no prediction against it


def test_cpu_rate_prediction_scales_verls_masked_attention_with_row_length_squared():
    """Once scaled with the per-sequence FLOPs, which overstated verl at 7B and 32B: a shape
    whose masked-row extra is a smaller part of its work keeps verl's body closer to ours."""
    from bench.scoring_predict import cpu_rates, cpu_rates_ratio

    measured = {"body_flops": 8e12, "body_flops_shared_prompts": 8e12, "lm_head_flops_response_only": 1e12,
                "lm_head_flops_all_positions": 1.5e12, "masked_row_attention_flops": 3e12,
                "sequence_attention_flops": 1e11, "body_s": 40.0, "body_sdpa_mask_s": 50.0,
                "head_response_chunked_s": 4.0, "head_all_full_s": 6.0, "verl_tokens_per_s": 100.0}
    rates = cpu_rates(measured)
    larger = {**{k: v * 10 for k, v in measured.items() if k.endswith("flops") or "flops_" in k},
              "masked_row_attention_flops": 3e12 * 2, "sequence_attention_flops": 1e11 * 2}  # extra grows 2x, body 10x
    expected_verl = 80e12 / (8e12 / 40.0) + (6e12 - 2e11) / ((3e12 - 1e11) / 10.0) + 15e12 / (1.5e12 / 6.0)
    expected_server = 80e12 / (8e12 / 40.0) + 10e12 / (1e12 / 4.0)
    assert cpu_rates_ratio(larger, rates) == pytest.approx(expected_verl / expected_server)
    assert cpu_rates_ratio(larger, rates) < cpu_rates_ratio(measured, rates)


def test_grpo_mix_shares_prompts_and_the_shared_flops_count_each_prompt_once():
    from bench.flops import forward_flops_split
    from bench.scoring import rl_length_mix
    from bench.scoring_predict import flop_figures, flop_ratio, lm_head_only_ratio, shared_prompt_sequences
    from bench.shapes import QWEN25_7B

    assert rl_length_mix(7, 512, group_size=1) == rl_length_mix(7, 512)
    grouped = rl_length_mix(7, 512, group_size=3)
    prompts = [tuple(r.input_ids[: r.response_start]) for r in grouped]
    assert prompts[0] == prompts[1] == prompts[2] != prompts[3] == prompts[4] == prompts[5] != prompts[6]
    config = QWEN25_7B.hf_config()
    # two members after a 16-token prompt: the prompt once, each tail with the prompt as context
    small = [r.model_copy(update={"input_ids": list(range(16)) + tail, "response_start": 16})
             for r, tail in zip(grouped[:2], ([4, 5], [6, 7, 8]))]
    assert shared_prompt_sequences(small) == [(16, 0), (1, 2, 16), (2, 3, 16)]
    body_shared, _ = forward_flops_split(config, shared_prompt_sequences(small))
    body, _ = forward_flops_split(config, [(17, 2), (18, 3)])
    assert body_shared < body
    flops = flop_figures(config, grouped)
    assert flops["body_flops_shared_prompts"] < flops["body_flops"]
    assert flop_ratio(flops) > lm_head_only_ratio(flops)
    unique = flop_figures(config, rl_length_mix(7, 512))
    assert unique["body_flops_shared_prompts"] == unique["body_flops"] and flop_ratio(unique) == lm_head_only_ratio(unique)


def _tiny_qwen():
    from bench.shapes import QwenShape

    return QwenShape("tiny-qwen", "tiny_qwen", 64, 2, 4, 2, 128, 512, True)


def test_quick_scoring_json_nests_each_shape_with_its_causes(monkeypatch, tmp_path):
    """`python -m bench scoring --quick --shape S` on a tiny stand-in shape: the mix scaled to
    the size's `real_shape_tokens` (no `--max-tokens`), the shape's figures under its key with
    the cause split and FLOP shares, its targets reported, the 7B/32B predictions there. No
    timing asserted."""
    from bench import scoring, scoring_verl, shapes
    from bench.__main__ import main

    monkeypatch.setitem(shapes.MEASURED, "tiny-qwen", _tiny_qwen())
    monkeypatch.setattr(scoring, "QUICK", scoring.TEST_SIZE)
    output = tmp_path / "scoring.json"
    assert main(["scoring", "--quick", "--cpu-heap", "system", "--shape", "tiny-qwen", "--json", str(output)]) == 0
    record = json.loads(output.read_text())
    figures = record["figures"]
    shape = figures["tiny_qwen"]
    assert "tokens_per_s" not in figures  # the toy did not run
    assert shape["tokens"] <= 330 and shape["requests"] == scoring.TEST_SIZE.real_shape_requests
    for key in ("tokens_per_s", "packed_full_logits_tokens_per_s", "padded_tokens_per_s", "mfu",
                "lm_head_flop_share_all_positions", "factor_attention", "factor_lm_head_response_only",
                "factor_chunked_log_softmax"):
        assert shape[key] > 0, key
    assert shape["body_sdpa_mask_max_abs_diff"] <= 1e-5 and shape["head_paths_max_abs_diff"] <= 1e-5
    assert "predicted_speedup_vs_verl_lm_head_only" in figures["prediction_qwen2_5_32b"]
    assert shape["group_size"] == 1 and shape["factor_shared_prompts"] == 1.0  # no prompt shared
    assert shape["server_max_abs_diff_vs_fp64"] <= 1e-5  # anchored to a float64 forward
    assert shape["server_mean_abs_diff_vs_fp64"] <= shape["server_p99_abs_diff_vs_fp64"] <= shape["server_max_abs_diff_vs_fp64"]
    targets = {target["target"] for target in record["targets"]}
    assert "tiny_qwen.speedup_vs_verl >= 1.5" in targets and "speedup_vs_verl >= 1.5" not in targets
    if scoring_verl.verl_available():
        assert shape["max_abs_diff_vs_verl"] <= 1e-5 and shape["factor_rest"] > 0
        assert shape["verl_max_abs_diff_vs_fp64"] <= 1e-5
        assert figures["prediction_qwen2_5_7b"]["cpu_rates_from"] == "tiny-qwen"
        assert 0 <= shape["verl_repacked_max_abs_diff"] <= 1e-5  # verl against itself, packed otherwise
    assert 0 <= shape["server_repacked_max_abs_diff"] <= 1e-5


def test_quick_scoring_on_grpo_groups_times_the_shared_prompt_body(monkeypatch, tmp_path):
    from bench import scoring, shapes
    from bench.__main__ import main

    monkeypatch.setitem(shapes.MEASURED, "tiny-qwen", _tiny_qwen())
    monkeypatch.setattr(scoring, "QUICK", scoring.Size(scoring.TEST_SIZE.model, requests=4, repeats=1, max_response=64,
                                                      dtypes=("float32",), real_shape_requests=4))
    output = tmp_path / "scoring.json"
    assert main(["scoring", "--quick", "--cpu-heap", "system", "--shape", "tiny-qwen", "--group-size", "2", "--json", str(output)]) == 0
    shape = json.loads(output.read_text())["figures"]["tiny_qwen"]
    assert shape["group_size"] == 2 and shape["body_shared_prompts_s"] > 0 and shape["factor_shared_prompts"] > 0
    assert shape["body_flops_shared_prompts"] < shape["body_flops"]
    assert shape["max_abs_diff_between_paths"] <= 1e-5  # the shared server path agrees with the baselines
    assert shape["server_max_abs_diff_vs_fp64"] <= 1e-5
    for wrong in (["sync", "--group-size", "2"], ["scoring", "--group-size", "0"]):
        with pytest.raises(SystemExit):
            main(wrong)


def test_float64_anchor_is_skipped_with_a_reason_when_memory_is_short(monkeypatch, tiny_model):
    from bench import scoring_fp64

    monkeypatch.setattr(scoring_fp64, "HEADROOM", 1e12)
    figures = scoring_fp64.errors_vs_float64(tiny_model, 10**6, [], {"server": []})
    assert figures == {"fp64_reference": figures["fp64_reference"]} and figures["fp64_reference"].startswith("skipped")


def test_quick_trainer_savings_times_each_part_of_the_decoupled_step(monkeypatch, tmp_path):
    """`python -m bench trainer_savings --quick` on a tiny stand-in for the 0.5B shape: every part
    verl's decoupled mode runs is timed, and the ratios to the update are formed. No timing asserted."""
    from bench import scoring_verl, trainer_savings
    from bench.__main__ import main

    monkeypatch.setattr(trainer_savings, "QUICK", trainer_savings.Size(_tiny_qwen(), requests=4, max_tokens=300, rounds=1))
    output = tmp_path / "savings.json"
    assert main(["trainer_savings", "--quick", "--json", str(output)]) == 0
    figures = json.loads(output.read_text())["figures"]
    if not scoring_verl.verl_available():
        assert "verl not installed" in figures["verl_baseline"]
        return
    for key in ("save_s", "restore_old_s", "recompute_s", "restore_current_s", "update_s"):
        assert figures[key] > 0, key
    # what the server removes is more than the recompute: the save and both restores too (the
    # arithmetic on controlled times is checked in tests/test_bench_figures.py)
    assert figures["removed_per_step_s"] > figures["recompute_s"]
    assert figures["removed_per_step_s"] > figures["removed_per_step_window_mean_s"]


@pytest.mark.gpu
def test_scoring_paths_and_cause_split_run_on_cuda(tiny_model):
    """The tiny-shape scoring comparison on CUDA: every path hands its log-probs back on the CPU
    (the server's are numpy), they agree, and the cause split indexes CUDA hidden states with
    its CPU-made positions and targets. Skipped without CUDA (tests/conftest.py)."""
    from bench import scoring, scoring_causes
    from bench.scoring import rl_length_mix
    from model_engine_server.engines.base import EngineSpec, build_engine

    engine = build_engine("hf", EngineSpec(model_path=str(tiny_model), device="cuda"))
    assert engine.device.type == "cuda"
    requests = [r.model_copy(update={"input_ids": r.input_ids[:200], "response_start": 60})
                for r in rl_length_mix(4, 512, seed=2)]
    figures, outputs = scoring._measure(engine, None, requests, 1, "")
    assert all(values.device.type == "cpu" for values in outputs["server"])
    assert figures["max_abs_diff_between_paths"] <= 1e-5
    assert figures["mfu"] > 0 and figures["gemm_flops_per_s"] > 0
    causes = scoring_causes.measure_causes(engine, requests, 256, repeats=1)
    assert causes["head_paths_max_abs_diff"] <= 1e-5 and causes["body_sdpa_mask_max_abs_diff"] <= 1e-5
    assert causes["factor_attention"] > 0
