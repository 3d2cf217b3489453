"""Scoring throughput: the server path against a trainer's recompute and a naive padded path.

On one ~100M-parameter model with a 151,936-token vocabulary (the LM head costs as much as the
body, as in real small policies), on an RL-like length mix, timed side by side in one run:

- server: packed token-budget batches, LM head on response positions only, chunked log-probs;
- packed full logits: the same packing, full-vocab logits for every position, `log_softmax`, gather;
- padded: micro-batches of a fixed number of sequences, right-padded, full logits.

All three must give the same log-probs. Model FLOP/s counts the forward from the architecture
(response-only LM head counted as such) over the dense GEMM FLOP/s measured in the same run.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import Target, timed_best
from bench.flops import forward_flops, gemm_flops_per_s
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.engines.hf import HFEngine
from model_engine_server.logprobs import full_logits_log_probs
from model_engine_server.packing import pack_sequences, split_by_token_budget
from model_engine_server.protocol import LogProbRequest
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model

MODEL = TinyModelShape(
    arch="qwen2", vocab_size=151_936, hidden_size=512, intermediate_size=1536, num_layers=6,
    num_heads=8, num_kv_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
)
TOKEN_BUDGET = 8192
PADDED_SEQUENCES_PER_BATCH = 2
TARGETS = [
    Target("speedup_vs_padded", ">=", 2.0),
    Target("speedup_vs_packed", ">=", 1.1),
    Target("mfu", ">=", 0.5),
    Target("bf16_speedup_vs_padded", ">=", 2.0),
    Target("bf16_speedup_vs_packed", ">=", 1.1),
    Target("bf16_mfu", ">=", 0.5),
]


def rl_length_mix(count: int, vocab_size: int, seed: int = 0) -> list[LogProbRequest]:
    """Prompts of 64-512 tokens, responses log-uniform between 16 and 4,096 tokens."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        prompt = rng.randint(64, 512)
        response = int(round(math.exp(rng.uniform(math.log(16), math.log(4096)))))
        ids = [rng.randrange(vocab_size) for _ in range(prompt + response)]
        requests.append(LogProbRequest(request_id=str(index), input_ids=ids, response_start=prompt, temperature=0.9))
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
        row_targets = torch.cat([torch.tensor(r.input_ids[1:]) for r in chosen])
        temperatures = torch.full((hidden.shape[0],), chosen[0].temperature)
        log_probs, _ = full_logits_log_probs(hidden, engine.lm_head().weight, row_targets, temperatures)
        scored = log_probs.index_select(0, batch.score_positions).split([r.num_response_tokens for r in chosen])
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
        hidden = engine.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        temperatures = torch.full((targets.shape[0],), chosen[0].temperature)
        log_probs, _ = full_logits_log_probs(flat_hidden, engine.lm_head().weight, targets, temperatures)
        log_probs = log_probs.view(len(chosen), width - 1)
        outputs.extend(log_probs[row, r.response_start - 1 : r.num_tokens - 1] for row, r in enumerate(chosen))
    padded_full_logits.padded_tokens = padded_tokens  # type: ignore[attr-defined]
    return outputs


def _measure(engine: HFEngine, requests: list[LogProbRequest], repeats: int, prefix: str) -> dict[str, Any]:
    adapter = ModelEngineServerAdapter(engine, TOKEN_BUDGET)
    total_tokens = sum(r.num_tokens for r in requests)
    adapter.score(requests[:2])  # warm-up: first-call allocations and thread pools
    server_s, outcomes = timed_best(lambda: adapter.score(requests), repeats, warmup=0)
    packed_s, packed = timed_best(lambda: packed_full_logits(engine, requests), repeats, warmup=0)
    padded_s, padded = timed_best(lambda: padded_full_logits(engine, requests), repeats, warmup=0)
    server = [torch.from_numpy(o.log_probs) for o in outcomes]
    agreement = max(
        max((a - b).abs().max().item() for a, b in zip(server, packed)),
        max((a - b).abs().max().item() for a, b in zip(server, padded)),
    )
    flops = forward_flops(engine.model.config, [(r.num_tokens - 1, r.num_response_tokens) for r in requests])
    gemm = gemm_flops_per_s(engine.spec.torch_dtype())
    figures = {
        "tokens_per_s": total_tokens / server_s,
        "packed_full_logits_tokens_per_s": total_tokens / packed_s,
        "padded_tokens_per_s": total_tokens / padded_s,
        "speedup_vs_packed": packed_s / server_s,
        "speedup_vs_padded": padded_s / server_s,
        "padding_fraction": 1 - total_tokens / padded_full_logits.padded_tokens,  # type: ignore[attr-defined]
        "model_flops_per_s": flops / server_s,
        "gemm_flops_per_s": gemm,
        "mfu": flops / server_s / gemm,
        "max_abs_diff_between_paths": agreement,
    }
    return {f"{prefix}{key}": value for key, value in figures.items()}


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    requests = rl_length_mix(10 if quick else 40, MODEL.vocab_size)
    repeats = 1 if quick else 2
    figures: dict[str, Any] = {
        "requests": len(requests),
        "tokens": sum(r.num_tokens for r in requests),
        "response_tokens": sum(r.num_response_tokens for r in requests),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = make_tiny_model(Path(folder) / "model", MODEL, seed=0)
        for dtype, prefix in (("float32", ""), ("bfloat16", "bf16_")):
            engine = build_engine("hf", EngineSpec(model_path=str(path), dtype=dtype))
            figures["parameters"] = engine.info.num_parameters
            figures.update(_measure(engine, requests, repeats, prefix))  # type: ignore[arg-type]
            del engine
    return figures
