"""The Megatron engine across processes on CPU (gloo): TP=2, PP=2 and TP=2 x PP=2.

One spawn of 4 processes runs every layout for every tiny checkpoint, a weight update through
the transport's bucket format, and the layout errors; each rank saves what it saw and the
tests below compare that with the HF engine in this process. Megatron's import and process
start-up dominate on 2 cores, so the processes are started once for the whole module.
World size 4 means TP=2 and PP=2 run as two data-parallel copies each, as in a replica whose
GPU count is a multiple of TP x PP.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("mbridge")
pytestmark = pytest.mark.timeout(600)  # the module's one spawn is paid by its first test

from model_engine_server.adapter import ModelEngineServerAdapter  # noqa: E402
from model_engine_server.protocol import ScoreOutput  # noqa: E402
from model_engine_server.engines.base import EngineSpec, build_engine  # noqa: E402
from model_engine_server.tiny_model import perturbed_weights  # noqa: E402
from tests.helpers import random_requests  # noqa: E402

TOLERANCE = 1e-5
WORLD_SIZE = 4
CHECKPOINTS = ["qwen2_tied", "qwen2_untied", "llama_untied", "qwen3_tied"]
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (TP, PP)
UPDATE_CHECKPOINT = "qwen2_untied"
UPDATE_LAYOUTS = [(2, 1), (2, 2)]
BUCKET_BYTES = 16 * 1024  # small: q/k/v and gate/up of one parameter land in different buckets


def _requests():  # the same on every rank and in the parent
    return random_requests(12, 512, seed=21, max_len=400)


def _score(engine) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=1024, logprob_chunk_mb=1)
    outputs = adapter.score(_requests())
    for output in outputs:
        if not hasattr(output, "log_probs"):
            raise AssertionError(f"scoring failed: {output}")
    return [(output.log_probs, output.entropy) for output in outputs]


def _score_top_k(engine) -> list[object]:  # noqa: ANN001
    """Top-k outcomes: (ids, log-probs, ranks) per request, or the refusal's message."""
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=1024, logprob_chunk_mb=1)
    requests = [r.model_copy(update={"top_k": 10}) for r in _requests()[:4]]
    return [(o.top_k_ids, o.top_k_log_probs, o.target_ranks) if isinstance(o, ScoreOutput) else str(o)
            for o in adapter.score(requests)]


def _stream_through_buckets(engine, checkpoint: Path) -> list[str]:  # noqa: ANN001
    """The trainer's HF tensors, bucketed and unpacked as the transport does; buffers are reused."""
    from checkpoint_transport import group_into_buckets, iter_checkpoint, pack_bucket, unpack_bucket

    loaded: list[str] = []
    for index, group in enumerate(group_into_buckets(iter_checkpoint(checkpoint), BUCKET_BYTES)):
        flat, header = pack_bucket(group, version=1, index=index)
        loaded += engine.load_weights(unpack_bucket(flat, header))
        flat.zero_()  # a receiver may reuse its buffer for the next bucket
    return loaded


RESENT = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")


def _resend_two_parts(engine, checkpoint: Path) -> float:  # noqa: ANN001
    """After a whole sync of `checkpoint`, a q and an up part come again with new values: the
    largest distance of the exported weights from the checkpoint with those two replaced."""
    from checkpoint_transport import iter_checkpoint

    expected = {name: tensor.clone() for name, tensor in iter_checkpoint(checkpoint)}
    changed = {name: expected[name] + 0.5 for name in RESENT}
    engine.load_weights(changed.items())
    expected.update(changed)
    return max(float((tensor - expected[name]).abs().max()) for name, tensor in engine.export_weights())


