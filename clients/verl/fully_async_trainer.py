"""verl's v0 fully-async trainer taking π_old (and optionally the reference) from the server.

`ServerLogProbFullyAsyncTrainer` is verl's `FullyAsyncTrainer`
(`experimental/fully_async_policy/fully_async_trainer.py`) with `_compute_old_log_prob` reading
the log-probs the scoring agent loop (`clients.verl.agent_loop`) attached to every sample,
instead of copying the actor's weights to CPU (`save_model_to_cpu` / `restore_model_from_cpu`)
and running a forward over the batch. It returns what verl's method returns: a `DataProto` with
`old_log_probs` and `entropys`, `(bsz, response_length)` float32, right-padded with exact zeros,
and the MFU of the forward the trainer ran (0.0 when it ran none). verl's caller,
`SeparateRayPPOTrainer._fit_compute_log_prob` (`experimental/separation/ray_trainer.py`), then
logs `actor/entropy` (`agg_loss` with the actor's `loss_agg_mode`) and, when the batch holds
`rollout_log_probs`, `calculate_debug_metrics`, into `self.metrics` exactly as for its own
numbers; this class adds `model_engine_server/...` (`server_fields.batch_metrics`) there.

Weight versions (the contract with the server). The v0 trainer numbers its weights with
`self.current_param_version`: 0 from scratch (N after resuming `global_step_N`), pushed to the
rollout replicas before `fit` and after every `trigger_parameter_sync_step` local steps as
`checkpoint_manager.update_weights(global_steps=self.current_param_version)`, right after the
increment in `_fit_update_local_step`; the rollout's `min_global_steps` / `max_global_steps`
sample tags carry the same numbers. Within a sync cycle verl's own path computes π_old with the
weights saved at `local_trigger_step == 1`, i.e. the weights last pushed: version
`current_param_version`, for every local step of the cycle. So that is `old_version` here, and
the server must label its weights the same way: its weight version N must be the parameters
verl labels N (it is when the server receives verl's syncs tagged with that `global_steps`,
`join_weight_sync`, and serves the initial checkpoint as version 0; after a resume from
`global_step_N`, verl's first sync delivers N). A sample scored under another version (beyond
`max_version_lag`) is stale and goes to `on_stale`.

Rules (`model_engine_server.trainer:`, via `server_fields.plan_batch`): `recompute` runs verl's
own path (its save/restore recompute) over the batch and takes its values for the flagged rows
only (that path needs the cycle's old weights saved at local step 1: while a rule can say
`recompute` and `trigger_parameter_sync_step > 1`, they are saved once per cycle, at step 1;
`on_missing: rescore` with `on_stale` other than `recompute` copies no weights at all); `rescore` scores the flagged rows again on the server with
`min_weight_version=old_version` (the server waits until it holds that version, bounded by
`timeout_s`), and any failure raises naming the samples; `accept` keeps a stale sample's
numbers; `fail` raises `ServerLogProbsUnusable` naming the samples (uid and row).

With `score_ref: true`, `_compute_ref_log_prob` takes `ref_log_prob` from the server's reference
log-probs the same way (the reference is frozen, so no version applies; missing samples follow
`on_missing`).

The class verl's main instantiates is a Ray actor; `ModelEngineServerFullyAsyncTrainer` is that
actor class, with verl's own resource request (`num_cpus=10`). `clients.verl.fully_async_main`
runs verl's pipeline with it.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import ray
import torch
from omegaconf import DictConfig
from verl import DataProto
from verl.experimental.fully_async_policy.fully_async_trainer import FullyAsyncTrainer

from clients.base import SyncLogProbClient
from clients.verl import server_fields as sf
from clients.verl.connection import blocking_client, score_for_trainer
from clients.verl.dataproto_fields import ServerColumns, result_rows, rows_only, token_ids
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.protocol import LogProbResult

logger = logging.getLogger(__name__)

# verl decorates its trainer with @ray.remote; subclassing needs the class it wrapped, which Ray
# keeps as `__ray_actor_class__` (verl's own single_controller reads it the same way).
VerlFullyAsyncTrainer = FullyAsyncTrainer.__ray_actor_class__
TRAINER_ACTOR_OPTIONS = {"num_cpus": 10}  # what verl's @ray.remote asks for its trainer


def check_trainer_config(config: DictConfig) -> TrainerSideConfig:
    """Refuse settings under which the server's numbers would be ignored or not enough; returns
    the `model_engine_server.trainer` rules."""
    if sf.bypass_mode(config):
        raise ValueError(
            "this trainer takes π_old from the server, which only decoupled PPO computes; "
            "algorithm.rollout_correction.bypass_mode=True trains on the rollout log-probs and never asks for it. "
            "Set algorithm.rollout_correction.bypass_mode=False, or use verl's own fully_async_main."
        )
    problem = sf.needs_the_trainers_forward(config)
    if problem is not None:
        raise ValueError(problem)
    return sf.trainer_side_config(config)


class ServerLogProbFullyAsyncTrainer(VerlFullyAsyncTrainer):
    """verl's fully-async trainer whose π_old comes from the server (see the module docstring)."""

    def __init__(self, config: DictConfig, *args: Any, **kwargs: Any) -> None:
        from clients.verl.scoring_replica import check_join_target

        self.server_rules = check_trainer_config(config)
        check_join_target(self.server_rules)  # the join itself waits for the rollouter, after every worker started
        super().__init__(config, *args, **kwargs)
        self._server_client: SyncLogProbClient | None = None
        self._warned_unscored = False

    @property
    def old_policy_version(self) -> int:
        """The weight version verl's own path would compute π_old with (module docstring)."""
        return int(self.current_param_version)

    async def _setup_checkpoint_manager(self) -> None:
        """verl's manager of the rollout replicas, joined by the server's replicas when
        `join_weight_sync`: every sync then labels the server's weights as verl labels its own."""
        await super()._setup_checkpoint_manager()
        if self.server_rules.join_weight_sync:
            from clients.verl.scoring_replica import join_scoring_pool

            await join_scoring_pool(self.checkpoint_manager, self.config, self.server_rules)

    # ---------------------------------------------------------------- π_old
    def _compute_old_log_prob(self, batch: DataProto) -> tuple[DataProto, float]:
        columns = ServerColumns.of(batch)
        old_version = self.old_policy_version
        plan = sf.plan_batch(columns.samples, columns.response_lengths, old_version, self.server_rules, columns.names)
        self._warn_if_nothing_scored(plan, columns)
        self._keep_old_policy_for_later_recomputes(plan)
        log_probs = columns.padded("log_probs", plan.use_server)
        entropy = columns.padded("entropy", plan.use_server)
        versions = {row: columns.samples[row].version for row in plan.use_server}
        if plan.rescore:
            results = self._rescore(batch, columns, plan.rescore, old_version, need_ref=False)
            log_probs = sf.overlay_rows(log_probs, self._rows(results, plan.rescore, "log_probs", columns), plan.rescore)
            entropy = sf.overlay_rows(entropy, self._rows(results, plan.rescore, "entropy", columns), plan.rescore)
            versions.update({row: result.weight_version for row, result in zip(plan.rescore, results)})
        mfu = 0.0
        if plan.recompute:  # verl's own path (save/restore + forward) over the batch; its rows only
            recomputed, mfu = super()._compute_old_log_prob(batch)
            log_probs = sf.overlay_rows(log_probs, recomputed.batch["old_log_probs"], plan.recompute)
            entropy = sf.overlay_rows(entropy, recomputed.batch["entropys"], plan.recompute)
        self.metrics.update(self._metrics(batch, plan, versions, old_version, log_probs, entropy))
        return DataProto.from_dict(tensors={"old_log_probs": log_probs, "entropys": entropy}), mfu

    def _keep_old_policy_for_later_recomputes(self, plan: sf.Plan) -> None:
        """verl's recompute at local step k > 1 restores the weights saved at step 1 of the sync
        cycle (`save_model_to_cpu(1)`), which its own path saves only when step 1 recomputes. When
        step 1 needs no recompute but a later step of the cycle may (the rules can say
        `recompute`), save them here as verl would have: once per cycle, where verl copies at
        every step. Without it a later recompute would silently use the updated weights (or the
        snapshot of an earlier cycle)."""
        may_recompute = "recompute" in (self.server_rules.on_missing, self.server_rules.on_stale)
        if self.local_trigger_step == 1 and self.trigger_parameter_sync_step > 1 and may_recompute and not plan.recompute:
            self.actor_rollout_wg.save_model_to_cpu(1)

    # ---------------------------------------------------------------- reference
    def _compute_ref_log_prob(self, batch: DataProto) -> DataProto:
        if not self.server_rules.score_ref:
            return super()._compute_ref_log_prob(batch)
        columns = ServerColumns.of(batch)
        plan = sf.plan_batch(columns.samples, columns.response_lengths, None, self.server_rules, columns.names,
                             need_ref=True)
        ref = columns.padded("ref_log_probs", plan.use_server)
        if plan.rescore:
            results = self._rescore(batch, columns, plan.rescore, None, need_ref=True)
            ref = sf.overlay_rows(ref, self._rows(results, plan.rescore, "ref_log_probs", columns), plan.rescore)
        if plan.recompute:
            ref = sf.overlay_rows(ref, super()._compute_ref_log_prob(batch).batch["ref_log_prob"], plan.recompute)
        prefix = f"{sf.METRIC_PREFIX}/ref"
        self.metrics.update({f"{prefix}/samples_from_server_total": float(len(plan.use_server)),
                             f"{prefix}/samples_rescored_total": float(len(plan.rescore)),
                             f"{prefix}/samples_recomputed_total": float(len(plan.recompute))})
        return DataProto.from_dict(tensors={"ref_log_prob": ref})

    # ---------------------------------------------------------------- helpers
    def _server(self) -> SyncLogProbClient:
        if self._server_client is None:
            self._server_client = blocking_client(self.server_rules)
        return self._server_client

    def _temperature(self, batch: DataProto) -> float:
        """The sampling temperature verl's own recompute uses (`_fit_generate` puts it in meta_info)."""
        return float(batch.meta_info.get("temperature", self.config.actor_rollout_ref.rollout.temperature))

    def _rescore(self, batch: DataProto, columns: ServerColumns, rows: Sequence[int], min_version: int | None,
                 need_ref: bool) -> list[LogProbResult]:
        """The server's answers for `rows` at `min_version` or later; raises naming the samples."""
        names = [columns.names[row] for row in rows]
        prompts, responses = token_ids(batch, rows)
        requests = sf.rescore_requests(names, prompts, responses, self._temperature(batch), min_version, want_ref=need_ref)
        outcomes = score_for_trainer(self._server(), self.server_rules, requests, names)
        return sf.rescored_results(outcomes, names, [len(r) for r in responses], min_version, self.server_rules,
                                   need_ref=need_ref)

    @staticmethod
    def _rows(results: Sequence[LogProbResult], rows: Sequence[int], attribute: str,
              columns: ServerColumns) -> torch.Tensor:
        return result_rows(results, rows, attribute, len(columns.samples), columns.width)

    def _metrics(self, batch: DataProto, plan: sf.Plan, versions: dict[int, int | None], old_version: int,
                 log_probs: torch.Tensor, entropy: torch.Tensor) -> dict[str, float]:
        """`batch_metrics` over the rows whose numbers came from the server."""
        served = sorted(versions)
        rollout = batch.batch["rollout_log_probs"] if "rollout_log_probs" in batch.batch.keys() else None
        return sf.batch_metrics(plan, [versions.get(row) for row in range(len(batch))], old_version,
                                rows_only(batch.batch["response_mask"], served), log_probs, entropy, rollout)

    def _warn_if_nothing_scored(self, plan: sf.Plan, columns: ServerColumns) -> None:
        """A batch the server scored none of usually means the scoring agent loop is not in use."""
        if plan.use_server or plan.rescore or self._warned_unscored:
            return
        self._warned_unscored = True
        first = plan.reasons.get(0, "no reason recorded")
        logger.warning(
            "none of the %d samples carries server log-probs (sample %s: %s); is "
            "actor_rollout_ref.rollout.agent.default_agent_loop a model_engine_server agent loop, and "
            "actor_rollout_ref.rollout.multi_turn.enable=True (else verl's rollouter runs single_turn_agent)?",
            len(columns.samples), columns.names[0] if columns.names else "-", first,
        )


ModelEngineServerFullyAsyncTrainer = ray.remote(**TRAINER_ACTOR_OPTIONS)(ServerLogProbFullyAsyncTrainer)
