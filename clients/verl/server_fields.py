"""The fields the scoring agent loop attaches and the trainers read, and the rules for the rest.

Both verl pipelines carry a trajectory's `AgentLoopOutput.extra_fields` to the trainer: the
DataProto path as one `non_tensor_batch` column per key, the TransferQueue path as a dict per
sample. The agent loop writes the server's result there under the names below (per response
token, unpadded); the trainer pads them to `(bsz, response_length)` float32, right-padded
with exact zeros, the layout verl's loss reads `old_log_probs`, `entropys` and `ref_log_prob` in.

A sample is *usable* when it carries server log-probs scored under the version the trainer
treats as old (within `max_version_lag`). Any other sample goes to the configured rule
(`TrainerSideConfig.on_missing` / `on_stale`): recompute on the trainer, rescore on the server,
accept (stale only) or fail with a message naming the samples. This module imports no verl,
Ray or HTTP: it is the decision, the trainer subclasses are the I/O around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pydantic import ValidationError

from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.protocol import LogProbRequest, LogProbResult, invalid_request_from

LOG_PROBS = "model_engine_server_log_probs"
ENTROPY = "model_engine_server_entropy"
WEIGHT_VERSION = "model_engine_server_weight_version"
REF_LOG_PROBS = "model_engine_server_ref_log_probs"
ERROR = "model_engine_server_error"
FIELDS = (LOG_PROBS, ENTROPY, WEIGHT_VERSION, REF_LOG_PROBS, ERROR)

METRIC_PREFIX = "model_engine_server"


class ServerLogProbsUnusable(RuntimeError):
    """Samples the trainer may not train on under the configured rule; the message names them."""


def result_fields(result: LogProbResult) -> dict[str, Any]:
    """What the agent loop writes into `extra_fields` for one scored trajectory."""
    return {
        LOG_PROBS: np.asarray(result.log_probs, dtype=np.float32).tolist(),
        ENTROPY: None if result.entropy is None else np.asarray(result.entropy, dtype=np.float32).tolist(),
        WEIGHT_VERSION: int(result.weight_version),
        REF_LOG_PROBS: None if result.ref_log_probs is None else np.asarray(result.ref_log_probs, dtype=np.float32).tolist(),
        ERROR: None,
    }


def error_fields(reason: str) -> dict[str, Any]:
    """What the agent loop writes when the server could not score the trajectory."""
    return {LOG_PROBS: None, ENTROPY: None, WEIGHT_VERSION: None, REF_LOG_PROBS: None, ERROR: reason}


@dataclass(frozen=True)
class SampleScores:
    """One sample's server fields, read back on the trainer."""

    log_probs: Sequence[float] | None
    entropy: Sequence[float] | None
    version: int | None
    ref_log_probs: Sequence[float] | None
    error: str | None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any] | None) -> "SampleScores":
        fields = fields or {}
        version = fields.get(WEIGHT_VERSION)
        return cls(
            log_probs=fields.get(LOG_PROBS),
            entropy=fields.get(ENTROPY),
            version=None if version is None else int(version),
            ref_log_probs=fields.get(REF_LOG_PROBS),
            error=fields.get(ERROR),
        )

    @classmethod
    def from_result(cls, result: LogProbResult) -> "SampleScores":
        return cls.from_fields(result_fields(result))


@dataclass
class Plan:
    """Which rows of a batch take the server's numbers and which go elsewhere, and why."""

    use_server: list[int] = field(default_factory=list)
    recompute: list[int] = field(default_factory=list)
    rescore: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    accepted_stale: list[int] = field(default_factory=list)


def _describe(rows: Sequence[int], reasons: Mapping[int, str], names: Sequence[str] | None) -> str:
    shown = [f"{names[i] if names else i}: {reasons[i]}" for i in rows[:8]]
    more = f" (and {len(rows) - 8} more)" if len(rows) > 8 else ""
    return "; ".join(shown) + more


