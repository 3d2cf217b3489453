"""verl's V1 trainer taking π_old (and optionally the reference) from the server.

`trainer.v1.trainer_mode=model_engine_server` selects `PPOTrainerModelEngineServer`, a
`PPOTrainerSeparateAsync` (trainer and rollout on separate GPUs, partial rollout) whose
old-log-prob step reads the log-probs the scoring agent loop attached to each sample instead of
running the actor forward. In the V1 pipeline each sample's `AgentLoopOutput.as_dict()` is stored
in TransferQueue, so the server's numbers sit in the sample's `extra_fields` dict under the names
of `server_fields`; this trainer reads them back with `tq.kv_batch_get`, applies the
`model_engine_server.trainer:` rules to samples without usable numbers, and writes
`old_log_probs` / `entropy` (and `ref_log_prob`) back exactly as verl's own path does: jagged
nested float32 tensors of one value per response token. No actor forward runs for samples the
server scored. Weights are copied to CPU only where a later recompute may need π_old: once per
sync cycle when a rule says `recompute` (the default `on_missing`) and a cycle has several steps
(`_keep_old_policy_for_later_recomputes`); with `rescore`, `fail` or `accept` rules, never.

Weight versions (the contract with the server). V1 labels every weight sync with the trainer's
`global_steps`: `standalone_checkpoint_manager.update_weights(self.global_steps)` runs at
`on_init_end` (0 from scratch, G after resuming `global_step_G`) and at the end of every step;
the rollout's `min_global_steps` / `max_global_steps` tags use the same numbers. So the weights
labelled N are the parameters after global step N. During step S (`self.global_steps == S`)
verl's decoupled PPO treats as π_old the weights at `local_trigger_step == 0`, which are the
ones synced at the end of step S-1: version S-1, for every mini-batch of the step (no sync
happens inside a step). The server must follow the same labels: its weight version N is the
weights verl labels N (which holds when it receives verl's syncs with `global_steps` as the
version, and for version 0, the initial checkpoint, from scratch). A sample scored under
another version is stale and goes to `on_stale`; `max_version_lag` widens "current".

`algorithm.rollout_correction.bypass_mode=True` means verl never computes π_old (it trains on the
rollout engine's own log-probs), so the server's numbers would be scored and then ignored. This
mode implies decoupled PPO, and refuses that setting at construction with a message saying
what to set (verl's fully-async configs ship with `bypass_mode: True`, so silently running would
be the likely outcome of a forgotten override). An instance built without `__init__` still
follows verl's bypass path, unchanged.

The mode reads its scheduling settings (`parameter_sync_step`, `num_warmup_batches`,
`hybrid_rollout`) from `trainer.v1.separate_async`, where the parent class reads them; they are
mirrored into `trainer.v1.model_engine_server`, where verl's base class and replay buffer look
them up by mode name, so both see one value.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.workers.utils.padding import response_to_nested

from clients.verl import connection
from clients.verl import server_fields as sf
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.errors import ModelEngineError
from model_engine_server.protocol import LogProbRequest, LogProbResult

logger = logging.getLogger(__name__)

TRAINER_MODE = "model_engine_server"
SETTINGS_MODE = "separate_async"  # where the parent class reads this mode's scheduling settings


# ---------------------------------------------------------------- configuration
def check_mode_config(config: DictConfig) -> TrainerSideConfig:
    """Refuse what this mode cannot mean; returns the parsed `model_engine_server.trainer` rules."""
    if sf.bypass_mode(config):
        raise ValueError(
            f"trainer.v1.trainer_mode={TRAINER_MODE} takes π_old from the server, which only decoupled PPO uses; "
            "algorithm.rollout_correction.bypass_mode=True trains on the rollout log-probs and would ignore the "
            "server's. Set algorithm.rollout_correction.bypass_mode=False, or use trainer_mode=separate_async."
        )
    problem = sf.needs_the_trainers_forward(config)
    if problem is not None:
        raise ValueError(problem)
    return sf.trainer_side_config(config)


def mirror_mode_settings(config: DictConfig) -> None:
    """Make `trainer.v1.model_engine_server` the same settings as `trainer.v1.separate_async`.

    `PPOTrainerSeparateAsync.__init__` reads `separate_async` by name, while the base class,
    the replay buffer and rollout skipping read `trainer.v1.<trainer_mode>`; two values of
    `parameter_sync_step` would size mini-batches against the wrong count.
    """
    v1 = config.trainer.v1
    settings = v1.get(SETTINGS_MODE)
    existing = v1.get(TRAINER_MODE, None)
    if existing is not None and existing != settings:
        raise ValueError(
            f"trainer.v1.{TRAINER_MODE} differs from trainer.v1.{SETTINGS_MODE}: this mode reads its settings "
            f"(parameter_sync_step, num_warmup_batches, hybrid_rollout) from trainer.v1.{SETTINGS_MODE}; set them there"
        )
    with open_dict(config):
        v1[TRAINER_MODE] = OmegaConf.create(OmegaConf.to_container(settings, resolve=False))


# ---------------------------------------------------------------- the batch, read from TransferQueue
@dataclass
class BatchView:
    """What the old-log-prob and reference steps read of one batch."""

    keys: list[str]
    samples: list[sf.SampleScores]
    response_mask: torch.Tensor  # jagged nested (bsz, response_len_i), as TransferQueue holds it
    padded_mask: torch.Tensor  # (bsz, width), zeros past each response
    real_rows: list[int]  # rows that are not verl's synthetic padding samples
    padded: dict[str, torch.Tensor] = field(default_factory=dict)  # further fields, zeros past each response

    @property
    def width(self) -> int:
        return int(self.padded_mask.shape[1])

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.response_mask.offsets().diff()]

    def server_rows(self, rows: Sequence[int], attribute: str) -> torch.Tensor:
        """`(bsz, width)` float32: `attribute` of the samples in `rows`, zeros elsewhere."""
        wanted = set(rows)
        values = [getattr(s, attribute) if row in wanted else None for row, s in enumerate(self.samples)]
        return sf.pad_rows(values, self.width)

    def nested(self, padded: torch.Tensor) -> torch.Tensor:
        """The jagged layout verl writes per-token fields back in."""
        return response_to_nested(padded.float(), self.response_mask)


def read_view(batch: KVBatchMeta, padded_fields: Sequence[str] = ()) -> BatchView:
    """The server fields and response mask of every sample of `batch`, and `padded_fields`."""
    wanted = ["extra_fields", "response_mask", *padded_fields]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=wanted)
    response_mask = data["response_mask"]
    # a tensordict LinkedList, NonTensorStack or array depending on the backend: list() for all
    per_sample = list(data["extra_fields"])
    return BatchView(
        keys=list(batch.keys),
        samples=[sf.SampleScores.from_fields(f if isinstance(f, dict) else None) for f in per_sample],
        response_mask=response_mask,
        padded_mask=response_mask.to_padded_tensor(0),
        real_rows=[row for row, tag in enumerate(batch.tags) if not tag.get("is_padding", False)],
        padded={name: data[name].to_padded_tensor(0) for name in padded_fields},
    )


def plan_rows(view: BatchView, old_version: int | None, rules: TrainerSideConfig, need_ref: bool) -> sf.Plan:
    """`plan_batch` over the real rows, with its row numbers mapped back to the batch's.

    verl's synthetic padding samples (tag `is_padding`) copy the first sample's `extra_fields`
    but hold a one-token response of mask 0: no rule applies to them, they get zeros."""
    rows = view.real_rows
    lengths = view.lengths
    plan = sf.plan_batch(
        [view.samples[r] for r in rows], [lengths[r] for r in rows], old_version, rules,
        sample_names=[view.keys[r] for r in rows], need_ref=need_ref,
    )
    return sf.Plan(
        use_server=[rows[i] for i in plan.use_server],
        recompute=[rows[i] for i in plan.recompute],
        rescore=[rows[i] for i in plan.rescore],
        reasons={rows[i]: reason for i, reason in plan.reasons.items()},
        accepted_stale=[rows[i] for i in plan.accepted_stale],
    )


# ---------------------------------------------------------------- the server, for rescoring
def score_on_server(rules: TrainerSideConfig, requests: list[LogProbRequest], names: Sequence[str]) -> list:
    """Per-request outcomes within `timeout_s` through the configured client (opened for this
    call: rescoring is the exception path); a server that cannot be reached, or a call that
    outlives the deadline, raises `ServerLogProbsUnusable` naming the samples."""
    try:
        client = connection.blocking_client(rules)
    except (ModelEngineError, ValueError) as error:  # ray.get_actor: ValueError for an unknown actor
        raise sf.ServerLogProbsUnusable(
            f"could not rescore {len(names)} samples: no server at {connection.where(rules)} "
            f"({type(error).__name__}: {error}): " + ", ".join(map(str, names[:8]))
        ) from error
    try:
        return connection.score_for_trainer(client, rules, requests, names)
    finally:
        client.close()


def prompt_and_response_ids(batch: KVBatchMeta, rows: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of `rows`, unpadded (the server scores prompt + response)."""
    data = tq.kv_batch_get(keys=[batch.keys[r] for r in rows], partition_id=batch.partition_id,
                           select_fields=["prompts", "responses"])
    prompts = [t.tolist() for t in data["prompts"].unbind()]
    responses = [t.tolist() for t in data["responses"].unbind()]
    return prompts, responses


