"""The Megatron engine's CUDA paths against the HF engine on the same GPU (skipped without CUDA).

* fp32, local spec: block-diagonal mask + per-sequence RoPE, as on CPU but with CUDA kernels.
* bf16, default spec: TransformerEngine with THD `PackedSeqParams` when TE is installed, else
  the local spec; bf16 against bf16 from a different numerical stack, so a looser tolerance.
* bf16, local spec forced: the unfused masked softmax path on GPU.
* TP=2 and PP=2 over NCCL when the machine has two GPUs.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # before importing megatron: skipping costs nothing then
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("megatron.core")
pytest.importorskip("mbridge")

from model_engine_server.adapter import ModelEngineServerAdapter  # noqa: E402
from model_engine_server.engines.base import EngineSpec, build_engine  # noqa: E402
from model_engine_server.engines.megatron_bridge import transformer_engine_installed  # noqa: E402
from tests.helpers import random_requests  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

CHECKPOINTS = ["qwen2_tied", "qwen2_untied", "llama_untied", "qwen3_tied"]
FP32_TOLERANCE = 1e-4  # CUDA attention kernels differ from each other by ~1e-6 in fp32
BF16_MAX_ABS = 0.1  # two bf16 stacks; log-probs here are around -6
BF16_MEAN_ABS = 0.02


def _scores(engine) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=2048, logprob_chunk_mb=1)
    outputs = adapter.score(random_requests(24, engine.info.vocab_size, seed=17, max_len=400))
    assert all(hasattr(output, "log_probs") for output in outputs), outputs
    return [(output.log_probs, output.entropy) for output in outputs]


def _compare(actual, expected, dtype: str) -> None:  # noqa: ANN001
    for got, want in zip(actual, expected, strict=True):
        for value, reference in zip(got, want):
            difference = np.abs(value - reference)
            if dtype == "float32":
                assert difference.max() <= FP32_TOLERANCE
            else:
                assert difference.max() <= BF16_MAX_ABS and difference.mean() <= BF16_MEAN_ABS


@pytest.mark.parametrize(
    "dtype,transformer_engine",
    [("float32", False), ("bfloat16", None), ("bfloat16", False)],
    ids=["fp32-local", "bf16-default", "bf16-local"],
)
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_cuda_scores_match_hf_engine(tiny_models, checkpoint, dtype, transformer_engine):
    path = str(tiny_models[checkpoint])
    megatron = build_engine(
        "megatron", EngineSpec(model_path=path, dtype=dtype, device="cuda"), transformer_engine=transformer_engine
    )
    try:
        expected_te = transformer_engine_installed() if transformer_engine is None else transformer_engine
        assert megatron.uses_transformer_engine == expected_te
        assert megatron.info.device.startswith("cuda")
        hf = build_engine("hf", EngineSpec(model_path=path, dtype=dtype, device="cuda"))
        _compare(_scores(megatron), _scores(hf), dtype)
    finally:
        megatron.close()


def _run_rank(rank: int, world_size: int, port: int, path: str, tp: int, pp: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    engine = build_engine(
        "megatron",
        EngineSpec(model_path=path, dtype="bfloat16", device=f"cuda:{rank}"),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    seen = {"scores": _scores(engine), "returns_results": engine.returns_results}
    engine.close()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_gpu_layouts_match_hf_engine(tiny_models, tmp_path, tp, pp):
    import torch.multiprocessing as mp

    path = str(tiny_models["qwen2_tied"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    mp.start_processes(_run_rank, args=(2, port, path, tp, pp, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(Path(tmp_path) / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    expected = _scores(build_engine("hf", EngineSpec(model_path=path, dtype="bfloat16", device="cuda")))
    assert [seen["returns_results"] for seen in ranks] == ([True, False] if tp == 2 else [False, True])
    for seen in ranks:
        _compare(seen["scores"], expected, "bfloat16")