def plan_batch(
    samples: Sequence[SampleScores],
    response_lengths: Sequence[int],
    old_version: int | None,
    config: TrainerSideConfig,
    sample_names: Sequence[str] | None = None,
    need_ref: bool = False,
) -> Plan:
    """Sort a batch's rows by rule; raises `ServerLogProbsUnusable` when a `fail` rule fires.

    `old_version` is the weight version the trainer treats as the old (proximal) policy; None
    accepts any version. A row whose log-probs do not cover its response counts as missing.
    """
    plan = Plan()
    failed: list[int] = []
    for row, (sample, length) in enumerate(zip(samples, response_lengths, strict=True)):
        missing = _missing_reason(sample, int(length), need_ref)
        if missing is not None:
            plan.reasons[row] = missing
            rule = config.on_missing
        elif old_version is not None and _off_version(int(sample.version), old_version, config.max_version_lag):
            plan.reasons[row] = f"scored under weight version {sample.version}, the old policy is version {old_version}"
            rule = config.on_stale
        else:
            plan.use_server.append(row)
            continue
        if rule == "fail":
            failed.append(row)
        elif rule == "recompute":
            plan.recompute.append(row)
        elif rule == "rescore":
            plan.rescore.append(row)
        else:  # accept: stale only (a missing sample has nothing to accept)
            plan.use_server.append(row)
            plan.accepted_stale.append(row)
    if failed:
        raise ServerLogProbsUnusable(
            f"{len(failed)} of {len(samples)} samples have no usable server log-probs "
            f"(model_engine_server.trainer.on_missing={config.on_missing}, on_stale={config.on_stale}): "
            + _describe(failed, plan.reasons, sample_names)
        )
    return plan


def _off_version(version: int, old_version: int, lag: int) -> bool:
    """Scored under weights other than the old policy's: more than `lag` versions behind it, or
    ahead of it at all (a newer version is not the policy that the update starts from)."""
    return version > old_version or old_version - version > lag


# Rounding lets a near-certain token's log-prob, or a near-one-hot entropy, come out a hair on
# the wrong side of 0; anything further is not a log-prob (or an entropy) at all.
ROUNDING_SLACK = 1e-3


def _missing_reason(sample: SampleScores, response_length: int, need_ref: bool) -> str | None:
    if sample.log_probs is None:
        return f"not scored ({sample.error})" if sample.error else "not scored by the server"
    if sample.version is None:
        return "server log-probs carry no weight version"
    if len(sample.log_probs) != response_length:
        return f"server log-probs cover {len(sample.log_probs)} tokens, the response has {response_length}"
    if sample.entropy is None or len(sample.entropy) != response_length:
        return "no server entropy for the response"
    if need_ref and (sample.ref_log_probs is None or len(sample.ref_log_probs) != response_length):
        return "no server reference log-probs (is the server's ref mode on?)"
    return _value_problem(sample.log_probs, "log-probs", upper=ROUNDING_SLACK) or _value_problem(
        sample.entropy, "entropy", lower=-ROUNDING_SLACK) or (
        _value_problem(sample.ref_log_probs, "reference log-probs", upper=ROUNDING_SLACK) if need_ref else None)


def _value_problem(values: Sequence[float] | None, what: str, lower: float = -np.inf, upper: float = np.inf) -> str | None:
    """Why `values` cannot be trained on (NaN, infinite, or outside their range), or None."""
    array = np.asarray(values if values is not None else [], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array) | (array < lower) | (array > upper))
    if bad.size == 0:
        return None
    return f"server {what} hold {float(array[bad[0]])!r} at response token {int(bad[0])} ({bad.size} such values)"


