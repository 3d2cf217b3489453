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

from model_engine_server.engines.base import Engine
from model_engine_server.errors import InvalidRequest, ModelEngineError, WorkerFailed
from model_engine_server.logprobs import chunk_tokens_for
from model_engine_server.packing import pack_sequences, split_by_token_budget
from model_engine_server.protocol import LogProbRequest, MismatchStats, ScoreOutput

logger = logging.getLogger(__name__)

Outcome = ScoreOutput | ModelEngineError


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

    def score(self, requests: Sequence[LogProbRequest]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(requests)
        groups = split_by_token_budget([r.num_tokens for r in requests], self.max_tokens_per_micro_batch)
        for group in groups:
            for index, outcome in zip(group, self._score_group([requests[i] for i in group])):
                outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    def _score_group(self, requests: list[LogProbRequest]) -> list[Outcome]:
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
            batch = pack_sequences([r.input_ids for r in requests], [r.response_start for r in requests])
            temperatures = torch.repeat_interleave(
                torch.tensor([_resolved_temperature(r) for r in requests], dtype=torch.float32),
                torch.tensor([r.num_response_tokens for r in requests]),
            )
        want_entropy = any(r.return_entropy for r in requests)
        log_probs, entropy = self.engine.score_packed(batch, temperatures, want_entropy, self.chunk_tokens)
        log_probs_np = log_probs.float().cpu().numpy()
        entropy_np = entropy.float().cpu().numpy() if entropy is not None else None
        outputs = []
        for k, request in enumerate(requests):
            start, stop = batch.score_offsets[k], batch.score_offsets[k + 1]
            request_log_probs = log_probs_np[start:stop].copy()
            outputs.append(
                ScoreOutput(
                    log_probs=request_log_probs,
                    entropy=entropy_np[start:stop].copy() if request.return_entropy and entropy_np is not None else None,
                    mismatch=mismatch_stats(request.rollout_log_probs, request_log_probs)
                    if request.rollout_log_probs is not None
                    else None,
                )
            )
        return outputs
