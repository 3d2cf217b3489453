"""`ReplicaManager`: several replicas behind one `LogProbService`.

Routing: each request goes to the live replica with the fewest outstanding tokens (routed by
this manager and not yet answered); ties go to the lowest index. Pause/resume and weight updates
fan out to every live replica; a weight version is committed on all of them or on none.

Failures: when a replica dies (a worker died or hung), requests of its lost batches and of its
queue come back as `WorkerFailed`; each is retried once on another live replica
(`retry_on_worker_failure`), else returned with that reason. A dead replica gets no new
requests until `restart_replica(i)` brings it back on a fresh placement group, with the
current weights copied from a live peer before it is routed to again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Sequence

import ray
import torch

from checkpoint_transport.spec import ReceiveReport, TransportSpec
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import DeadlineExceeded, ModelEngineError, ServerShuttingDown, WorkerFailed
from model_engine_server.packing import prompt_key
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.request_queue import wait_limit_s
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import gather_outcomes
from replica.config import ReplicaConfig
from replica.manager_weights import ManagerWeightUpdates
from replica.replica import ModelEngineReplica
from replica.routing import PromptAffinity, pick_replica
from replica.worker_driven import WorkerDrivenUpdates

logger = logging.getLogger(__name__)

_RETRYABLE = (WorkerFailed, ServerShuttingDown)


class ReplicaManager:
    """`num_replicas` independent replicas, routed by least outstanding tokens."""

    def __init__(self, config: ReplicaConfig, observer: SchedulerObserver | None = None) -> None:
        self.config = config
        self.observer = observer
        self.replicas = [ModelEngineReplica(config, index, observer) for index in range(config.num_replicas)]
        self.updates = ManagerWeightUpdates(
            self.replicas, self._routable, self._no_replica_error, config.initial_weight_version,
            config.scheduler.weight_update_timeout_s, config.weight_bucket_mb << 20,
        )
        self.worker_driven = WorkerDrivenUpdates(self.updates, self.replicas, self._routable, self)
        self.outstanding_tokens = [0] * config.num_replicas
        self.affinity = PromptAffinity()
        self.routed_requests = [0] * config.num_replicas
        self.retried_requests = 0
        self.paused = False
        self._closing = False  # set by shutdown: new requests are refused as shutting_down
        self._joining: set[int] = set()  # restarted, weights not yet at the current version
        self._monitor: asyncio.Task[None] | None = None
        self._restarting: dict[int, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout_s: float | None = None) -> "ReplicaManager":
        """Start every replica at once; if one cannot start, stop them all and raise its error."""
        outcomes = await asyncio.gather(*(r.start(timeout_s) for r in self.replicas), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            await asyncio.gather(*(r.shutdown(drain=False, timeout_s=5.0) for r in self.replicas), return_exceptions=True)
            raise errors[0]
        if self.config.health_check_interval_s is not None and self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_health(self.config.health_check_interval_s))
        return self

    async def _monitor_health(self, interval_s: float) -> None:
        """Find workers that died while idle, so no request is routed to them first; with
        `auto_restart`, bring dead replicas back (at most `max_restarts` times each)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.health()
                await self.worker_driven.settle_after_losses()
                if self.config.auto_restart:
                    await self._restart_dead_replicas()
            except Exception as error:  # noqa: BLE001 - monitoring must never stop serving
                logger.warning("health check failed: %s", error)

    async def _restart_dead_replicas(self) -> None:
        # not alive after having started once: a worker died, or an earlier restart failed
        dead = [r for r in self.replicas if not r.alive and r.started_at is not None and r.index not in self._restarting]
        for replica in dead:
            if replica.restarts >= self.config.max_restarts:
                continue
            logger.warning("%s is dead (%s); restarting it (restart %d of at most %d)",
                           replica.name, replica.failure, replica.restarts + 1, self.config.max_restarts)
            try:
                await self.restart_replica(replica.index)
            except Exception as error:  # noqa: BLE001 - the next round tries again
                logger.warning("%s: automatic restart failed: %s", replica.name, error)

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        self._closing = True  # from here a lost request is the shutdown's, not a dead replica's
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        restarts = list(self._restarting.values())  # a restart must not outlive shutdown (it would
        for task in restarts:                       # place workers after their replica was shut down)
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        await asyncio.gather(*(r.shutdown(drain, timeout_s) for r in self.replicas), return_exceptions=True)

    async def health(self) -> list[dict[str, Any]]:
        """Ping every worker of every replica; dead ones stop being routed to."""
        return list(await asyncio.gather(*(r.health() for r in self.replicas)))

    async def restart_replica(self, index: int, timeout_s: float | None = None) -> None:
        """Bring replica `index` back on a fresh placement group, copy the current weights from a
        live peer when the model path is older, re-apply a pause, then route to it again. With no
        peer at the current version, it serves nothing (weights incomplete) until the next sync."""
        running = self._restarting.get(index)
        if running is not None:  # the monitor (or another caller) is at it already: wait for that one
            await asyncio.shield(running)
            return
        task = asyncio.get_running_loop().create_task(self._restart(index, timeout_s))
        self._restarting[index] = task
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._restarting.pop(index, None)
            else:  # the caller was cancelled; the restart goes on and cleans up after itself
                task.add_done_callback(lambda _: self._restarting.pop(index, None))

    async def _restart(self, index: int, timeout_s: float | None) -> None:
        replica = self.replicas[index]
        self._joining.add(index)
        try:
            try:
                await replica.restart(timeout_s)
            except Exception as error:
                replica.failure = replica.failure or f"restart failed: {type(error).__name__}: {error}"
                raise
            async with self.updates.lock:  # no update runs while weights are copied
                try:
                    if replica.weight_version != self.weight_version:
                        peer = self._peer_at_current_version(exclude=index)
                        if peer is None:  # every replica was lost: wait for the trainer's next sync
                            reason = (f"restarted from the model path (version {replica.weight_version}); no live "
                                      f"replica holds version {self.weight_version}: waiting for the next weight sync")
                            logger.warning("%s: %s", replica.name, reason)
                            replica.mark_weights_incomplete(reason)
                        else:
                            await replica.copy_weights_from(peer, self.weight_version)
                    if self.paused:
                        await replica.pause_serving()
                except BaseException as error:  # never route to a replica holding another version's weights
                    replica.failure = replica.failure or f"restart: taking the current weights failed: {error!r}"
                    await replica.shutdown(drain=False, timeout_s=5.0)
                    raise
        finally:
            self._joining.discard(index)

    def _peer_at_current_version(self, exclude: int) -> ModelEngineReplica | None:
        for replica in self.replicas:
            if replica.index != exclude and self._routable(replica) and replica.weight_version == self.weight_version:
                if not replica.status().get("weights_incomplete"):
                    return replica
        return None

    # ------------------------------------------------------------------ routing
    def _routable(self, replica: ModelEngineReplica) -> bool:
        return replica.alive and replica.index not in self._joining

    def _pick(self, exclude: set[int], request: LogProbRequest) -> ModelEngineReplica | None:
        """Least outstanding tokens, but a sample goes where its prompt went while that replica
        is within one batch of the least busy (`routing.py`). Replicas that would refuse or hold
        it (weights incomplete, queue full) are passed over while another can take it."""
        candidates = {r.index: r for r in self.replicas if self._routable(r) and r.index not in exclude}
        if not candidates:
            return None
        ready = {index: r for index, r in candidates.items() if r.can_take(request.num_tokens)}
        candidates = ready or candidates  # none ready: the least busy answers why (or serves after the sync)
        shares = any(r.shares_prompts for r in candidates.values())
        key = prompt_key(request.input_ids, request.response_start) if shares else None
        index = pick_replica(
            {index: self.outstanding_tokens[index] for index in candidates},
            self.affinity.preferred(key) if shares else None,
            self.config.scheduler.max_tokens_per_batch,
        )
        if shares:
            self.affinity.record(key, index)
        return candidates[index]

    def _no_replica_error(self) -> WorkerFailed:
        reasons = "; ".join(f"{r.name}: {r.failure or ('joining' if r.index in self._joining else 'not started')}"
                            for r in self.replicas)
        return WorkerFailed(f"no live replica to serve the request ({reasons})")

    async def submit(self, request: LogProbRequest | dict[str, Any], timeout_s: float | None = None) -> LogProbResult:
        """Route one request; raises its typed error. Retried once elsewhere if its replica died."""
        request = LogProbRequest.parse(request)
        if self._closing:
            raise ServerShuttingDown("the server is shutting down and accepts no new requests")
        attempts = 2 if self.config.retry_on_worker_failure else 1
        budget_s = wait_limit_s(timeout_s, self.config.scheduler.request_timeout_s)
        deadline = asyncio.get_running_loop().time() + budget_s  # one deadline across attempts
        tried: set[int] = set()
        last_error: ModelEngineError | None = None
        for _ in range(attempts):
            replica = self._pick(tried, request)
            remaining_s = deadline - asyncio.get_running_loop().time()
            if replica is not None and last_error is not None and remaining_s <= 0:
                last_error = DeadlineExceeded(f"request not served within {budget_s:g} s: {last_error}")
                replica = None
            if replica is None:
                if last_error is not None:
                    self._failed_after_loss(last_error)
                raise last_error or self._no_replica_error()
            tried.add(replica.index)
            self.outstanding_tokens[replica.index] += request.num_tokens
            self.routed_requests[replica.index] += 1
            try:
                return await replica.submit(request, remaining_s if last_error is not None else timeout_s)
            except _RETRYABLE as error:
                if replica.alive or self._closing:  # the request's own failure, or the shutdown's answer
                    raise
                last_error = error if isinstance(error, WorkerFailed) else WorkerFailed(
                    f"request lost with {replica.name}: {replica.failure}"
                )
                self.retried_requests += 1
                logger.info("request %s lost with %s; retrying elsewhere", request.request_id, replica.name)
            finally:
                self.outstanding_tokens[replica.index] -= request.num_tokens
        assert last_error is not None
        self._failed_after_loss(last_error)
        raise last_error

    def _failed_after_loss(self, error: ModelEngineError) -> None:
        """The replica counted the lost attempt as `lost`; the request's own failure is counted here."""
        if self.observer is not None:
            self.observer.request_failed(error)

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[LogProbResult | ModelEngineError]:
        """One entry per request, in order: its result or its own typed error."""
        return await gather_outcomes(self.submit(r, timeout_s) for r in requests)

    # ------------------------------------------------------------------ pause / resume
    def _live(self) -> list[ModelEngineReplica]:
        return [r for r in self.replicas if r.alive]

    async def pause_serving(self) -> None:
        self.paused = True
        await asyncio.gather(*(r.pause_serving() for r in self._live()))

    async def resume_serving(self) -> None:
        self.paused = False
        await asyncio.gather(*(r.resume_serving() for r in self._live()))

    # ------------------------------------------------------------------ weights (`manager_weights.py`)
    @property
    def weight_version(self) -> int:
        return self.updates.version

    async def begin_weight_update(self, version: int) -> int:
        return await self.updates.begin(version)

    async def load_weights(self, bucket: "ray.ObjectRef | Iterable[tuple[str, torch.Tensor]]", version: int | None = None) -> list[str]:
        return await self.updates.load(bucket, version)

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        return await self.updates.receive(spec, version)

    async def commit_weight_update(self, version: int) -> None:
        await self.updates.commit(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.updates.abort(reason, version)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        return await self.updates.update(named_tensors, version)

    async def hold_for_worker_update(self) -> None:
        """verl's `abort_all_requests`: pause for its sync (`worker_driven.py`)."""
        await self.worker_driven.hold()

    async def release_after_worker_update(self) -> None:
        """verl's `resume_generation`: resume, if the sync's hold paused serving."""
        await self.worker_driven.release()

    async def join_worker_update(self, version: int, replica_index: int, rank: int) -> bool:
        """A worker handed a stream by verl's checkpoint engine waits for the update to open
        (`worker_driven.py`); False: `version` is already served, it loads nothing."""
        return await self.worker_driven.join(version, replica_index, rank)

    async def report_worker_update(self, version: int, replica_index: int, rank: int, report: ReceiveReport) -> None:
        """What that worker loaded; returns once the update committed, else raises why not."""
        await self.worker_driven.report(version, replica_index, rank, report)

    async def weight_layout(self) -> tuple[ModelInfo, dict[str, WeightSpec]]:
        """What every replica serves (they are copies): a live replica's layout."""
        for replica in self.replicas:
            if self._routable(replica):
                return await replica.weight_layout()
        raise WorkerFailed("cannot describe the served weights: no live replica")

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Totals plus one entry per replica (alive, paused, weight version, queue, tokens)."""
        replicas = []
        for replica in self.replicas:
            entry = replica.status()
            entry["routed_requests"] = self.routed_requests[replica.index]
            entry["routed_outstanding_tokens"] = self.outstanding_tokens[replica.index]
            entry["joining"] = replica.index in self._joining
            replicas.append(entry)
        routable = [e for r, e in zip(self.replicas, replicas) if self._routable(r)]
        incomplete = [f"{e['name']}: {e['weights_incomplete']}" for e in routable if e.get("weights_incomplete")]
        return {
            "weight_version": self.weight_version,
            "paused": self.paused,
            "accepting": any(e.get("accepting", False) for e in routable),
            "weights_incomplete": "; ".join(incomplete) or None,
            "updating_weights": self.updates.in_progress,
            "num_replicas": len(self.replicas),
            "live_replicas": sum(1 for r in self.replicas if self._routable(r)),
            "queue_depth": sum(e.get("queue_depth", 0) for e in replicas),
            "outstanding_tokens": sum(e.get("outstanding_tokens", 0) for e in replicas),
            "retried_requests": self.retried_requests,
            "replicas": replicas,
        }

    async def get_status(self) -> dict[str, Any]:
        return self.status()
