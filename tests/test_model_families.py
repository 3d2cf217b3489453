"""HF model families beyond the three tiny ones the other tests build: what packing changes for
them is applied (sliding windows) or refused at build with the reason (output scales the
engine would skip, layers that carry state from one packed sequence into the next).

Each failed before: Mistral and Phi-3 ran full causal attention past their window (log-probs
off by up to 4.9), Granite's `logits_scaling` was skipped (off by 3.2), and LFM2's conv layers
and Qwen3-Next's linear attention ran each packed sequence on from the one before (off by 2.8
and 4.2), all answered as if exact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec
from model_engine_server.engines.hf import HFEngine
from model_engine_server.protocol import LogProbRequest
from tests.helpers import reference_log_probs, reference_model

TOLERANCE = 1e-5  # fp32 log-probs against a plain transformers forward of each sequence alone
VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)


def _save(tmp_path: Path, config_class: str, **settings: Any) -> Path:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **settings})
    path = tmp_path / config_class
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _requests(seed: int) -> list[LogProbRequest]:
    """Lengths on both sides of the window, and a GRPO group whose shared prompt outgrows it."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    prompt = ids(11)
    singles = [LogProbRequest(input_ids=ids(n), response_start=start, temperature=t, return_entropy=True)
               for n, start, t in [(5, 1, 1.0), (30, 3, 0.7), (17, 16, 1.0), (40, 20, 1.3)]]
    group = [LogProbRequest(input_ids=prompt + ids(n), response_start=len(prompt), temperature=1.0, return_entropy=True) for n in (3, 9, 19)]
    return singles + group


@pytest.mark.parametrize("config_class,window", [("MistralConfig", 6), ("Phi3Config", 6), ("Qwen2Config", 6),
                                                 ("Exaone4Config", 6)])
def test_sliding_window_attention_is_applied_to_packed_and_shared_prompt_rows(tmp_path, config_class, window):
    settings: dict[str, Any] = {"sliding_window": window}
    if config_class == "Qwen2Config":  # Qwen2 keeps the window per layer, only where asked
        settings.update(use_sliding_window=True, max_window_layers=0)
    if config_class == "Exaone4Config":  # the window on every layer's attribute, None passed by full layers
        settings.update(layer_types=["sliding_attention", "full_attention"])
    if config_class == "Phi3Config":
        settings.update(pad_token_id=0)
    path = _save(tmp_path, config_class, **settings)
    engine = HFEngine(EngineSpec(model_path=str(path), device="cpu"))
    requests = _requests(seed=len(config_class))
    outcomes = ModelEngineServerAdapter(engine).score(requests)
    reference = reference_model(path)  # eager attention applies the window through its mask
    worst = 0.0
    for request, outcome in zip(requests, outcomes, strict=True):
        expected, expected_entropy = reference_log_probs(reference, request)
        worst = max(worst, float((torch.from_numpy(outcome.log_probs) - expected).abs().max()))
        torch.testing.assert_close(torch.from_numpy(outcome.entropy), expected_entropy, atol=TOLERANCE, rtol=0)
    assert worst <= TOLERANCE, f"{config_class}: max |diff| {worst:.3g}"


def test_an_output_scale_the_engine_would_skip_is_refused_at_build(tmp_path):
    path = _save(tmp_path, "GraniteConfig", logits_scaling=8.0)
    with pytest.raises(ValueError, match="logits_scaling"):
        HFEngine(EngineSpec(model_path=str(path), device="cpu"))
    assert HFEngine(EngineSpec(model_path=str(_save(tmp_path / "one", "GraniteConfig", logits_scaling=1.0)), device="cpu"))


