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
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import ray
import torch

from checkpoint_transport.spec import ReceiveReport, TransportSpec
from checkpoint_transport.targets import failure_reason
from model_engine_server.errors import ModelEngineError, ServerShuttingDown, WeightSyncError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import gather_outcomes
from replica.config import ReplicaConfig
from replica.executor import iter_buckets
from replica.replica import ModelEngineReplica

logger = logging.getLogger(__name__)

_RETRYABLE = (WorkerFailed, ServerShuttingDown)


@dataclass(eq=False)
class _OpenUpdate:
    """The manager's view of one update: which replicas take part and how many receive on each."""

    version: int
    participants: list[ModelEngineReplica] = field(default_factory=list)
    receivers: list[int] = field(default_factory=list)  # per participant, from its begin
    ready: bool = False  # every participant began (drained)
    holds_lock: bool = False
    deadline: asyncio.TimerHandle | None = None

    def drop(self, replica: ModelEngineReplica) -> None:
        """A participant that died leaves the update (it restarts and copies from a peer)."""
        index = self.participants.index(replica)
        del self.participants[index]
        if self.receivers:
            del self.receivers[index]


class ReplicaManager:
    """`num_replicas` independent replicas, routed by least outstanding tokens."""

    def __init__(self, config: ReplicaConfig, observer: SchedulerObserver | None = None) -> None:
        self.config = config
        self.replicas = [ModelEngineReplica(config, index, observer) for index in range(config.num_replicas)]
        self.weight_version = config.initial_weight_version
        self.outstanding_tokens = [0] * config.num_replicas
        self.routed_requests = [0] * config.num_replicas
        self.retried_requests = 0
        self.paused = False
        self._joining: set[int] = set()  # restarted, weights not yet at the current version
        self._update: _OpenUpdate | None = None
        self._weights_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._restarting: dict[int, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

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
            async with self._weights_lock:  # no update runs while weights are copied
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
                except BaseException:  # never route to a replica holding another version's weights
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

    def _pick(self, exclude: set[int]) -> ModelEngineReplica | None:
        candidates = [r for r in self.replicas if self._routable(r) and r.index not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (self.outstanding_tokens[r.index], r.index))

    def _no_replica_error(self) -> WorkerFailed:
        reasons = "; ".join(f"{r.name}: {r.failure or ('joining' if r.index in self._joining else 'not started')}"
                            for r in self.replicas)
        return WorkerFailed(f"no live replica to serve the request ({reasons})")

    async def submit(self, request: LogProbRequest | dict[str, Any], timeout_s: float | None = None) -> LogProbResult:
        """Route one request; raises its typed error. Retried once elsewhere if its replica died."""
        request = LogProbRequest.parse(request)
        attempts = 2 if self.config.retry_on_worker_failure else 1
        tried: set[int] = set()
        last_error: ModelEngineError | None = None
        for _ in range(attempts):
            replica = self._pick(tried)
            if replica is None:
                raise last_error or self._no_replica_error()
            tried.add(replica.index)
            self.outstanding_tokens[replica.index] += request.num_tokens
            self.routed_requests[replica.index] += 1
            try:
                return await replica.submit(request, timeout_s)
            except _RETRYABLE as error:
                if replica.alive:  # the replica is fine: this failure belongs to the request
                    raise
                last_error = error if isinstance(error, WorkerFailed) else WorkerFailed(
                    f"request lost with {replica.name}: {replica.failure}"
                )
                self.retried_requests += 1
                logger.info("request %s lost with %s; retrying elsewhere", request.request_id, replica.name)
            finally:
                self.outstanding_tokens[replica.index] -= request.num_tokens
        assert last_error is not None
        raise last_error

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

    # ------------------------------------------------------------------ weights
    # One update at a time across every replica. Each replica's scheduler owns its own session
    # (its workers, every expected name); the manager commits only when all of them are complete.
    async def begin_weight_update(self, version: int) -> int:
        """Drain every live replica for `version`; returns how many workers receive each stream.
        A second begin while one is open is refused at once. Holds the manager's weight lock
        until commit or abort (a restart's weight copy waits for it)."""
        if self._update is not None:
            raise WeightSyncError(
                f"a weight update to version {self._update.version} is already in progress; commit or abort it first"
            )
        update = self._update = _OpenUpdate(version)
        try:
            await self._weights_lock.acquire()  # waits only for a restart's weight copy
        except BaseException:
            self._update = None
            raise
        update.holds_lock = True
        if self._update is not update:  # aborted while waiting for the lock
            self._weights_lock.release()
            raise WeightSyncError(f"the weight update to version {version} was aborted while it began")
        participants = [r for r in self.replicas if self._routable(r)]
        problem = (
            WeightSyncError(f"new weight version must be greater than the current {self.weight_version}, got {version}")
            if version <= self.weight_version else None if participants else self._no_replica_error()
        )
        if problem is not None:
            self._finish_update(update)
            raise problem
        update.participants = participants
        self._arm_update_deadline(update)
        try:
            outcomes = await asyncio.gather(*(r.begin_weight_update(version) for r in participants), return_exceptions=True)
        except BaseException:  # the caller gave up while replicas drained: do not keep them drained
            await asyncio.shield(self.abort_weight_update(f"begin of version {version} was interrupted"))
            raise
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors or self._update is not update:
            await self.abort_weight_update(f"begin failed: {errors[0] if errors else 'aborted meanwhile'}")
            raise errors[0] if errors else WeightSyncError(f"the weight update to version {version} was aborted while it began")
        update.receivers = [int(count) for count in outcomes]
        update.ready = True
        return sum(update.receivers)

    def _arm_update_deadline(self, update: "_OpenUpdate") -> None:
        """A publisher that vanishes after begin must not hold the weight lock forever (every later
        update refused, restarts blocked): past `weight_update_timeout_s` the update is aborted."""
        timeout_s = self.config.scheduler.weight_update_timeout_s
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if self._update is update:
                reason = f"weight update to version {update.version} not committed within weight_update_timeout_s={timeout_s:g}"
                logger.warning("%s; aborting it", reason)
                task = loop.create_task(self.abort_weight_update(reason))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        update.deadline = loop.call_later(timeout_s, expire)

    def _open_update(self, version: int | None = None) -> "_OpenUpdate":
        update = self._update
        if update is None or not update.ready:
            raise WeightSyncError("no weight update is open: begin one (with its version) before sending weights")
        if version is not None and version != update.version:
            raise WeightSyncError(f"the weight update in progress is to version {update.version}, not {version}")
        return update

    async def load_weight_bucket(self, bucket: "ray.ObjectRef | list[tuple[str, torch.Tensor]]", version: int | None = None) -> list[str]:
        """Put one bucket in Ray's store once and load it into every participating replica. A
        replica that dies meanwhile drops out of the update (it restarts from a peer later)."""
        update = self._open_update(version)
        ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
        participants = list(update.participants)
        outcomes = await asyncio.gather(*(r.load_weight_bucket(ref, version) for r in participants), return_exceptions=True)
        names: list[str] = []
        for replica, outcome in zip(participants, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, WorkerFailed) and not replica.alive:
                    logger.warning("%s died during a weight update; it leaves the update", replica.name)
                    update.drop(replica)
                    continue
                raise outcome
            names = outcome
        if not update.participants:
            raise self._no_replica_error()
        return names

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        """Stream one sync (`checkpoint_transport`) into every participating worker, as sized at
        begin; a participant lost since begin, or a failed receive, aborts the update."""
        update = self._open_update(version)
        if spec.world_size - 1 != sum(update.receivers):
            raise WeightSyncError(
                f"the stream is sized for {spec.world_size - 1} receivers, but {sum(update.receivers)} take part in "
                f"the update to version {version} (use the count begin_weight_update returned)"
            )
        dead = [r.name for r in update.participants if not r.alive]
        if dead:  # its workers would never join the broadcast group: fail now, not at the timeout
            reason = f"{', '.join(dead)} died after the update to version {version} began; begin it again"
            await self.abort_weight_update(reason)
            raise WeightSyncError(reason)
        firsts = list(itertools.accumulate([1, *update.receivers[:-1]]))
        outcomes = await asyncio.gather(
            *(r.receive_weights(spec, version, first) for r, first in zip(update.participants, firsts)), return_exceptions=True
        )
        reports: list[ReceiveReport] = []
        for replica, first, count, outcome in zip(update.participants, firsts, update.receivers, outcomes):
            if isinstance(outcome, BaseException):
                reports += [ReceiveReport(rank=first + i, version=version, error=f"{replica.name}: {outcome}") for i in range(count)]
            else:
                reports += outcome
        reason = failure_reason(reports)
        if reason is not None:
            await self.abort_weight_update(f"sync to version {version} failed: {reason}")
        return reports

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` on every participant, only if every worker of each holds every
        tensor; otherwise abort everywhere and raise the reason naming what is missing where."""
        update = self._open_update(version)
        live = [r for r in update.participants if r.alive]
        try:
            if not live:
                raise self._no_replica_error()
            refusals = [refusal for refusal in (r.weight_update_refusal(version) for r in live) if refusal]
            if refusals:
                raise WeightSyncError("; ".join(refusals))
            await asyncio.gather(*(r.commit_weight_update(version) for r in live))
        except BaseException as error:
            await asyncio.shield(self.abort_weight_update(str(error) or type(error).__name__))
            raise
        self.weight_version = version
        self._finish_update(update)

    async def abort_weight_update(self, reason: str) -> None:
        """Close the open update on every participant: weights partly delivered refuse to score
        until a complete sync lands (never mixed weights); untouched ones serve on."""
        update = self._update
        if update is None:
            return
        await asyncio.gather(*(r.abort_weight_update(reason) for r in update.participants), return_exceptions=True)
        self._finish_update(update)

    def _finish_update(self, update: "_OpenUpdate") -> None:
        if update.deadline is not None:
            update.deadline.cancel()
        if self._update is update:
            self._update = None
        if update.holds_lock:
            update.holds_lock = False
            self._weights_lock.release()

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> buckets (each put in Ray's store once for all replicas) -> commit; atomic."""
        await self.begin_weight_update(version)
        try:
            for bucket in iter_buckets(named_tensors, self.config.weight_bucket_mb << 20):
                await self.load_weight_bucket(bucket, version)
        except BaseException as error:
            await asyncio.shield(self.abort_weight_update(f"{type(error).__name__}: {error}"))
            if isinstance(error, ModelEngineError) or not isinstance(error, Exception):
                raise
            raise WeightSyncError(f"{type(error).__name__}: {error}") from error
        await self.commit_weight_update(version)
        return version

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
            "updating_weights": self._update is not None,
            "num_replicas": len(self.replicas),
            "live_replicas": sum(1 for r in self.replicas if self._routable(r)),
            "queue_depth": sum(e.get("queue_depth", 0) for e in replicas),
            "outstanding_tokens": sum(e.get("outstanding_tokens", 0) for e in replicas),
            "retried_requests": self.retried_requests,
            "replicas": replicas,
        }

    async def get_status(self) -> dict[str, Any]:
        return self.status()
