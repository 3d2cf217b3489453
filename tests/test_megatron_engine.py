"""The Megatron engine in this process (TP = PP = 1): exactness against the HF engine, weights
by HF name, and the errors a user sees at start.

Model-parallel layouts (TP=2, PP=2, TP2 x PP2) run in spawned processes: test_megatron_parallel.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("mbridge")

from model_engine_server.adapter import ModelEngineServerAdapter  # noqa: E402
from model_engine_server.engines.base import EngineSpec, build_engine, engine_backends  # noqa: E402
from model_engine_server.engines.megatron import MegatronEngine  # noqa: E402
from model_engine_server.engines.megatron_bridge import MegatronConfigError  # noqa: E402
from model_engine_server.engines.megatron_packing import PerSequenceRotary, block_causal_mask  # noqa: E402
from model_engine_server.engines.megatron_parallel import check_layout  # noqa: E402
from model_engine_server.errors import WeightSyncError  # noqa: E402
from model_engine_server.packing import PackedBatch, pack_sequences  # noqa: E402
from model_engine_server.tiny_model import perturbed_weights  # noqa: E402
from tests.helpers import random_requests  # noqa: E402

TOLERANCE = 1e-5
CHECKPOINTS = ["qwen2_tied", "qwen2_untied", "llama_untied", "qwen3_tied"]


def _scores(engine, requests) -> list:  # -> list[ScoreOutput]
    # small micro-batches and chunks: several packed rows of varied lengths, several chunks each
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=1024, logprob_chunk_mb=1)
    outputs = adapter.score(requests)
    assert all(hasattr(output, "log_probs") for output in outputs), outputs
    return outputs


def _assert_same_scores(actual: list, expected: list, tolerance: float = TOLERANCE) -> None:
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got.log_probs, want.log_probs, atol=tolerance, rtol=0)
        np.testing.assert_allclose(got.entropy, want.entropy, atol=tolerance, rtol=0)


def _snapshot(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Copies: `export_weights` may yield live views of the parameters, as the HF engine does."""
    return {name: tensor.clone() for name, tensor in engine.export_weights()}


@pytest.fixture
def open_engines() -> Iterator[list[MegatronEngine]]:
    """Engines built by a test; closed afterwards so no process group they started outlives the
    test (one that was there before, e.g. the cached verl reference worker's, stays)."""
    was_initialized = torch.distributed.is_initialized()
    engines: list[MegatronEngine] = []
    yield engines
    for engine in engines:
        engine.close()
    assert torch.distributed.is_initialized() == was_initialized


def _megatron(open_engines: list, path: Path, **spec_fields) -> MegatronEngine:
    engine = build_engine("megatron", EngineSpec(model_path=str(path), **spec_fields))
    assert isinstance(engine, MegatronEngine)
    open_engines.append(engine)
    return engine


def test_megatron_is_a_registered_backend():
    assert {"hf", "megatron"} <= set(engine_backends())


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_tp1_log_probs_and_entropy_equal_hf_engine(tiny_models, open_engines, checkpoint):
    path = tiny_models[checkpoint]
    megatron = _megatron(open_engines, path)
    hf = build_engine("hf", EngineSpec(model_path=str(path)))
    requests = random_requests(16, hf.info.vocab_size, seed=11, max_len=400)
    _assert_same_scores(_scores(megatron, requests), _scores(hf, requests))
    assert megatron.returns_results
    assert megatron.info.tied_embeddings == hf.info.tied_embeddings
    assert megatron.info.num_parameters == hf.info.num_parameters
    # the same HF names with the same full shapes: what a weight sync must deliver
    megatron_specs, hf_specs = megatron.weight_specs(), hf.weight_specs()
    assert {name: spec.shape for name, spec in megatron_specs.items()} == {
        name: spec.shape for name, spec in hf_specs.items()
    }
    exported = dict(megatron.export_weights())
    assert set(exported) == set(hf_specs)
    for name, tensor in hf.export_weights():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0)