def _run_rank(rank: int, port: int, models: dict[str, str], updated: str, out_dir: str) -> None:
    """Everything one rank does; all ranks run the same sequence of collective steps."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from model_engine_server.engines.megatron_bridge import MegatronConfigError

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120)
    )
    seen: dict[str, object] = {}

    def build(path: str, tp: int, pp: int, **kwargs):  # noqa: ANN202
        spec = EngineSpec(model_path=path)
        return build_engine("megatron", spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kwargs)

    for tp, pp in LAYOUTS:
        for name in CHECKPOINTS:
            engine = build(models[name], tp, pp)
            seen[f"score/{name}/{tp}x{pp}"] = _score(engine)
            seen[f"returns_results/{name}/{tp}x{pp}"] = engine.returns_results
            if name == "qwen2_tied":
                seen[f"top_k/{tp}x{pp}"] = _score_top_k(engine)
            if (tp, pp) == (2, 2):
                seen[f"export/{name}"] = {key: value.clone() for key, value in engine.export_weights()}
            engine.close()

    for tp, pp in UPDATE_LAYOUTS:
        engine = build(models[UPDATE_CHECKPOINT], tp, pp)
        seen[f"update/before/{tp}x{pp}"] = _score(engine)
        loaded = _stream_through_buckets(engine, Path(updated))
        seen[f"update/complete/{tp}x{pp}"] = set(loaded) == set(engine.weight_specs())
        seen[f"update/after/{tp}x{pp}"] = _score(engine)
        seen[f"update/resent/{tp}x{pp}"] = _resend_two_parts(engine, Path(updated))
        engine.close()
        engine = build(updated, tp, pp)
        seen[f"update/fresh/{tp}x{pp}"] = _score(engine)
        engine.close()

    for tp, pp, extra in [(2, 2, {"data_parallel_size": 2}), (3, 1, {})]:
        try:
            build(models["qwen2_tied"], tp, pp, **extra).close()
            seen[f"layout_error/{tp}x{pp}"] = None
        except MegatronConfigError as error:
            seen[f"layout_error/{tp}x{pp}"] = str(error)

    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def updated_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """`UPDATE_CHECKPOINT` after one 'optimizer step': what the trainer streams, also on disk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[UPDATE_CHECKPOINT], dtype=torch.float32)
    new_weights = perturbed_weights(dict(model.named_parameters()), seed=9, scale=0.05)
    model.load_state_dict(new_weights, strict=False)
    folder = tmp_path_factory.mktemp("updated") / UPDATE_CHECKPOINT
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def ranks(tiny_models, updated_checkpoint, tmp_path_factory) -> list[dict]:
    """What each of the 4 ranks saw (one spawn for the module)."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("megatron_ranks")
    models = {name: str(tiny_models[name]) for name in CHECKPOINTS}
    mp.start_processes(
        _run_rank,
        args=(_free_port(), models, str(updated_checkpoint), str(out_dir)),
        nprocs=WORLD_SIZE,
        start_method="spawn",
    )
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _hf_scores(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return _score(build_engine("hf", EngineSpec(model_path=str(path))))


def _assert_close(actual, expected, tolerance: float = TOLERANCE) -> None:  # noqa: ANN001
    for (log_probs, entropy), (want_log_probs, want_entropy) in zip(actual, expected, strict=True):
        np.testing.assert_allclose(log_probs, want_log_probs, atol=tolerance, rtol=0)
        np.testing.assert_allclose(entropy, want_entropy, atol=tolerance, rtol=0)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_tp2_pp2_and_tp2xpp2_equal_hf_engine_on_every_rank(ranks, tiny_models, checkpoint):
    """The rank that returns results matches HF within 1e-5; the others hold the same results."""
    expected = _hf_scores(tiny_models[checkpoint])
    for tp, pp in LAYOUTS:
        for seen in ranks:
            _assert_close(seen[f"score/{checkpoint}/{tp}x{pp}"], expected)


def test_one_rank_per_model_parallel_group_returns_results(ranks):
    """Megatron's rank order (TP fastest, then DP, then PP): the last stage's TP rank 0."""
    returning = {
        layout: [rank for rank, seen in enumerate(ranks) if seen[f"returns_results/qwen2_tied/{layout}"]]
        for layout in ("2x1", "1x2", "2x2")
    }
    assert returning == {"2x1": [0, 2], "1x2": [2, 3], "2x2": [2]}


@pytest.mark.parametrize("layout", [f"{tp}x{pp}" for tp, pp in UPDATE_LAYOUTS])
def test_weight_update_through_buckets_equals_a_fresh_load_of_the_new_weights(ranks, updated_checkpoint, layout):
    expected = _hf_scores(updated_checkpoint)
    for seen in ranks:
        assert seen[f"update/complete/{layout}"]
        after, fresh = seen[f"update/after/{layout}"], seen[f"update/fresh/{layout}"]
        _assert_close(after, fresh, tolerance=0.0)
        _assert_close(after, expected)
        before = seen[f"update/before/{layout}"]
        assert max(np.abs(a[0] - b[0]).max() for a, b in zip(after, before)) > 1e-3


@pytest.mark.parametrize("layout", [f"{tp}x{pp}" for tp, pp in UPDATE_LAYOUTS])
def test_a_part_sent_again_after_its_parameter_was_written_wins_on_every_tp_shard(ranks, layout):
    """Each TP rank places the resent part in its own shard with no peer (see `_resend_two_parts`)."""
    for seen in ranks:
        assert seen[f"update/resent/{layout}"] == 0.0


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_export_at_tp2xpp2_reproduces_the_checkpoint_on_every_rank(ranks, tiny_models, checkpoint):
    hf = build_engine("hf", EngineSpec(model_path=str(tiny_models[checkpoint])))
    expected = dict(hf.export_weights())
    for seen in ranks:
        exported = seen[f"export/{checkpoint}"]
        assert set(exported) == set(expected)
        for name, tensor in expected.items():
            torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0)


def test_layout_not_matching_the_replica_is_a_clear_error_on_every_rank(ranks):
    for seen in ranks:
        assert "x data_parallel_size (2) = 8" in seen["layout_error/2x2"]
        assert "tensor_model_parallel_size (3)" in seen["layout_error/3x1"]
        assert "a multiple of 3" in seen["layout_error/3x1"]


def test_top_k_equals_hf_under_tp_pp_and_tp_x_pp_on_every_rank(ranks, tiny_models):
    """TP=2: each rank's half of the head merges to HF's top-k; PP=2 and TP=2 x PP=2: the last
    stage computes it and every stage receives the same (ids and ranks exact, values 1e-5)."""
    expected = _score_top_k(build_engine("hf", EngineSpec(model_path=str(tiny_models["qwen2_tied"]))))
    for rank in ranks:
        for layout in ("2x1", "1x2", "2x2"):
            for got, want in zip(rank[f"top_k/{layout}"], expected, strict=True):
                assert not isinstance(got, str), got
                assert (got[0] == want[0]).mean() > 0.99  # ids: the same, but for near-ties within 1e-5
                np.testing.assert_allclose(got[1], want[1], atol=TOLERANCE, rtol=0)
                np.testing.assert_array_equal(got[2], want[2])