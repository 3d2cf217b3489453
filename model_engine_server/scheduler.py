"""`ModelEngineServer`: the asyncio batch scheduler in front of an executor.

Contract:
- A batch is dispatched when it is full (the next queued request would pass the token budget
  `max_tokens_per_batch`, or `max_batch_size` requests), or when its oldest request has waited
  `max_wait_ms` (`batch_forming.form_batch`).
- Up to `max_inflight_batches` batches run at once, so the next batch is formed and handed
  over while the current one computes.
- Every result carries the weight version in force when its batch was dispatched. Versions
  change only inside a weight update, which first drains every in-flight batch, so no batch
  spans two versions.
- `pause_serving()` returns once in-flight batches have finished; requests keep queueing
  (bounded) and are served after `resume_serving()`, unless their deadline (at most
  `request_timeout_s`) passes first.
- Every request is answered or failed with a typed error: invalid input at once, overload at
  once (this scheduler's queue; `reference.PolicyWithReference` answers a request when either
  half fails), a deadline while waiting, or the executor's failure for its batch. None is dropped.

Imports neither Ray nor HTTP: the replica and HTTP layers wrap it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence

import torch

from model_engine_server.batch_forming import BatchLimits, form_batch
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelEngineError,
    Overloaded,
    ServerShuttingDown,
    WorkerFailed,
)
from model_engine_server.executor import Executor
from model_engine_server.protocol import (
    LogProbRequest,
    LogProbResult,
    RequestLimits,
    ScoreOutput,
    check_against_limits,
    resolve_temperature,
)
from model_engine_server.service import gather_outcomes
from model_engine_server.config.scheduler import SchedulerConfig
from model_engine_server.request_queue import Pending, RequestQueue, wait_limit_s
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.weight_updates import WeightUpdates

if TYPE_CHECKING:
    from checkpoint_transport.spec import ReceiveReport, TransportSpec

logger = logging.getLogger(__name__)

__all__ = ["ModelEngineServer", "SchedulerConfig"]  # the config is part of this module's API


class ModelEngineServer:
    """Token-budget batching with pause/resume and weight versions over any `Executor`."""

    def __init__(
        self,
        executor: Executor,
        config: SchedulerConfig | None = None,
        observer: SchedulerObserver | None = None,
        initial_weight_version: int = 0,
    ) -> None:
        self.executor = executor
        self.config = config or SchedulerConfig()
        self.observer = observer or SchedulerObserver()
        self.updates = WeightUpdates(
            executor, self.config.weight_update_timeout_s, self._drain, self._wakeup_soon, initial_weight_version
        )
        self.weights = self.updates.state
        info = executor.model_info()
        max_seq_len = min(self.config.max_seq_len or info.max_position_embeddings, info.max_position_embeddings)
        self.limits = RequestLimits(info.vocab_size, max_seq_len, self.config.max_tokens_per_batch)
        self._batch_limits = BatchLimits(  # a shared prompt counts once in a batch, as the engine runs it
            self.config.max_tokens_per_batch, self.config.max_batch_size, self.config.max_wait_ms / 1000, info.shares_prompts
        )
        self._queue = RequestQueue()
        self._inflight = 0
        self._inflight_tokens = 0
        self._paused_since: float | None = None
        self._paused_total_s = 0.0
        self._accepting = True
        self._stopping = False  # the dispatch loop's own exit condition (see shutdown)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.counters = {"requests": 0, "tokens": 0, "batches": 0, "failed": 0, "rejected": 0}

    # ---------------------------------------------------------------- requests
    async def submit(self, request: LogProbRequest | dict[str, Any], timeout_s: float | None = None) -> LogProbResult:
        """Queue one request and wait for its result; raises a `ModelEngineError` on failure."""
        self._ensure_started()
        try:
            request = resolve_temperature(LogProbRequest.parse(request), self.config.default_temperature)
            check_against_limits(request, self.limits)
            self._check_admission(request)
            wait_s = wait_limit_s(timeout_s, self.config.request_timeout_s)
        except ModelEngineError as error:
            self.counters["rejected"] += 1
            self.observer.request_rejected(error)
            raise
        pending = Pending(request, asyncio.get_running_loop().create_future())
        self._queue.push(pending, wait_s, self._expire)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._queue.remove(pending)  # the caller went away; a running batch just discards it
            raise

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[LogProbResult | ModelEngineError]:
        """Score many requests; each entry is its result or the error for that request alone."""
        return await gather_outcomes(self.submit(r, timeout_s) for r in requests)

    def _check_admission(self, request: LogProbRequest) -> None:
        if not self._accepting:
            raise ServerShuttingDown("the server is shutting down and accepts no new requests")
        if request.return_ref_log_probs:  # a second model's work: `reference.PolicyWithReference` splits it off
            raise InvalidRequest(
                "this scheduler scores one model and cannot return ref log-probs (the reference policy "
                "is served beside it when model_engine_server.enable_ref_mode is set)",
                "return_ref_log_probs",
            )
        if not self.has_room_for(request.num_tokens):
            raise Overloaded(
                f"queue holds {self._queue.tokens} tokens; adding {request.num_tokens} would exceed "
                f"max_queued_tokens={self.config.max_queued_tokens}",
            )

    def has_room_for(self, num_tokens: int) -> bool:
        """Whether the queue bound admits `num_tokens` more now (a router's question)."""
        return self._queue.tokens + num_tokens <= self.config.max_queued_tokens

    def _expire(self, pending: Pending, timeout: float) -> None:
        if self._queue.remove(pending):
            reason = self._waiting_reason(pending.request)
            self._fail(pending, DeadlineExceeded(f"request waited {timeout:.3g} s without being served ({reason})"))

    def _waiting_reason(self, request: LogProbRequest) -> str:
        if self.weights.incomplete_reason:
            return f"weights incomplete: {self.weights.incomplete_reason}"
        if self.weights.updating:
            return "weight update in progress"
        if self._paused_since is not None:
            return "serving paused"
        if request.min_weight_version is not None and request.min_weight_version > self.weights.version:
            return f"waiting for weight version {request.min_weight_version}, server has {self.weights.version}"
        return "queue backlog"

    def _fail(self, pending: Pending, error: ModelEngineError) -> None:
        if not pending.future.done():
            pending.future.set_exception(error)
            self.counters["failed"] += 1
            try:  # a metrics hook that raises must not keep the next caller from its answer
                self.observer.request_failed(error)
            except Exception:
                logger.exception("the request_failed metrics hook raised; ignored")

    # ---------------------------------------------------------------- dispatch
    def _ensure_started(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name="dispatch")

    async def start(self) -> None:
        self._ensure_started()

    def _can_dispatch(self) -> bool:
        return (
            self._paused_since is None
            and self.weights.servable
            and self._inflight < self.config.max_inflight_batches
        )

    def _select_batch(self) -> tuple[list[Pending], float | None]:
        """The next batch to launch now, or none and how long to wait for it to fill."""
        if not self._can_dispatch():
            return [], None
        version = self.weights.version
        return form_batch(self._queue.eligible(version), self._batch_limits, version, time.monotonic(), not self._accepting)

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                batch, wait_s = self._select_batch()
                if batch:
                    self._launch(batch)
                    continue
            except Exception as error:  # a bug here must not strand the queue until its deadlines
                self._fail_queue_after(error)
                continue
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` returns normally when
            # it is cancelled in the same loop iteration its inner wait completes, and the
            # cancellation is lost (the intermittent shutdown hang of issue 7).
            try:
                async with asyncio.timeout(wait_s):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _fail_queue_after(self, error: Exception) -> None:
        """The dispatch step raised: fail what it was deciding about (every queued request) with
        the reason, and go on serving what arrives next."""
        logger.exception("the dispatch loop raised; failing the %d queued requests", len(self._queue))
        reason = WorkerFailed(f"the scheduler could not dispatch this request: {type(error).__name__}: {error}")
        for pending in self._queue.take_all():
            self._fail(pending, reason)

    def _launch(self, batch: list[Pending]) -> None:
        # the task first: if it cannot be made, the batch is still queued and nothing is counted
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, self.weights.version))
        for pending in batch:
            self._queue.remove(pending)
        self._inflight += 1
        self._inflight_tokens += sum(p.tokens for p in batch)
        self._idle.clear()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[Pending], version: int) -> None:
        started = time.monotonic()
        outcomes: Sequence[Any] = []
        try:
            outcomes = await self.executor.execute([p.request for p in batch])
            if len(outcomes) != len(batch):
                raise WorkerFailed(f"executor returned {len(outcomes)} outcomes for {len(batch)} requests")
        except Exception as error:  # the whole batch failed: every request gets the reason
            reason = error if isinstance(error, ModelEngineError) else WorkerFailed(f"{type(error).__name__}: {error}")
            logger.warning("batch of %d requests failed: %s", len(batch), reason)
            outcomes = [reason] * len(batch)
        except BaseException:  # cancelled (shutdown): the callers still get an answer
            outcomes = [ServerShuttingDown("the server shut down while this request was computing")] * len(batch)
            raise
        finally:
            self._finish_batch(batch, outcomes, version, started)

    def _finish_batch(self, batch: list[Pending], outcomes: Sequence[Any], version: int, started: float) -> None:
        """Resolve every request of the batch and release its slot, whatever went wrong, so no
        caller waits forever and drains (pause, weight update) can complete."""
        finished = time.monotonic()
        tokens = sum(p.tokens for p in batch)
        try:
            for pending, outcome in zip(batch, outcomes):
                try:
                    self._resolve(pending, outcome, version, started, finished)
                except Exception as error:  # an observer or a malformed output: this request fails alone
                    logger.exception("could not deliver a result")
                    self._fail(pending, WorkerFailed(f"delivering the result failed: {type(error).__name__}: {error}"))
            self.counters["batches"] += 1
            self.observer.batch_done(len(batch), tokens, finished - started)
        finally:
            self._inflight -= 1
            self._inflight_tokens -= tokens
            if self._inflight == 0:
                self._idle.set()
            self._wakeup.set()

    def _resolve(self, pending: Pending, outcome: Any, version: int, started: float, finished: float) -> None:
        if isinstance(outcome, ModelEngineError):
            self._fail(pending, outcome)
            return
        if pending.future.done():
            return
        assert isinstance(outcome, ScoreOutput)
        timings = {
            "queue_ms": (started - pending.enqueued_at) * 1000,
            "compute_ms": (finished - started) * 1000,
            "total_ms": (finished - pending.enqueued_at) * 1000,
        }
        result = outcome.tagged(pending.request.request_id, version, timings)
        pending.future.set_result(result)
        self.counters["requests"] += 1
        self.counters["tokens"] += pending.tokens
        self.observer.request_done(result, pending.tokens)

    async def _drain(self) -> None:
        await self._idle.wait()

    def _wakeup_soon(self) -> None:
        self._wakeup.set()

    # ---------------------------------------------------------------- pause / weights
    async def pause_serving(self) -> None:
        """Stop dispatching; return once every in-flight batch has finished."""
        if self._paused_since is None:
            self._paused_since = time.monotonic()
        await self._drain()

    async def resume_serving(self) -> None:
        if self._paused_since is not None:
            self._paused_total_s += time.monotonic() - self._paused_since
            self._paused_since = None
        self._wakeup.set()

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    @property
    def weight_version(self) -> int:
        return self.weights.version

    # The weight session (see `weight_updates.py`): the server, not the client, decides when a
    # version is complete.
    async def begin_weight_update(self, version: int) -> int:
        """Open the update to `version`: block dispatch and drain, independently of pause/resume
        (an admin resume cannot let a batch run on half-loaded weights). Returns the number of
        processes that receive each transport stream."""
        return await self.updates.begin(version)

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> list[str]:
        """Load tensors into the open update (refused when none is open)."""
        return await self.updates.load(named_tensors, version)

    async def deliver(self, load: Callable[[], Awaitable[list[str]]], version: int | None = None) -> list[str]:
        """Run a load every participant takes (e.g. a bucket already in a shared store) in the open update."""
        return await self.updates.deliver(load, version)

    async def receive_weights(self, spec: "TransportSpec", version: int, first_rank: int | None = None) -> list["ReceiveReport"]:
        """Every engine process joins one transport stream (`checkpoint_transport`) into the open
        update; one report per process. `first_rank`: this server's first rank when it is one part
        of a larger receiving group (a replica behind a manager)."""
        return await self.updates.receive(spec, version, first_rank)

    async def weight_layout(self) -> tuple[ModelInfo, dict[str, WeightSpec]]:
        return self.executor.model_info(), await self.executor.weight_specs()

    def weight_update_refusal(self, version: int) -> str | None:
        """Why `version` could not be committed now (what is missing where); None if it could."""
        return self.updates.state.current(version).refusal()

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` if every participant holds every tensor; else abort and raise."""
        await self.updates.commit(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        """Close the update (of `version`, when given): weights partly delivered are marked
        incomplete (nothing serves until a complete sync); untouched ones serve on."""
        await self.updates.abort(reason, version)

    def mark_weights_incomplete(self, reason: str) -> None:
        self.updates.mark_incomplete(reason)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Drain, load through the executor, then commit `version` (or mark weights incomplete)."""
        return await self.updates.update(named_tensors, version)

    # ---------------------------------------------------------------- status / shutdown
    def status(self) -> dict[str, Any]:
        paused_s = self._paused_total_s + (time.monotonic() - self._paused_since if self._paused_since else 0.0)
        return {
            "weight_version": self.weights.version,
            "paused": self.paused,
            "updating_weights": self.weights.updating,
            "weights_incomplete": self.weights.incomplete_reason,
            "queue_depth": len(self._queue),
            "queued_tokens": self._queue.tokens,
            "inflight_batches": self._inflight,
            "outstanding_tokens": self._queue.tokens + self._inflight_tokens,
            "paused_seconds_total": paused_s,
            "accepting": self._accepting,
            **{f"{name}_total": value for name, value in self.counters.items()},
        }

    async def get_status(self) -> dict[str, Any]:
        return self.status()

    def _queue_can_drain(self) -> bool:
        """Whether a queued request can still be served with no one else's call: none can while
        serving is paused or the weights are in an update or incomplete, nor one waiting for a
        version the server does not have (a shutdown fails those at once, not at its deadline)."""
        if self._paused_since is not None or not self.weights.servable:
            return False
        version = self.weights.version
        return any(p.request.min_weight_version is None or p.request.min_weight_version <= version for p in self._queue)

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; finish what was accepted (when `drain`), fail what cannot finish."""
        self._accepting = False
        self._wakeup.set()
        deadline = time.monotonic() + timeout_s  # one deadline for the drain and the running batches
        if drain:
            while (self._inflight or self._queue_can_drain()) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        for pending in self._queue.take_all():
            self._fail(pending, ServerShuttingDown("the server shut down before this request was served"))
        if self._tasks:
            _, still_running = await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
            for task in still_running:  # `_run_batch` answers their callers `ServerShuttingDown`
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
        if self._loop_task:
            # The loop leaves by itself on `_stopping`; a cancel is only the backstop.
            self._stopping = True
            self._wakeup.set()
            done, _ = await asyncio.wait({self._loop_task}, timeout=5.0)
            if not done:
                self._loop_task.cancel()
                await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await self.executor.close()