def test_a_sequence_scores_the_same_alone_and_packed_late_in_a_long_row(tiny_models, open_engines):
    """Per-sequence RoPE and the block-diagonal mask: nothing packed before a sequence matters."""
    engine = _megatron(open_engines, tiny_models["llama_untied"])
    requests = random_requests(4, engine.info.vocab_size, seed=5, min_len=300, max_len=400)
    batch = pack_sequences([r.input_ids for r in requests], [r.response_start for r in requests])
    packed, _ = engine.score_packed(batch, torch.ones(batch.targets.shape[0]), False, None)
    last = requests[-1]
    alone, _ = engine.score_packed(
        pack_sequences([last.input_ids], [last.response_start]), torch.ones(last.num_response_tokens), False, None
    )
    torch.testing.assert_close(packed[batch.score_offsets[-2]:], alone, atol=TOLERANCE, rtol=0)

    # the comparison has the power to catch leakage: one causal block over the whole row
    leaky = PackedBatch(
        input_ids=batch.input_ids,
        position_ids=torch.arange(batch.num_tokens).unsqueeze(0),
        cu_seqlens=torch.tensor([0, batch.num_tokens], dtype=torch.int32),
        score_positions=batch.score_positions,
        targets=batch.targets,
        score_offsets=batch.score_offsets,
    )
    leaked, _ = engine.score_packed(leaky, torch.ones(batch.targets.shape[0]), False, None)
    assert (leaked[batch.score_offsets[-2]:] - alone).abs().max() > 1e-3


def test_weight_update_equals_hf_engine_with_the_same_weights(tiny_models, open_engines):
    path = tiny_models["qwen2_tied"]
    megatron = _megatron(open_engines, path)
    hf = build_engine("hf", EngineSpec(model_path=str(path)))
    new_weights = perturbed_weights(dict(hf.export_weights()), seed=3, scale=0.05)
    requests = random_requests(8, hf.info.vocab_size, seed=2)
    before = _scores(megatron, requests)
    names = list(new_weights)
    loaded = []
    for start in range(0, len(names), 5):  # buckets that split q/k/v and gate/up groups
        loaded += megatron.load_weights([(name, new_weights[name]) for name in names[start : start + 5]])
    hf.load_weights(new_weights.items())
    assert set(loaded) == set(megatron.weight_specs())
    after = _scores(megatron, requests)
    _assert_same_scores(after, _scores(hf, requests))
    assert max(np.abs(a.log_probs - b.log_probs).max() for a, b in zip(after, before)) > 1e-3


@pytest.mark.parametrize("checkpoint", ["qwen2_tied", "llama_untied", "qwen3_tied"])
def test_non_contiguous_tensors_load_like_contiguous_ones(tiny_models, open_engines, checkpoint):
    """A transposed view, as an in-process trainer may hold, loads exactly (parts of a fused
    parameter are kept contiguous: mbridge views them flat)."""
    megatron = _megatron(open_engines, tiny_models[checkpoint])
    new = perturbed_weights(_snapshot(megatron), seed=4, scale=0.05)
    strided = [(name, t.t().contiguous().t() if t.dim() == 2 else t) for name, t in new.items()]
    assert any(not t.is_contiguous() for _, t in strided)
    megatron.load_weights(strided)
    after = _snapshot(megatron)
    for name, tensor in new.items():
        torch.testing.assert_close(after[name], tensor, atol=0, rtol=0)


def test_a_parameter_changes_only_once_all_its_hf_parts_arrived(tiny_models, open_engines):
    engine = _megatron(open_engines, tiny_models["qwen3_tied"])
    old = _snapshot(engine)
    prefix = "model.layers.1.self_attn."
    new = {f"{prefix}{p}_proj.weight": old[f"{prefix}{p}_proj.weight"] + 1.0 for p in "qkv"}
    q_name = f"{prefix}q_proj.weight"
    reused_buffer = new[q_name].clone()
    engine.load_weights([(q_name, reused_buffer)])
    torch.testing.assert_close(dict(engine.export_weights())[q_name], old[q_name], atol=0, rtol=0)
    reused_buffer.zero_()  # a transport may reuse its bucket buffer for the next bucket
    engine.load_weights([(name, tensor) for name, tensor in new.items() if name != q_name])
    exported = dict(engine.export_weights())
    for name, tensor in new.items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0)


