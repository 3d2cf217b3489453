"""Where the server's lead over verl's recompute comes from, one cause switched at a time.

On the same packed token-budget batches (the server's), timed alternately, least of each kept:

- `body_s`: the model body (no LM head) with our per-sequence packed attention;
- `body_sdpa_mask_s`: the same body with transformers' SDPA over the whole packed row and the
  block-diagonal mask transformers builds from reset position ids: the attention verl's
  remove-padding path runs without flash-attn (on a GPU verl runs flash-attn varlen, which does
  what our packed attention does, so this cause does not carry over);
- `head_response_chunked_s`: our log-prob step, LM head on response positions only, in chunks;
- `head_all_chunked_s`: the same chunked step on every position (what a trainer's forward scores);
- `head_all_full_s`: full `[tokens, vocab]` logits, fp32, `log_softmax`, gather, on every position
  (verl's path without fused kernels; no entropy, as the benchmark asks none);
- `body_shared_prompts_s` (only on a mix where requests share prompts): the body on the
  server's shared-prompt batches, each group's prompt run once per micro-batch.

From these the ratio to verl splits into factors that multiply to it, one cause added at a
time on the way from the server's path to a trainer's: lm_head_response_only = (body +
head_all_chunked) / (body + head_response_chunked); chunked_log_softmax = (body + head_all_full)
/ (body + head_all_chunked); attention = (body_sdpa_mask + head_all_full) / (body +
head_all_full); shared_prompts = (body + head_response_chunked) / (body_shared_prompts +
head_response_chunked), 1 where no prompt is shared; and `rest`, what the four leave of the measured `speedup_vs_verl` (verl's
batching, padding conversions, its own Python, and our sums standing in for whole paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench.common import alternating_best
from bench.scoring_predict import attention_work
from model_engine_server.cpu_heap import release_free_memory
from model_engine_server.engines.hf import HFEngine
from model_engine_server.logprobs import chunked_log_probs, full_logits_log_probs
from model_engine_server.packing import PackedBatch, pack_sequences, split_by_token_budget, split_shared_by_token_budget
from model_engine_server.protocol import LogProbRequest


@dataclass(frozen=True)
class Packed:
    """One token-budget batch as the server packs it, plus every position's target."""

    batch: PackedBatch
    all_targets: torch.Tensor  # [T] the next token of every row position (whole sequences only)
    temperature: float


def pack_groups(requests: list[LogProbRequest], token_budget: int, share_prompts: bool = False) -> list[Packed]:
    """The adapter's micro-batches, each prompt whole in every sequence or, with
    `share_prompts`, once per group."""
    ids, starts = [r.input_ids for r in requests], [r.response_start for r in requests]
    groups = (split_shared_by_token_budget(ids, starts, token_budget) if share_prompts
              else split_by_token_budget([r.num_tokens for r in requests], token_budget))
    packed = []
    for group in groups:
        chosen = [requests[i] for i in group]
        batch = pack_sequences([r.input_ids for r in chosen], [r.response_start for r in chosen], share_prompts)
        targets = torch.cat([torch.tensor(r.input_ids[1:]) for r in chosen])
        packed.append(Packed(batch, targets, chosen[0].temperature))
    return packed


