"""FLOP shares of a shape, and a *prediction* (not a measurement) of the ratio to verl for 7B and 32B.

Shapes too large for this machine are not run. Their ratio is predicted from FLOP counts
(`bench/flops.py`) over the benchmark's full RL length mix (40 requests, unscaled), two ways:

- `flops`: every FLOP the server saves carries over - the LM head on responses only and, on a
  mix of GRPO groups, each shared prompt run once - and nothing else differs;
- `lm_head_only`: both paths run the body equally well and differ only in where the LM head
  runs (all positions for a trainer's forward, response positions for the server). This is
  what remains on a GPU, where verl runs flash-attn varlen (our packed attention's equal) and
  the log-softmax is a small part of the time;
- `cpu_rates`: the FLOP rates each component reached in this run on the largest measured shape
  (server body, chunked response-only head, full-logits head, and what the attention verl runs,
  transformers' SDPA with a mask over each whole packed row, adds to the body: counted as the
  row's length squared, not per sequence, since that is what it computes), applied to the
  larger shape's work on the same token budget: what this CPU would show. All four come from the cause split's rounds, timed alternately, so a
  machine whose speed drifts between the benchmark's phases does not skew one against another
  (an earlier version took verl's body from its whole-path time in the other phase, and a run
  whose cause phase ran 25% slower predicted verl faster than its own measured body). verl's
  own batching and Python (`factor_rest`) are left out, which favours verl.
"""

from __future__ import annotations

from typing import Any, Sequence

from bench.flops import Work, forward_flops_split, masked_row_attention_flops, sequence_attention_flops
from bench.shapes import PREDICTED, QwenShape
from model_engine_server.packing import prompt_groups, split_by_token_budget
from model_engine_server.protocol import LogProbRequest


def sequences(requests: Sequence[LogProbRequest], all_positions: bool) -> list[Work]:
    """`(input_tokens, scored_tokens)` per request: the server scores the response, a trainer's
    forward puts the LM head on every input position."""
    return [(r.num_tokens - 1, r.num_tokens - 1 if all_positions else r.num_response_tokens) for r in requests]


def server_work(requests: Sequence[LogProbRequest], share_prompts: bool) -> list[Work]:
    """What the server computes for `requests` packed as one batch."""
    return shared_prompt_sequences(requests) if share_prompts else sequences(requests, all_positions=False)


def shared_prompt_sequences(requests: Sequence[LogProbRequest]) -> list[Work]:
    """The server's work with shared prompts (`packing.pack_sequences(share_prompts=True)` on
    the whole set, as if it were one batch: the predictions' best case): each group's prompt
    once, then each member's response after it."""
    work: list[Work] = []
    for group in prompt_groups([r.input_ids for r in requests], [r.response_start for r in requests]):
        if len(group) == 1:
            work.extend(sequences([requests[group[0]]], all_positions=False))
            continue
        prompt = requests[group[0]].response_start
        work.append((prompt, 0))
        work.extend((requests[i].num_tokens - 1 - prompt, requests[i].num_response_tokens, prompt) for i in group)
    return work


def flop_figures(config: Any, requests: Sequence[LogProbRequest]) -> dict[str, float]:
    """Body and LM-head FLOPs of the request set, and the LM head's share of the forward."""
    body, head_response = forward_flops_split(config, sequences(requests, all_positions=False))
    _, head_all = forward_flops_split(config, sequences(requests, all_positions=True))
    body_shared, _ = forward_flops_split(config, shared_prompt_sequences(requests))
    return {
        "body_flops": body,
        "body_flops_shared_prompts": body_shared,
        "lm_head_flops_response_only": head_response,
        "lm_head_flops_all_positions": head_all,
        "lm_head_flop_share_response_only": head_response / (body + head_response),
        "lm_head_flop_share_all_positions": head_all / (body + head_all),
    }