def pad_rows(rows: Sequence[Sequence[float] | None], width: int) -> torch.Tensor:
    """`(len(rows), width)` float32, each row right-padded with exact zeros (None: all zeros)."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for index, row in enumerate(rows):
        if row is None:
            continue
        values = torch.as_tensor(np.asarray(row, dtype=np.float32))
        if values.numel() > width:
            raise ValueError(f"row {index} has {values.numel()} values, the response width is {width}")
        out[index, : values.numel()] = values
    return out


def overlay_rows(base: torch.Tensor, replacement: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """`base` with `rows` taken from `replacement` (both `(bsz, width)`)."""
    if not rows:
        return base
    out = base.clone()
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out[index] = replacement[index].to(out.dtype)
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.dtype)
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def batch_metrics(
    plan: Plan,
    versions: Sequence[int | None],
    old_version: int | None,
    response_mask: torch.Tensor,
    server_log_probs: torch.Tensor,
    server_entropy: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
) -> dict[str, float]:
    """What reaches verl's metrics, under `model_engine_server/...`: how many rows came from
    where, the version lag, the server's entropy, and rollout-vs-server mismatch."""
    prefix = METRIC_PREFIX
    rows = len(versions)
    metrics = {
        f"{prefix}/samples_from_server_total": float(len(plan.use_server)),
        f"{prefix}/samples_recomputed_total": float(len(plan.recompute)),
        f"{prefix}/samples_rescored_total": float(len(plan.rescore)),
        f"{prefix}/samples_accepted_stale_total": float(len(plan.accepted_stale)),
        f"{prefix}/fraction_from_server": len(plan.use_server) / rows if rows else 0.0,
    }
    known = [int(v) for v in versions if v is not None]
    if known and old_version is not None:
        lags = [old_version - v for v in known]
        metrics[f"{prefix}/weight_version_lag_mean"] = float(np.mean(lags))
        metrics[f"{prefix}/weight_version_lag_max"] = float(np.max(lags))
    mask = response_mask.bool()
    metrics[f"{prefix}/entropy"] = masked_mean(server_entropy, mask)
    if rollout_log_probs is not None and mask.any():
        diff = (rollout_log_probs - server_log_probs)[mask]
        log_ratio = (server_log_probs - rollout_log_probs)[mask]
        metrics[f"{prefix}/rollout_vs_server/log_prob_abs_diff_mean"] = float(diff.abs().mean())
        metrics[f"{prefix}/rollout_vs_server/log_prob_abs_diff_max"] = float(diff.abs().max())
        # k3 estimator of KL(rollout || server): E[r - 1 - log r], r = p_server / p_rollout
        metrics[f"{prefix}/rollout_vs_server/kl_k3"] = float((log_ratio.exp() - 1 - log_ratio).mean())
        metrics[f"{prefix}/rollout_vs_server/prob_abs_diff_mean"] = float(
            (rollout_log_probs.exp() - server_log_probs.exp())[mask].abs().mean()
        )
    return metrics


# ---------------------------------------------------------------- added for the trainers' I/O
TRAINER_SECTION = "model_engine_server.trainer"


def trainer_side_config(training_config: Any) -> TrainerSideConfig:
    """The `model_engine_server.trainer:` rules of a whole training config (an OmegaConf
    DictConfig or a plain mapping); absent: the defaults. The trainers read them from the same
    YAML the server starts with, so a typo fails the trainer at start-up, naming the key."""
    from omegaconf import DictConfig, OmegaConf

    from model_engine_server.config.loader import unknown_section_keys
    from model_engine_server.config.schema import SECTION

    config = training_config if isinstance(training_config, DictConfig) else OmegaConf.create(dict(training_config))
    parent = OmegaConf.select(config, SECTION, default=None)
    if parent is not None and not isinstance(parent, DictConfig):
        raise ValueError(f"{SECTION} must be a mapping of settings, got {parent!r}")
    unknown = unknown_section_keys(str(key) for key in parent.keys()) if parent is not None else []
    if unknown:
        raise ValueError(f"{SECTION}: unknown key(s) {unknown} (the trainer's rules live under {TRAINER_SECTION})")
    section = OmegaConf.select(config, TRAINER_SECTION, default=None)
    if section is not None and not isinstance(section, DictConfig):
        raise ValueError(f"{TRAINER_SECTION} must be a mapping of the trainer's rules, got {section!r}")
    values = dict(OmegaConf.to_container(section, resolve=True)) if section is not None else {}
    # the actor `serve` runs is named in the section's `ray:`; the trainer finds it there unless told otherwise
    for key, server_key in (("actor_name", "actor_name"), ("ray_namespace", "namespace")):
        served = OmegaConf.select(config, f"{SECTION}.ray.{server_key}", default=None)
        if served is not None and key not in values:
            values[key] = served
    try:
        return TrainerSideConfig.model_validate(values)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{TRAINER_SECTION}: {error}") from None