@pytest.mark.parametrize("checkpoint", ["qwen3_tied", "llama_untied"])
def test_a_part_sent_again_in_one_sync_wins_as_on_the_hf_engine(tiny_models, open_engines, checkpoint):
    """q (of q/k/v) and up (of gate/up) sent again after their parameters were written whole:
    the last copy is what serves, and the parameters' other parts keep this sync's values."""
    engine = _megatron(open_engines, tiny_models[checkpoint])
    hf = build_engine("hf", EngineSpec(model_path=str(tiny_models[checkpoint])))
    first = perturbed_weights(_snapshot(engine), seed=5, scale=0.05)
    engine.discard_partial_weights()  # as every sync begins
    engine.load_weights(first.items())
    resent = {
        name: first[name] + 0.5
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")
    }
    assert set(engine.load_weights(resent.items())) == set(resent)
    last = {**first, **resent}
    exported = _snapshot(engine)
    for name, tensor in last.items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0, msg=name)
    hf.load_weights(last.items())
    requests = random_requests(4, hf.info.vocab_size, seed=6)
    _assert_same_scores(_scores(engine, requests), _scores(hf, requests))


@pytest.mark.parametrize(
    "bad",
    [
        ("model.layers.9.mlp.up_proj.weight", None, "unknown weight name"),
        ("model.norm.weight", (65,), "has shape"),
        ("model.norm.weight", torch.float16, "has dtype"),
    ],
    ids=["unknown-name", "wrong-shape", "wrong-dtype"],
)
def test_a_rejected_tensor_fails_the_sync_and_changes_nothing(tiny_models, open_engines, bad):
    engine = _megatron(open_engines, tiny_models["llama_untied"])
    name, change, message = bad
    before = _snapshot(engine)
    tensor = torch.ones(64)
    if isinstance(change, tuple):
        tensor = torch.ones(change)
    elif isinstance(change, torch.dtype):
        tensor = tensor.to(change)
    with pytest.raises(WeightSyncError, match=message):
        engine.load_weights([(name, tensor)])
    for key, value in engine.export_weights():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_dtype_cast_is_allowed_when_configured(tiny_models, open_engines):
    engine = _megatron(open_engines, tiny_models["llama_untied"], allow_dtype_cast=True)
    assert engine.load_weights([("model.norm.weight", torch.full((64,), 2.0, dtype=torch.bfloat16))]) == ["model.norm.weight"]
    assert torch.equal(dict(engine.export_weights())["model.norm.weight"], torch.full((64,), 2.0))


def test_a_bf16_engine_exports_what_its_layout_promises_and_a_peer_loads_its_export(tiny_models, open_engines):
    """The local layer spec made its norm weights float32 under a bf16 model: the export (what a
    restarted peer copies) was refused by the peer, and pipeline stages broke their broadcast."""
    engine = _megatron(open_engines, tiny_models["llama_untied"], dtype="bfloat16")
    specs = engine.weight_specs()
    exported = {name: tensor.clone() for name, tensor in engine.export_weights()}
    assert {name: tensor.dtype for name, tensor in exported.items()} == {name: spec.dtype for name, spec in specs.items()}
    assert set(specs.values()) and all(spec.dtype == torch.bfloat16 for spec in specs.values())
    assert sorted(engine.load_weights(exported.items())) == sorted(exported)