@pytest.mark.parametrize("config_class,settings,kind", [
    ("Lfm2Config", {"layer_types": ["conv", "full_attention"]}, "conv"),
    ("Qwen3NextConfig", {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16, "num_experts": 0,
                         "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                         "linear_value_head_dim": 16}, "linear_attention"),
])
def test_layers_that_carry_state_along_a_packed_row_are_refused_at_build(tmp_path, config_class, settings, kind):
    path = _save(tmp_path, config_class, **settings)
    with pytest.raises(ValueError, match=rf"cannot run on packed rows \({kind}\)"):
        HFEngine(EngineSpec(model_path=str(path), device="cpu"))


async def test_a_model_transformers_renames_on_load_scores_but_refuses_weight_syncs_with_the_reason(tmp_path):
    """A mixture of experts: transformers merges its per-expert checkpoint tensors into one
    parameter, so syncs by checkpoint name cannot land. Once such an update began, failed tensor
    by tensor and left the server refusing to score; now begin refuses it and scoring goes on."""
    from model_engine_server.errors import WeightSyncError
    from model_engine_server.local import build_local_server

    path = _save(tmp_path, "Qwen2MoeConfig", moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    server = build_local_server(EngineSpec(model_path=str(path), device="cpu"))
    request = LogProbRequest(input_ids=list(range(3, 23)), response_start=5, temperature=1.0)
    try:
        with pytest.raises(WeightSyncError, match="cannot take weight syncs"):
            await server.begin_weight_update(1)
        result = await server.submit(request)
        assert result.weight_version == 0
        expected, _ = reference_log_probs(reference_model(path), request)
        torch.testing.assert_close(torch.from_numpy(result.log_probs), expected, atol=TOLERANCE, rtol=0)
    finally:
        await server.shutdown()


@pytest.mark.parametrize("config_class,settings", [("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
                                                   ("BioGptConfig", {})])
def test_an_attention_that_lets_packed_sequences_meet_is_refused_at_build_and_the_default_is_exact(
    tmp_path, config_class, settings
):
    """OPT and BioGPT build their causal mask without `position_ids`, so under `sdpa` or `eager`
    their packed sequences attend to each other (off by about 0.5 on average, answered as if
    exact; `sdpa` was the default on CUDA without flash-attn). The start-up probe refuses them;
    the default attention keeps the sequences apart."""
    path = _save(tmp_path, config_class, **settings)
    for attention in ("sdpa", "eager"):
        with pytest.raises(ValueError, match=f"attention '{attention}': log-probs of sequences packed in one row differ"):
            HFEngine(EngineSpec(model_path=str(path), device="cpu", attn_implementation=attention))
    engine = HFEngine(EngineSpec(model_path=str(path), device="cpu"))
    requests = _requests(seed=11)
    reference = reference_model(path)
    for request, outcome in zip(requests, ModelEngineServerAdapter(engine).score(requests), strict=True):
        expected, _ = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(outcome.log_probs), expected, atol=TOLERANCE, rtol=0)


def test_a_head_that_does_more_than_the_output_embedding_is_refused_at_build(tmp_path):
    """ModernBERT's decoder computes its logits as decoder(dense + norm(hidden)); the engine reads
    only the output embedding, which was off by 3.3."""
    path = _save(tmp_path, "ModernBertDecoderConfig", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 cls_token_id=1, sep_token_id=2)
    with pytest.raises(ValueError, match="the model's head does more than its output embedding"):
        HFEngine(EngineSpec(model_path=str(path), device="cpu"))


def test_a_family_without_the_packed_attention_says_so_at_build(tmp_path):
    path = _save(tmp_path, "FalconConfig")
    with pytest.raises(ValueError, match="has no attention 'packed_sdpa'"):
        HFEngine(EngineSpec(model_path=str(path), device="cpu"))


def test_a_family_whose_layers_keep_the_forwards_keywords_to_themselves_is_packed_exactly(tmp_path):
    """StableLM's decoder layers call attention without the forward's keywords, so the packed
    row's boundaries reach `packed_sdpa` only through `packed_attention.row_layout` (before, its
    packed sequences attended to each other: off by 2.2)."""
    path = _save(tmp_path, "StableLmConfig")
    engine = HFEngine(EngineSpec(model_path=str(path), device="cpu"))
    requests = _requests(seed=7)
    outcomes = ModelEngineServerAdapter(engine).score(requests)
    reference = reference_model(path)
    for request, outcome in zip(requests, outcomes, strict=True):
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(outcome.log_probs), expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(torch.from_numpy(outcome.entropy), expected_entropy, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("config_class,rope,plain", [
    ("LlamaConfig", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
     {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("Phi3Config", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 64, "rope_theta": 10000.0}, None),
])
def test_rotary_frequencies_set_by_the_forwards_length_are_refused_at_build(tmp_path, config_class, rope, plain):
    extra = {"pad_token_id": 0} if config_class == "Phi3Config" else {}
    path = _save(tmp_path, config_class, rope_parameters=rope, **extra)
    with pytest.raises(ValueError, match=f"rope_type {rope['rope_type']}"):
        HFEngine(EngineSpec(model_path=str(path), device="cpu"))
    plain_settings = {"rope_parameters": plain} if plain else {}
    assert HFEngine(EngineSpec(model_path=str(_save(tmp_path / "plain", config_class, **extra, **plain_settings)),
                               device="cpu"))


def test_cuda_without_flash_attn_takes_the_packed_attention_not_sdpa():
    import importlib.util

    from model_engine_server.engines.hf import pick_attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: CUDA takes it")
    assert pick_attention(torch.device("cuda"), None) == "packed_sdpa"
    assert pick_attention(torch.device("cuda"), "sdpa") == "sdpa"  # asked for: the start-up probe decides
