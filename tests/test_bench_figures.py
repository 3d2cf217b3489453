"""The benchmarks' arithmetic and timing order on controlled inputs: no timing is asserted."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench.common import alternating_best


def test_alternating_rounds_start_one_path_later_each_time():
    order: list[str] = []
    steps = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timed = alternating_best(steps, repeats=4)
    assert order == list("abc" "bca" "cab" "abc")
    assert set(timed) == {"a", "b", "c"}


def test_gemm_rate_counts_every_matmul_of_the_timed_step(monkeypatch):
    """Several matmuls per synchronize (how a GPU reaches its rate): each one's FLOPs count."""
    from bench import flops

    calls: list[int] = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: calls.append(1) or real_mm(*args, **kwargs))

    def one_run(step: Any, repeats: int, warmup: int = 1) -> float:
        step()
        return 2.0  # seconds the step "took"

    monkeypatch.setattr(flops, "best_time", one_run)
    rate = flops.gemm_flops_per_s(torch.float32, size=8, batch=3)
    assert len(calls) == 3
    assert rate == pytest.approx(2 * 8**3 * 3 / 2.0)


STEP_KEYS = ("save_s_as_verl_on_cpu", "save_s", "restore_old_s", "recompute_s", "restore_current_s", "update_s")


def test_trainer_savings_keep_a_quickest_real_step_and_average_the_restores_over_the_window(monkeypatch):
    """Controlled step times: the quickest whole step is kept (its update too, not the least
    update of another round; verl's alias-only save left out of the choice), a step after the
    window's first removes save + recompute + both restores, and over verl's 4-step window the
    restores count 3/4 (the window's first step swaps nothing)."""
    from types import SimpleNamespace

    from bench import trainer_savings

    warm_up = dict(zip(STEP_KEYS, (0.0, 9.0, 9.0, 90.0, 9.0, 90.0)))
    slower_but_least_update = dict(zip(STEP_KEYS, (0.0, 2.0, 4.0, 20.0, 4.0, 18.0)))  # 48 s
    quickest = dict(zip(STEP_KEYS, (100.0, 1.0, 2.0, 10.0, 2.0, 20.0)))  # 35 s less the alias save
    steps = iter([warm_up, slower_but_least_update, quickest])
    monkeypatch.setattr(trainer_savings, "one_step", lambda verl, requests, old: next(steps))
    monkeypatch.setattr(trainer_savings, "actor_loss", lambda requests: None)
    monkeypatch.setattr(trainer_savings, "save_shards", lambda module, copy_on_cpu: ({"w": (torch.zeros(10), None)}, None))
    verl = SimpleNamespace(worker=SimpleNamespace(set_loss_fn=lambda loss: None, engine=SimpleNamespace(module=None)))
    figures = trainer_savings.measure(verl, [], rounds=2)
    assert figures["update_s"] == 20.0
    assert figures["removed_per_step_s"] == pytest.approx(15.0)  # 1 + 2 + 10 + 2
    assert figures["removed_per_step_window_mean_s"] == pytest.approx(14.0)  # 1 + 10 + 4 x 3/4
    assert figures["save_restore_s"] == pytest.approx(5.0)
    assert figures["removed_over_update"] == pytest.approx(0.75)
    assert figures["trainer_step_speedup_without_them"] == pytest.approx(1.75)
    assert figures["copy_bytes_per_step"] == 3 * 40  # one save and two restores of 10 fp32 values


def test_sync_streams_into_the_gpu_where_cuda_is_present(monkeypatch):
    """gloo and ray get the server's weights on cuda:0 on a GPU machine, in host memory without
    one (the one-GPU run used to repeat the CPU measurement)."""
    from bench import sync

    seen: list[tuple[str, str]] = []

    async def measure(backend: str, source: Any, repeats: int, bucket_bytes: int, device: str = "cpu") -> dict[str, Any]:
        seen.append((backend, device))
        return {}

    monkeypatch.setattr(sync, "measure_backend", measure)
    monkeypatch.setattr(sync, "_ensure_ray", lambda: False)
    monkeypatch.setattr(sync, "decoder_shapes", lambda quick: {"w": (4, 4)})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for available, device in ((True, "cuda:0"), (False, "cpu")):
        seen.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        figures = sync.run(quick=True)
        assert seen == [("gloo", device)] and figures["server_device"] == device
        assert "skipped" in figures["nccl"]


def test_forward_flops_count_matches_hand_count():
    from types import SimpleNamespace

    from bench.flops import forward_flops

    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                             intermediate_size=16, vocab_size=100, head_dim=4)
    # projections: q 8x8, o 8x8, k 8x4, v 8x4 = 192; mlp 3 x 8 x 16 = 384; per token 2 x 576 = 1152
    # attention, L=3: 2 x 2 x 6 x 8 = 192; LM head on 2 scored tokens: 2 x 2 x 8 x 100 = 3200
    assert forward_flops(config, [(3, 2)]) == 1152 * 3 + 192 + 3200


def test_forward_flops_split_separates_body_from_lm_head():
    from types import SimpleNamespace

    from bench.flops import forward_flops, forward_flops_split, linear_flops

    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                             intermediate_size=16, vocab_size=100, head_dim=4)
    body, head = forward_flops_split(config, [(3, 2)])
    assert (body, head) == (1152 * 3 + 192, 3200)  # the hand count of the test above
    assert forward_flops(config, [(3, 2)]) == body + head
    # the GEMM part alone: the forward less its causal attention scores (192 here)
    assert linear_flops(config, [(3, 2)]) == body + head - 192
    assert linear_flops(config, [(3, 2), (5, 1, 3)]) == 1152 * 8 + 3200 * 3 / 2


def test_float64_distances_summarise_every_scored_token():
    from bench.scoring_fp64 import distances

    truth = [torch.zeros(3, dtype=torch.float64), torch.zeros(97, dtype=torch.float64)]
    values = [torch.tensor([0.0, 0.0, 5e-5]), torch.full((97,), 1e-6)]  # one bad token in 100
    figures = distances("server", values, truth)
    assert figures["server_max_abs_diff_vs_fp64"] == pytest.approx(5e-5)
    assert figures["server_p99_abs_diff_vs_fp64"] < 5e-5  # the worst token alone does not set it
    assert figures["server_mean_abs_diff_vs_fp64"] == pytest.approx((5e-5 + 97 * 1e-6) / 100, rel=1e-6)
    assert distances("server", [], []) == {}