def rescore_requests(
    names: Sequence[str],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float,
    min_weight_version: int | None,
    want_ref: bool = False,
) -> list[LogProbRequest]:
    """One request per sample to score again on the server, named after the sample (its key),
    at the rollout temperature, waiting for `min_weight_version` (the old policy's); raises
    `ServerLogProbsUnusable` naming every sample no request can be made of (e.g. no response)."""
    requests: list[LogProbRequest] = []
    reasons: dict[int, str] = {}
    for row, (name, prompt, response) in enumerate(zip(names, prompts, responses, strict=True)):
        prompt, response = [int(t) for t in prompt], [int(t) for t in response]
        try:
            requests.append(LogProbRequest(
                request_id=str(name), input_ids=prompt + response, response_start=len(prompt),
                temperature=float(temperature), return_entropy=True, return_ref_log_probs=want_ref,
                min_weight_version=min_weight_version,
            ))
        except ValidationError as error:
            reasons[row] = f"cannot be rescored: {invalid_request_from(error)}"
    if reasons:
        raise ServerLogProbsUnusable(
            f"{len(reasons)} of {len(names)} samples cannot be sent to the server: " + _describe(sorted(reasons), reasons, names)
        )
    return requests


def rescored_results(
    outcomes: Sequence[Any],
    names: Sequence[str],
    response_lengths: Sequence[int],
    old_version: int | None,
    config: TrainerSideConfig,
    need_ref: bool = False,
) -> list[LogProbResult]:
    """The rescored samples' results; raises `ServerLogProbsUnusable` naming every sample the
    server failed, or answered under a version outside `max_version_lag` of the old policy
    (a server ahead of the trainer no longer holds the old policy), or with fields a scored
    sample must have (every response token's log-prob and entropy, finite; ref log-probs)."""
    results: list[LogProbResult] = []
    reasons: dict[int, str] = {}
    for row, (outcome, length) in enumerate(zip(outcomes, response_lengths, strict=True)):
        if not isinstance(outcome, LogProbResult):
            reasons[row] = f"rescoring failed: {type(outcome).__name__}: {outcome}"
        elif old_version is not None and _off_version(int(outcome.weight_version), old_version, config.max_version_lag):
            reasons[row] = (f"rescored under weight version {outcome.weight_version}, "
                            f"the old policy is version {old_version}")
        elif (problem := _missing_reason(SampleScores.from_result(outcome), int(length), need_ref)) is not None:
            reasons[row] = f"rescored, but {problem}"
        else:
            results.append(outcome)
    if reasons:
        failed = sorted(reasons)
        raise ServerLogProbsUnusable(
            f"{len(failed)} of {len(outcomes)} samples could not be rescored on the server "
            f"(model_engine_server.trainer.timeout_s={config.timeout_s:g}): " + _describe(failed, reasons, names)
        )
    return results


def bypass_mode(training_config: Any) -> bool:
    """verl's test of `algorithm.rollout_correction.bypass_mode`: π_old = the rollout's own
    log-probs, so verl never asks for π_old and our trainers refuse to start."""
    rollout_correction = training_config.algorithm.get("rollout_correction", None)
    return bool(rollout_correction and rollout_correction.get("bypass_mode", False))


def needs_the_trainers_forward(training_config: Any) -> str | None:
    """Why the trainer's own old-log-prob forward cannot be skipped under these settings, or
    None. Both of our trainers skip it (the server's numbers replace it), so both refuse these:
    `calculate_sum_pi_squared` reads more of that forward than log-probs and entropy, and
    Megatron router replay R2 records the routing the update replays during it."""
    from omegaconf import OmegaConf

    if OmegaConf.select(training_config, "actor_rollout_ref.actor.calculate_sum_pi_squared", default=False):
        return ("actor_rollout_ref.actor.calculate_sum_pi_squared=True needs the trainer's own forward "
                "(the server returns log-probs and entropy only); turn it off to score on the server")
    if OmegaConf.select(training_config, "actor_rollout_ref.actor.megatron.router_replay.mode", default="disabled") == "R2":
        return ("router replay R2 records routing during verl's old-log-prob forward, which the server "
                "replaces; use R3 (the rollout's routing) or disabled")
    return None