def flop_ratio(flops: dict[str, float]) -> float:
    """A trainer's forward FLOPs over the server's, with every saving counted (LM head on
    responses, each shared prompt once)."""
    return (flops["body_flops"] + flops["lm_head_flops_all_positions"]) / (
        flops["body_flops_shared_prompts"] + flops["lm_head_flops_response_only"])


def lm_head_only_ratio(flops: dict[str, float]) -> float:
    return (flops["body_flops"] + flops["lm_head_flops_all_positions"]) / (
        flops["body_flops"] + flops["lm_head_flops_response_only"])


def attention_work(config: Any, requests: list[LogProbRequest], token_budget: int) -> dict[str, float]:
    """What the masked body computes beyond the per-sequence one, on these rows: the extra
    time `body_sdpa_mask_s - body_s` is spent on it (`scoring_predict` scales it to other shapes)."""
    lengths = [r.num_tokens - 1 for r in requests]  # a sequence's forward reads all but its last token
    groups = split_by_token_budget([r.num_tokens for r in requests], token_budget)  # as `pack_groups`
    rows = [sum(lengths[i] for i in group) for group in groups]
    return {"masked_row_attention_flops": masked_row_attention_flops(config, rows),
            "sequence_attention_flops": sequence_attention_flops(config, lengths)}


def cpu_rates(measured: dict[str, Any]) -> dict[str, float] | None:
    """FLOP/s of each component in a measured shape's figures (None without verl's time, or
    from a record made before the masked rows' attention was counted)."""
    if "verl_tokens_per_s" not in measured or "masked_row_attention_flops" not in measured:
        return None
    extra = measured["masked_row_attention_flops"] - measured["sequence_attention_flops"]
    return {
        "body": measured["body_flops"] / measured["body_s"],
        "head_chunked": measured["lm_head_flops_response_only"] / measured["head_response_chunked_s"],
        "head_full": measured["lm_head_flops_all_positions"] / measured["head_all_full_s"],
        "masked_attention_extra": extra / max(measured["body_sdpa_mask_s"] - measured["body_s"], 1e-9),
    }


def cpu_rates_ratio(flops: dict[str, float], rates: dict[str, float]) -> float:
    """verl's body is the server's plus what its masked rows add, at the rate that extra ran:
    it grows with each row's length squared, not with the per-sequence FLOPs."""
    server = flops["body_flops_shared_prompts"] / rates["body"] + flops["lm_head_flops_response_only"] / rates["head_chunked"]
    masked_extra = flops["masked_row_attention_flops"] - flops["sequence_attention_flops"]
    verl = (flops["body_flops"] / rates["body"] + masked_extra / rates["masked_attention_extra"]
            + flops["lm_head_flops_all_positions"] / rates["head_full"])
    return verl / server


def predictions(requests: Sequence[LogProbRequest], measured: dict[str, Any] | None,
                measured_name: str | None, token_budget: int, shapes: Sequence[QwenShape] = PREDICTED) -> dict[str, Any]:
    """Per predicted shape: FLOP shares and the predicted `speedup_vs_verl`, labelled as such."""
    rates = cpu_rates(measured) if measured else None
    out: dict[str, Any] = {}
    for shape in shapes:
        config = shape.hf_config()
        flops = {**flop_figures(config, requests), **attention_work(config, requests, token_budget)}
        figures: dict[str, Any] = {
            "lm_head_flop_share_all_positions": flops["lm_head_flop_share_all_positions"],
            "lm_head_flop_share_response_only": flops["lm_head_flop_share_response_only"],
            "predicted_speedup_vs_verl_lm_head_only": lm_head_only_ratio(flops),
            "predicted_speedup_vs_verl_flops": flop_ratio(flops),
        }
        if rates is not None:
            figures["predicted_speedup_vs_verl_cpu_rates"] = cpu_rates_ratio(flops, rates)
            figures["cpu_rates_from"] = measured_name
        out[f"prediction_{shape.key}"] = figures
    return out