def result_rows(results: Sequence[LogProbResult], rows: Sequence[int], attribute: str, view: BatchView) -> torch.Tensor:
    """`(bsz, width)` float32 holding `attribute` of each result at its row, zeros elsewhere."""
    values: list[Any] = [None] * len(view.keys)
    for row, result in zip(rows, results, strict=True):
        values[row] = getattr(result, attribute)
    return sf.pad_rows(values, view.width)


def read_padded(batch: KVBatchMeta, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Fields verl's own path wrote, padded with zeros."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(names))
    return {name: data[name].to_padded_tensor(0).float() for name in names}


def row_mask(view: BatchView, rows: Sequence[int]) -> torch.Tensor:
    """The response mask of `rows` only."""
    keep = torch.zeros(len(view.keys), 1, dtype=view.padded_mask.dtype)
    keep[list(rows)] = 1
    return view.padded_mask * keep


# ---------------------------------------------------------------- the trainer
@register_trainer(TRAINER_MODE)
class PPOTrainerModelEngineServer(PPOTrainerSeparateAsync):
    """Separate-async PPO whose π_old (and, with `score_ref`, reference) come from the server."""

    # for instances that bypass __init__: the "no server numbers at all" warning fires once
    _warned_no_server_numbers = False

    def __init__(self, config: DictConfig):
        from clients.verl.scoring_replica import check_join_target

        check_join_target(check_mode_config(config))  # before verl builds workers and rollout servers
        mirror_mode_settings(config)
        super().__init__(config)

    def _setup(self) -> None:
        """verl's set-up; with `join_weight_sync` the server's replicas join the standalone
        rollout's checkpoint manager, so each `update_weights(global_steps)` reaches them too."""
        super()._setup()
        rules = self.server_rules
        if rules.join_weight_sync:
            from clients.verl.scoring_replica import join_scoring_pool

            asyncio.run(join_scoring_pool(self.standalone_checkpoint_manager, self.config, rules))

    # ------------------------------------------------------------ what the rules read
    @property
    def server_rules(self) -> TrainerSideConfig:
        """The `model_engine_server.trainer:` section of this trainer's config."""
        return sf.trainer_side_config(self.config)

    @property
    def old_policy_version(self) -> int:
        """The weight version of π_old during the current step (see the module docstring)."""
        return int(self.global_steps) - 1

    @property
    def rollout_temperature(self) -> float:
        return float(self.config.actor_rollout_ref.rollout.temperature)

    # ------------------------------------------------------------ old log-probs
    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """π_old from the server; rows without usable numbers follow the configured rule."""
        if sf.bypass_mode(self.config):
            return super()._compute_old_log_prob(batch, metrics)
        rules, old_version = self.server_rules, self.old_policy_version
        with_rollout = bool(self.config.actor_rollout_ref.rollout.calculate_log_probs)
        view = read_view(batch, ("responses", "rollout_log_probs") if with_rollout else ())
        plan = plan_rows(view, old_version, rules, need_ref=False)
        self._warn_if_nothing_from_server(view, plan)
        self._keep_old_policy_for_later_recomputes(bool(plan.recompute))

        log_probs = view.server_rows(plan.use_server, "log_probs")
        entropy = view.server_rows(plan.use_server, "entropy")
        versions: dict[int, int | None] = {row: view.samples[row].version for row in plan.use_server}
        if plan.rescore:
            results = self._rescore(batch, view, plan.rescore, old_version, want_ref=False)
            log_probs = sf.overlay_rows(log_probs, result_rows(results, plan.rescore, "log_probs", view), plan.rescore)
            entropy = sf.overlay_rows(entropy, result_rows(results, plan.rescore, "entropy", view), plan.rescore)
            versions.update({row: int(r.weight_version) for row, r in zip(plan.rescore, results)})
        if plan.recompute:
            recomputed = self._recompute_old(batch)
            log_probs = sf.overlay_rows(log_probs, recomputed["old_log_probs"], plan.recompute)
            entropy = sf.overlay_rows(entropy, recomputed["entropy"], plan.recompute)

        fields = TensorDict({"old_log_probs": view.nested(log_probs), "entropy": view.nested(entropy)},
                            batch_size=len(view.keys))
        written = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        metrics.update(self._old_log_prob_metrics(view, plan, versions, old_version, log_probs, entropy))
        return written

    def _keep_old_policy_for_later_recomputes(self, recomputes_now: bool) -> None:
        """verl's recompute at mini-batch k >= 1 of a sync cycle restores the weights it saved at
        mini-batch 0 (`save_model_to_cpu(0)`), which its own path saves only when mini-batch 0
        recomputes. When mini-batch 0 needs no recompute but a later one may (the rules can say
        `recompute`), save them here as verl would have; without it that later recompute would
        silently run on the updated weights, or on an earlier cycle's snapshot."""
        rules = self.server_rules
        may_recompute = "recompute" in (rules.on_missing, rules.on_stale)
        if self.local_trigger_step == 0 and self.parameter_sync_step > 1 and may_recompute and not recomputes_now:
            self.actor_rollout_wg.save_model_to_cpu(0)

    def _recompute_old(self, batch: KVBatchMeta) -> dict[str, torch.Tensor]:
        """verl's own version-aware recompute (save/restore of π_old) for the whole batch, read
        back padded. The whole batch, because verl splits it across the actor's data-parallel
        ranks and a subset need not divide evenly; its metrics are replaced by ours after."""
        super()._compute_old_log_prob(batch, {})
        return read_padded(batch, ("old_log_probs", "entropy"))

    def _rescore(self, batch: KVBatchMeta, view: BatchView, rows: Sequence[int], old_version: int | None,
                 want_ref: bool) -> list[LogProbResult]:
        """Score `rows` again on the server, at `old_version` or later, within `timeout_s`."""
        rules = self.server_rules
        names = [view.keys[r] for r in rows]
        prompts, responses = prompt_and_response_ids(batch, rows)
        requests = sf.rescore_requests(names, prompts, responses, self.rollout_temperature, old_version, want_ref)
        outcomes = score_on_server(rules, requests, names)
        return sf.rescored_results(outcomes, names, [len(r) for r in responses], old_version, rules, need_ref=want_ref)

    def _old_log_prob_metrics(self, view: BatchView, plan: sf.Plan, versions: dict[int, int | None],
                              old_version: int, log_probs: torch.Tensor, entropy: torch.Tensor) -> dict[str, Any]:
        """`actor/entropy` as verl reports it, verl's rollout-vs-actor debug metrics, and ours."""
        actor = self.config.actor_rollout_ref.actor
        entropy_agg = agg_loss(loss_mat=entropy, loss_mask=view.padded_mask, loss_agg_mode=actor.loss_agg_mode,
                               loss_scale_factor=actor.loss_scale_factor)
        metrics: dict[str, Any] = {"actor/entropy": entropy_agg.detach().item()}
        rollout = view.padded.get("rollout_log_probs")
        if rollout is not None:
            padded = TensorDict({"rollout_log_probs": rollout.float(), "old_log_probs": log_probs,
                                 "response_mask": view.padded_mask, "responses": view.padded["responses"]},
                                batch_size=len(view.keys))
            metrics.update(calculate_debug_metrics(DataProto(batch=padded)))
        from_server = [*plan.use_server, *plan.rescore]
        metrics.update(sf.batch_metrics(
            plan, [versions.get(row) for row in view.real_rows], old_version, row_mask(view, from_server),
            log_probs, entropy, None if rollout is None else rollout.float(),
        ))
        return metrics

    def _warn_if_nothing_from_server(self, view: BatchView, plan: sf.Plan) -> None:
        """Say once when a whole batch came without server numbers: the scoring agent loop is
        probably not configured, and every step then pays verl's own recompute (or fails)."""
        if plan.use_server or not view.real_rows or self._warned_no_server_numbers:
            return
        self._warned_no_server_numbers = True
        first = view.real_rows[0]
        logger.warning(
            "model-engine-server: no sample of this batch carries usable server log-probs (e.g. %s: %s); is the "
            "scoring agent loop configured (actor_rollout_ref.rollout.agent.default_agent_loop)?",
            view.keys[first], plan.reasons.get(first, "unknown"),
        )

    # ------------------------------------------------------------ reference log-probs
    def _compute_ref_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """`ref_log_prob` from the server's reference mode when `score_ref`, else verl's."""
        rules = self.server_rules
        if not rules.score_ref:
            return super()._compute_ref_log_prob(batch, metrics)
        view = read_view(batch)
        plan = plan_rows(view, None, rules, need_ref=True)  # the reference is frozen: no version to match
        ref = view.server_rows(plan.use_server, "ref_log_probs")
        if plan.rescore:
            results = self._rescore(batch, view, plan.rescore, None, want_ref=True)
            ref = sf.overlay_rows(ref, result_rows(results, plan.rescore, "ref_log_probs", view), plan.rescore)
        if plan.recompute:
            super()._compute_ref_log_prob(batch, {})
            ref = sf.overlay_rows(ref, read_padded(batch, ("ref_log_prob",))["ref_log_prob"], plan.recompute)
        fields = TensorDict({"ref_log_prob": view.nested(ref)}, batch_size=len(view.keys))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        prefix = f"{sf.METRIC_PREFIX}/ref"
        metrics.update({
            f"{prefix}/samples_from_server_total": float(len(plan.use_server)),
            f"{prefix}/samples_recomputed_total": float(len(plan.recompute)),
            f"{prefix}/samples_rescored_total": float(len(plan.rescore)),
        })
        return batch