def test_tied_lm_head_name_is_accepted_as_the_embedding(tiny_models, open_engines):
    engine = _megatron(open_engines, tiny_models["qwen2_tied"])
    embedding = _snapshot(engine)["model.embed_tokens.weight"]
    assert "lm_head.weight" not in engine.weight_specs()
    engine.load_weights([("lm_head.weight", embedding * 2)])
    torch.testing.assert_close(dict(engine.export_weights())["model.embed_tokens.weight"], embedding * 2)


# ------------------------------------------------------------------ errors at start


def _config_only_checkpoint(folder: Path, config) -> Path:  # noqa: ANN001
    config.save_pretrained(folder)
    return folder


def test_architecture_mbridge_does_not_map_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    path = _config_only_checkpoint(tmp_path, GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(MegatronConfigError, match="'gpt2' is not supported by mbridge"):
        build_engine("megatron", EngineSpec(model_path=str(path)))


def test_architecture_outside_the_dense_families_is_a_clear_error(tmp_path):
    from transformers import MixtralConfig

    path = _config_only_checkpoint(tmp_path, MixtralConfig(num_hidden_layers=1, hidden_size=32))
    with pytest.raises(MegatronConfigError, match="'mixtral' is mapped by mbridge, but"):
        build_engine("megatron", EngineSpec(model_path=str(path)))


def test_rope_scaling_mbridge_cannot_map_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(MegatronConfigError, match="RoPE scaling 'linear'"):
        build_engine("megatron", EngineSpec(model_path=str(_config_only_checkpoint(tmp_path, config))))


def test_model_parallelism_without_the_replica_process_group_is_a_clear_error(tiny_model):
    if torch.distributed.is_initialized():
        pytest.skip("a process group from another test is alive")
    with pytest.raises(MegatronConfigError, match="needs torch.distributed initialised"):
        build_engine("megatron", EngineSpec(model_path=str(tiny_model)), tensor_model_parallel_size=2)


def test_a_layout_error_leaves_no_process_group_behind(tiny_model):
    if torch.distributed.is_initialized():
        pytest.skip("a process group from another test is alive")
    with pytest.raises(MegatronConfigError, match="data_parallel_size"):
        build_engine("megatron", EngineSpec(model_path=str(tiny_model)), data_parallel_size=2)
    assert not torch.distributed.is_initialized()


def test_layout_must_cover_the_replica_exactly():
    assert check_layout(2, 1, 2) == 1
    assert check_layout(2, 1, 4) == 2  # two data-parallel copies of a TP=2 group
    assert check_layout(1, 2, 4, dp_size=2) == 2
    with pytest.raises(MegatronConfigError, match=r"\(2\) x pipeline_model_parallel_size \(2\) = 4, but the replica has 2"):
        check_layout(2, 2, 2)
    with pytest.raises(MegatronConfigError, match="data_parallel_size"):
        check_layout(2, 1, 4, dp_size=1)
    with pytest.raises(MegatronConfigError, match=">= 1"):
        check_layout(0, 1, 1)


# ------------------------------------------------------------------ packing pieces


def test_block_causal_mask_forbids_exactly_other_sequences_and_the_future():
    cu_seqlens = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    mask = block_causal_mask(cu_seqlens, 9, torch.device("cpu"))
    sequence = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    expected = torch.tensor([[not (sequence[i] == sequence[j] and j <= i) for j in range(9)] for i in range(9)])
    assert mask.shape == (1, 1, 9, 9) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


def test_per_sequence_rotary_takes_each_token_angle_from_its_own_position():
    class Table(torch.nn.Module):
        def forward(self, length: int) -> torch.Tensor:
            return torch.arange(length, dtype=torch.float32).view(length, 1, 1, 1).expand(length, 1, 1, 4)

    table = Table()
    hook = PerSequenceRotary(table)
    assert torch.equal(table(5), Table.forward(table, 5))  # no positions: unchanged
    hook.position_ids = torch.tensor([0, 1, 2, 0, 1])
    assert table(5)[:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1]
    hook.remove()
    assert table(5)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
