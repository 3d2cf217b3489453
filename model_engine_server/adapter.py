"""`ModelEngineServerAdapter`: a list of requests in, one result (or error) per request out.

It packs requests into token-budget micro-batches, runs the engine forward-only and splits the
packed log-probs back per request. With one rank per forward, a failure in a micro-batch is
retried request by request, so one bad request never fails the others batched with it. Under
model parallelism (TP x PP > 1) it is not: a retry on one rank would issue collectives its
peers never join, so the whole batch fails with the reason.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from model_engine_server.engines.base import Engine, TopKEngine
from model_engine_server.errors import InvalidRequest, ModelEngineError, WorkerFailed
from model_engine_server.logprobs import chunk_tokens_for
from model_engine_server.packing import pack_sequences, split_by_token_budget, split_shared_by_token_budget
from model_engine_server.protocol import LogProbRequest, MismatchStats, ScoreOutput

logger = logging.getLogger(__name__)

EngineOutcome = ScoreOutput | ModelEngineError  # an engine's answer to one request, before it is tagged with version and timings


def mismatch_stats(rollout_log_probs: Sequence[float], server_log_probs: np.ndarray) -> MismatchStats:
    """How far the rollout engine's log-probs are from ours (k3 estimator for the KL)."""
    rollout = np.asarray(rollout_log_probs, dtype=np.float64)
    server = server_log_probs.astype(np.float64)
    log_ratio = server - rollout  # log p_server / p_rollout on tokens sampled from the rollout policy
    return MismatchStats(
        mean_abs_diff=float(np.abs(log_ratio).mean()),
        max_abs_diff=float(np.abs(log_ratio).max()),
        kl_estimate=float((np.expm1(log_ratio) - log_ratio).mean()),
    )


def _resolved_temperature(request: LogProbRequest) -> float:
    if request.temperature is None:  # the scheduler resolves it at admission; this is a bug
        raise InvalidRequest("the request reached the engine with no temperature resolved", "temperature")
    return request.temperature


class ModelEngineServerAdapter:
    """Forward-only scoring of requests over one engine (no autograd, eval mode)."""

    def __init__(self, engine: Engine, max_tokens_per_micro_batch: int = 8192, logprob_chunk_mb: int = 128) -> None:
        self.engine = engine
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.chunk_tokens = chunk_tokens_for(engine.info.vocab_size, logprob_chunk_mb * 1024 * 1024)
        # identical prompts (a GRPO group's samples) are run once per micro-batch, where the engine can
        self.share_prompts = engine.info.shares_prompts

    def score(self, requests: Sequence[LogProbRequest]) -> list[EngineOutcome]:
        outcomes: list[EngineOutcome | None] = [None] * len(requests)
        refusal = self._top_k_refusal()
        scorable = []
        for index, request in enumerate(requests):
            if request.top_k is not None and refusal is not None:
                outcomes[index] = InvalidRequest(refusal, "top_k")
            else:
                scorable.append(index)
        for group in self.micro_batches([requests[i] for i in scorable]):
            indices = [scorable[i] for i in group]
            for index, outcome in zip(indices, self._score_group([requests[i] for i in indices])):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    def micro_batches(self, requests: list[LogProbRequest]) -> list[list[int]]:
        """Indices of each forward's requests: by token budget, a shared prompt counted once."""
        budget = self.max_tokens_per_micro_batch
        if self.share_prompts:
            return split_shared_by_token_budget([r.input_ids for r in requests], [r.response_start for r in requests], budget)
        return split_by_token_budget([r.num_tokens for r in requests], budget)

    def _top_k_refusal(self) -> str | None:
        """Why this engine cannot answer `top_k` (decided per engine, before any forward, so
        every model-parallel rank refuses alike), or None."""
        if not isinstance(self.engine, TopKEngine):
            return f"this server's engine ({type(self.engine).__name__}) does not compute top-k log-probs"
        return self.engine.top_k_unsupported()

    def _score_group(self, requests: list[LogProbRequest]) -> list[EngineOutcome]:
        try:
            return list(self._score_packed(requests))
        except Exception as error:  # isolate: retry one by one so only the culprit fails
            if self.engine.info.model_parallel_size > 1:
                logger.exception("a micro-batch of %d failed on a model-parallel rank", len(requests))
                failure = WorkerFailed(f"scoring failed on a model-parallel rank: {type(error).__name__}: {error}")
                return [failure] * len(requests)
            if len(requests) == 1:
                logger.exception("scoring request %s failed", requests[0].request_id)
                return [WorkerFailed(f"scoring failed: {type(error).__name__}: {error}")]
            logger.warning("micro-batch of %d failed (%s); retrying one by one", len(requests), error)
            return [outcome for request in requests for outcome in self._score_group([request])]

    @torch.inference_mode()
    def _score_packed(self, requests: list[LogProbRequest]) -> list[ScoreOutput]:
        with torch.profiler.record_function("packing"):  # a label for bench/profile.py
            batch = pack_sequences(
                [r.input_ids for r in requests], [r.response_start for r in requests], self.share_prompts
            )
            temperatures = torch.repeat_interleave(
                torch.tensor([_resolved_temperature(r) for r in requests], dtype=torch.float32),
                torch.tensor([r.num_response_tokens for r in requests]),
            )
        want_entropy = any(r.return_entropy for r in requests)
        top_k = max((r.top_k or 0) for r in requests)
        top_ids_np = top_log_probs_np = ranks_np = None
        if top_k > 0:  # the batch's largest k; each request gets its own first k columns
            assert isinstance(self.engine, TopKEngine)  # `score` refused top_k otherwise
            scores = self.engine.score_packed_top_k(batch, temperatures, want_entropy, self.chunk_tokens, top_k)
            log_probs, entropy = scores.log_probs, scores.entropy
            assert scores.top_k_ids is not None and scores.top_k_log_probs is not None and scores.target_ranks is not None
            top_ids_np = scores.top_k_ids.cpu().numpy()
            ranks_np = scores.target_ranks.cpu().numpy()
            top_log_probs_np = scores.top_k_log_probs.float().cpu().numpy()
        else:
            log_probs, entropy = self.engine.score_packed(batch, temperatures, want_entropy, self.chunk_tokens)
        log_probs_np = log_probs.float().cpu().numpy()
        entropy_np = entropy.float().cpu().numpy() if entropy is not None else None
        outputs = []
        for k, request in enumerate(requests):
            start, stop = batch.score_offsets[k], batch.score_offsets[k + 1]
            request_log_probs = log_probs_np[start:stop].copy()
            wants_top = request.top_k is not None and top_ids_np is not None and top_log_probs_np is not None and ranks_np is not None
            outputs.append(
                ScoreOutput(
                    log_probs=request_log_probs,
                    entropy=entropy_np[start:stop].copy() if request.return_entropy and entropy_np is not None else None,
                    mismatch=mismatch_stats(request.rollout_log_probs, request_log_probs)
                    if request.rollout_log_probs is not None
                    else None,
                    top_k_ids=top_ids_np[start:stop, : request.top_k].copy() if wants_top else None,  # type: ignore[index]
                    top_k_log_probs=top_log_probs_np[start:stop, : request.top_k].copy() if wants_top else None,  # type: ignore[index]
                    target_ranks=ranks_np[start:stop].copy() if wants_top else None,  # type: ignore[index]
                )
            )
        return outputs
