"""The agent-loop hook: score a trajectory the moment it finishes, attach what the trainer reads.

In a verl-style fully-async pipeline, call `attach_server_log_probs` where the agent loop has
a finished trajectory (prompt ids, response ids, the rollout engine's own log-probs) and before
it goes to the message queue. The trainer then reads, under the names the reference design
uses:

- `engine_server_logprobs`: old (proximal) log-probs of each response token, `[response_len]`;
- `engine_server_entropys`: entropy of the same distributions;
- `engine_server_weight_version`: the policy version that computed them;
- `ref_log_prob`: the frozen reference policy's log-probs of the same tokens at the same
  temperature, when asked (`return_ref_log_probs=True`; the server runs in reference mode);
  the batch key verl's KL loss and `apply_kl_penalty` read, so stacked into a batch the rows
  spare the trainer its own reference forward;
- `rollout_mismatch`: mean/max |rollout logp - server logp| and a KL estimate (k3), when the
  rollout's log-probs were given.
"""

from __future__ import annotations

from typing import Any, MutableMapping, Sequence

import numpy as np

from clients.base import LogProbClient
from model_engine_server.protocol import LogProbRequest, LogProbResult

LOG_PROBS_FIELD = "engine_server_logprobs"
ENTROPY_FIELD = "engine_server_entropys"
VERSION_FIELD = "engine_server_weight_version"
REF_LOG_PROBS_FIELD = "ref_log_prob"
MISMATCH_FIELD = "rollout_mismatch"


def build_request(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    temperature: float,
    rollout_log_probs: Sequence[float] | None = None,
    request_id: str | None = None,
    min_weight_version: int | None = None,
    return_ref_log_probs: bool = False,
) -> LogProbRequest:
    """The server request for one trajectory: score every response token at the rollout's
    temperature (and with the reference policy too, when `return_ref_log_probs`). Rollout
    log-probs with a non-finite value (which the server refuses) are left out: the sample is
    still scored, without its mismatch statistics."""
    identity = {"request_id": request_id} if request_id else {}
    if rollout_log_probs is not None and not np.isfinite(np.asarray(rollout_log_probs, dtype=np.float64)).all():
        rollout_log_probs = None
    return LogProbRequest(
        **identity,
        input_ids=[*map(int, prompt_ids), *map(int, response_ids)],
        response_start=len(prompt_ids),
        temperature=temperature,
        return_entropy=True,
        return_ref_log_probs=return_ref_log_probs,
        rollout_log_probs=None if rollout_log_probs is None else [float(x) for x in rollout_log_probs],
        min_weight_version=min_weight_version,
    )


def attach_result(sample: MutableMapping[str, Any], result: LogProbResult) -> MutableMapping[str, Any]:
    sample[LOG_PROBS_FIELD] = np.asarray(result.log_probs, dtype=np.float32)
    sample[ENTROPY_FIELD] = None if result.entropy is None else np.asarray(result.entropy, dtype=np.float32)
    sample[VERSION_FIELD] = result.weight_version
    if result.ref_log_probs is not None:
        sample[REF_LOG_PROBS_FIELD] = np.asarray(result.ref_log_probs, dtype=np.float32)
    if result.mismatch is not None:
        sample[MISMATCH_FIELD] = result.mismatch.to_wire()
    return sample


async def attach_server_log_probs(
    client: LogProbClient,
    sample: MutableMapping[str, Any],
    temperature: float,
    timeout_s: float | None = None,
    return_ref_log_probs: bool = False,
) -> MutableMapping[str, Any]:
    """Score `sample` (keys `prompt_ids`, `response_ids`, optional `rollout_log_probs`) and attach
    the server's fields (with `ref_log_prob` when `return_ref_log_probs`); raises the server's
    typed error if it could not be scored."""
    request = build_request(
        sample["prompt_ids"], sample["response_ids"], temperature, sample.get("rollout_log_probs"), sample.get("uid"),
        return_ref_log_probs=return_ref_log_probs,
    )
    [result] = await client.compute_log_probs([request], timeout_s)
    return attach_result(sample, result)