def _with_attention(engine: HFEngine, name: str, step: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        packed_attention = engine.model.config._attn_implementation
        engine.model.set_attn_implementation(name)
        try:
            return step()
        finally:
            engine.model.set_attn_implementation(packed_attention)
    return run


@dataclass(frozen=True)
class OnDevice:
    """A group's index and target tensors where its hidden states are (the packer makes them on
    the CPU; on CUDA, indexing CUDA hidden states needs them there), moved once, untimed."""

    score_positions: torch.Tensor
    targets: torch.Tensor
    all_targets: torch.Tensor
    temperatures: torch.Tensor  # one per response target
    all_temperatures: torch.Tensor  # one per row position


def on_device(group: Packed, device: torch.device) -> OnDevice:
    batch = group.batch
    return OnDevice(batch.score_positions.to(device), batch.targets.to(device), group.all_targets.to(device),
                    torch.full((batch.targets.numel(),), group.temperature, device=device),
                    torch.full((group.all_targets.numel(),), group.temperature, device=device))


def component_steps(engine: HFEngine, groups: list[Packed], shared: list[Packed] | None) -> dict[str, Callable[[], Any]]:
    """The five timed components (six with shared prompts); the heads run on hidden states
    computed once here."""
    with torch.inference_mode():
        hiddens = [engine.hidden_states(g.batch) for g in groups]
    head = engine.lm_head()
    placed = [on_device(g, h.device) for h, g in zip(hiddens, groups)]

    def body() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [engine.hidden_states(g.batch) for g in groups]

    def head_response() -> list[torch.Tensor]:
        return [chunked_log_probs(h.index_select(0, d.score_positions), head, d.targets, d.temperatures)[0]
                for h, d in zip(hiddens, placed)]

    def head_all_chunked() -> list[torch.Tensor]:
        return [chunked_log_probs(h, head, d.all_targets, d.all_temperatures)[0] for h, d in zip(hiddens, placed)]

    def head_all_full() -> list[torch.Tensor]:
        return [full_logits_log_probs(h, head.weight, d.all_targets, g.temperature, want_entropy=False)[0]
                for h, d, g in zip(hiddens, placed, groups)]

    def body_shared() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [engine.hidden_states(g.batch) for g in shared or []]

    steps = {"body": body, "body_sdpa_mask": _with_attention(engine, "sdpa", body),
             "head_response_chunked": head_response, "head_all_chunked": head_all_chunked,
             "head_all_full": head_all_full}
    return steps if shared is None else {**steps, "body_shared_prompts": body_shared}


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def measure_causes(engine: HFEngine, requests: list[LogProbRequest], token_budget: int, repeats: int) -> dict[str, Any]:
    """Component times and the factors they give (see the module docstring)."""
    groups = pack_groups(requests, token_budget)
    shared = pack_groups(requests, token_budget, share_prompts=True) if engine.info.shares_prompts else []
    shares = any(g.batch.shares_prompts for g in shared)
    timed = alternating_best(component_steps(engine, groups, shared if shares else None), repeats,
                             between=release_free_memory)  # as in the timed paths (bench/scoring.py)
    t = {name: seconds for name, (seconds, _) in timed.items()}
    response_from_all = [lp.index_select(0, g.batch.score_positions.to(lp.device))
                         for lp, g in zip(timed["head_all_full"][1], groups)]
    body, head_resp, head_all_c, head_all_f = (t["body"], t["head_response_chunked"], t["head_all_chunked"],
                                               t["head_all_full"])
    body_shared = t.get("body_shared_prompts", body)
    return {
        **{f"{name}_s": seconds for name, seconds in t.items()},
        "factor_shared_prompts": (body + head_resp) / (body_shared + head_resp),
        "attention_body_ratio": t["body_sdpa_mask"] / body,
        "factor_lm_head_response_only": (body + head_all_c) / (body + head_resp),
        "factor_chunked_log_softmax": (body + head_all_f) / (body + head_all_c),
        "factor_attention": (t["body_sdpa_mask"] + head_all_f) / (body + head_all_f),
        **attention_work(engine.model.config, requests, token_budget),
        "body_sdpa_mask_max_abs_diff": _max_diff(timed["body"][1], timed["body_sdpa_mask"][1]),
        "head_paths_max_abs_diff": _max_diff(timed["head_response_chunked"][1], response_from_all),
    }


def without_attention(figures: dict[str, Any]) -> float | None:
    """`speedup_vs_verl` less the attention factor (None without both): derived, a measured
    ratio over a measured factor. On a CPU verl runs SDPA with a mask over each whole packed
    row, which our per-sequence attention beats by `factor_attention`; on a GPU verl runs
    flash-attn varlen, our packed attention's equal, so this is the part of the lead that can
    carry over there."""
    if "speedup_vs_verl" not in figures or "factor_attention" not in figures:
        return None
    return figures["speedup_vs_verl"] / figures["factor_attention"]


def rest_factor(figures: dict[str, Any]) -> float | None:
    """What the measured causes leave of `speedup_vs_verl` (None without verl)."""
    if "speedup_vs_verl" not in figures:
        return None
    explained = (figures["factor_attention"] * figures["factor_lm_head_response_only"]
                 * figures["factor_chunked_log_softmax"] * figures.get("factor_shared_prompts", 1.0))
    return figures["speedup_vs_verl"] / explained
