"""The fully-async loop: rollout, scoring and training overlap; weights flow back after each update.

    rollouter --(each finished group)--> server (old log-probs, entropy, version)
              --> message queue (bounded, staleness bound) --> trainer (PPO update)
              --> publish weights: server (pause -> sync -> resume) and rollouter

`mode="server"` takes old log-probs from the server; `mode="baseline"` has the trainer
recompute them before each update. Everything else is the same code, so the difference in
the trainer's step time is the old-log-prob forward the server takes off its critical path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from clients.agent_loop import ENTROPY_FIELD, MISMATCH_FIELD, VERSION_FIELD, attach_server_log_probs
from clients.base import LogProbClient
from clients.publisher import WeightPublisher
from clients.demo.config import DemoConfig
from clients.demo.message_queue import Group, MessageQueue
from clients.demo.rollouter import Rollouter
from clients.demo.task import TargetTokenTask
from clients.demo.trainer import Trainer

logger = logging.getLogger(__name__)

Mode = Literal["server", "baseline"]
StepCallback = Callable[[dict[str, Any], list[Group]], None]


@dataclass
class RunResult:
    mode: Mode
    steps: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    samples: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s else 0.0

    @property
    def trainer_step_s(self) -> float:
        return float(np.mean([s["trainer_step_s"] for s in self.steps])) if self.steps else 0.0


def _step_metrics(groups: list[Group], trainer_version: int) -> dict[str, Any]:
    samples = [sample for group in groups for sample in group]
    mismatch = [s[MISMATCH_FIELD] for s in samples if MISMATCH_FIELD in s]
    metrics: dict[str, Any] = {
        "entropy": float(np.mean([np.mean(s[ENTROPY_FIELD]) for s in samples])),
        "staleness_mean": float(np.mean([trainer_version - s["rollout_version"] for s in samples])),
        "staleness_max": int(max(trainer_version - s["rollout_version"] for s in samples)),
        "old_log_prob_version_lag_max": int(max(trainer_version - s[VERSION_FIELD] for s in samples)),
        # scored before the trainer's last sync: verl's trainer (max_version_lag 0) would rescore these
        "old_log_prob_behind_share": float(np.mean([s[VERSION_FIELD] < trainer_version for s in samples])),
        "generation_s": float(sum(group[0]["generation_s"] for group in groups)),
    }
    if mismatch:
        metrics["mismatch_mean_abs"] = float(np.mean([m["mean_abs_diff"] for m in mismatch]))
        metrics["mismatch_max_abs"] = float(max(m["max_abs_diff"] for m in mismatch))
        metrics["mismatch_kl"] = float(np.mean([m["kl_estimate"] for m in mismatch]))
        # scored under the very weights that sampled them: what is left is numerics alone
        same = [s[MISMATCH_FIELD] for s in samples if MISMATCH_FIELD in s and s[VERSION_FIELD] == s["rollout_version"]]
        if same:
            metrics["numeric_mismatch_max_abs"] = float(max(m["max_abs_diff"] for m in same))
    scored = [s["scored_at"] - s["finished_at"] for s in samples if "scored_at" in s]
    if scored:
        metrics["scoring_latency_s"] = float(np.mean(scored))
    return metrics


class DemoLoop:
    def __init__(
        self,
        config: DemoConfig,
        model_path: Path,
        mode: Mode,
        client: LogProbClient | None,
        publisher: WeightPublisher | None = None,
    ) -> None:
        """`publisher` streams weights to the server through `checkpoint_transport`; without
        one, weights go through the client's `update_weights` (same pause -> load -> commit)."""
        if mode == "server" and client is None:
            raise ValueError("server mode needs a client of a running server")
        self.config = config
        self.mode = mode
        self.client = client
        self.publisher = publisher
        task = TargetTokenTask(config.model.vocab_size, config.target_vocab, config.prompt_len, config.seed)
        torch.manual_seed(config.seed)  # the sampling stream
        self.rollouter = Rollouter(model_path, task, config.group_size, config.response_len, config.temperature)
        self.trainer = Trainer(model_path, config.learning_rate, config.clip_ratio, config.temperature)
        self.queue = MessageQueue(config.queue_groups, config.staleness_limit, config.stale_policy)
        self._scoring = asyncio.Semaphore(config.max_scoring_inflight)
        self._scoring_tasks: set[asyncio.Task[None]] = set()
        self.failed_samples = 0
        self._failed_in_a_row = 0
        self._scoring_broken: asyncio.Future[None] | None = None  # set by `run`, in its event loop

    async def _score_and_enqueue(self, group: Group) -> None:
        try:
            await asyncio.gather(*(
                attach_server_log_probs(self.client, s, self.config.temperature, self.config.scoring_timeout_s)  # type: ignore[arg-type]
                for s in group
            ))
            now = time.perf_counter()
            for sample in group:
                sample["scored_at"] = now
            self._failed_in_a_row = 0
            await self.queue.put(group)
        except Exception as error:  # a failed group is counted and skipped; failing on, it stops the run
            self._scoring_failed(group, error)
        finally:
            self._scoring.release()

    def _scoring_failed(self, group: Group, error: Exception) -> None:
        self.failed_samples += len(group)
        self._failed_in_a_row += 1
        logger.warning("scoring a group failed (%d in a row), skipped: %s: %s",
                       self._failed_in_a_row, type(error).__name__, error)
        broken = self._scoring_broken
        if self._failed_in_a_row >= self.config.max_failed_groups_in_a_row and broken and not broken.done():
            broken.set_exception(RuntimeError(
                f"scoring failed for {self._failed_in_a_row} groups in a row; the last: {type(error).__name__}: {error}"
            ))

    async def _rollout_forever(self) -> None:
        while True:
            group = await asyncio.to_thread(self.rollouter.generate_group)
            if self.mode == "baseline":
                await self.queue.put(group)
                continue
            await self._scoring.acquire()  # bounds the groups in flight to the server
            task = asyncio.create_task(self._score_and_enqueue(group))
            self._scoring_tasks.add(task)
            task.add_done_callback(self._scoring_tasks.discard)

    async def _publish(self, version: int) -> dict[str, float]:
        weights = self.trainer.export_weights()
        started = time.perf_counter()
        timings: dict[str, float] = {}
        if self.publisher is not None:  # drain -> stream buckets -> commit (resumes serving)
            report = await self.publisher.update_weights(weights, version)
            timings.update(pause_window_s=report.pause_window_s, transfer_s=report.transfer_s)
        elif self.mode == "server":
            await self.client.update_weights(weights, version)  # type: ignore[union-attr]
        await asyncio.to_thread(self.rollouter.load_weights, weights, version)
        timings["sync_s"] = time.perf_counter() - started
        return timings

    async def _next_batch(self, rollout: "asyncio.Task[None]") -> Any:
        """The trainer's next batch, or the error that means none will come: the rollouter
        died, or scoring keeps failing (never a silent wait)."""
        getting = asyncio.ensure_future(self.queue.get_batch(self.config.prompts_per_step, self.trainer.version))
        assert self._scoring_broken is not None
        try:
            await asyncio.wait({getting, rollout, self._scoring_broken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        if self._scoring_broken.done():
            self._scoring_broken.result()  # raises the scoring error
        error = rollout.exception() if rollout.done() and not rollout.cancelled() else None
        raise RuntimeError(f"the rollouter stopped: {error!r}") from error

    async def run(self, on_step: StepCallback | None = None, progress: Any = None) -> RunResult:
        result = RunResult(self.mode)
        started = time.perf_counter()
        self._scoring_broken = asyncio.get_running_loop().create_future()
        rollout = asyncio.create_task(self._rollout_forever())
        try:
            for step in range(self.config.steps):
                batch = await self._next_batch(rollout)
                step_started = time.perf_counter()
                old_log_prob_s = 0.0
                if self.mode == "baseline":
                    await asyncio.to_thread(self.trainer.recompute_old_log_probs, batch.groups)
                    old_log_prob_s = time.perf_counter() - step_started
                metrics = _step_metrics(batch.groups, self.trainer.version)
                metrics.update(await asyncio.to_thread(self.trainer.update, batch.groups))
                metrics.update(await self._publish(self.trainer.version))
                metrics.update(
                    step=step,
                    version=self.trainer.version,
                    old_log_prob_s=old_log_prob_s,
                    wait_for_batch_s=batch.wait_s,
                    trainer_step_s=time.perf_counter() - step_started,
                    dropped_stale=batch.dropped_stale,
                    scoring_failed_samples=self.failed_samples,
                    queue_groups=self.queue.qsize(),
                    elapsed_s=time.perf_counter() - started,
                )
                result.steps.append(metrics)
                result.samples += sum(len(g) for g in batch.groups)
                if on_step:
                    on_step(metrics, batch.groups)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward']:.2f}", mode=self.mode)
        finally:
            rollout.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rollout
            for task in list(self._scoring_tasks):
                task.cancel()
            await asyncio.gather(*self._scoring_tasks, return_exceptions=True)
            if self._scoring_broken.done():  # read (or already raised): asyncio need not report it
                self._scoring_broken.exception()
        result.wall_s = time.perf_counter() - started
        return result


def write_jsonl(path: Path, result: RunResult) -> None:
    with path.open("a") as handle:
        for metrics in result.steps:
            handle.write(json.dumps({"mode": result.mode, **metrics}) + "\n")
