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

from model_engine_server.errors import ModelEngineError, ServerShuttingDown, WeightSyncError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import gather_outcomes
from replica.config import ReplicaConfig
from replica.executor import iter_buckets
from replica.replica import ModelEngineReplica

logger = logging.getLogger(__name__)

_RETRYABLE = (WorkerFailed, ServerShuttingDown)


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
        self._update_participants: list[ModelEngineReplica] | None = None
        self._weights_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        self._restarting: dict[int, asyncio.Task[None]] = {}
        self._update_deadline: asyncio.TimerHandle | None = None
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
                            await replica.abort_weight_update(reason)
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
    async def begin_weight_update(self, version: int) -> None:
        """Drain every live replica for `version`; buckets follow, then commit or abort. Holds
        the manager's weight lock until then (a restart's weight copy waits for it)."""
        if self._update_participants is not None:
            raise WeightSyncError("a weight update is already in progress; commit or abort it first")
        await self._weights_lock.acquire()  # waits only for a restart's weight copy
        if version <= self.weight_version:
            self._weights_lock.release()
            raise WeightSyncError(f"new weight version must be greater than the current {self.weight_version}, got {version}")
        participants = [r for r in self.replicas if self._routable(r)]
        if not participants:
            self._weights_lock.release()
            raise self._no_replica_error()
        self._update_participants = participants
        self._arm_update_deadline(version)
        try:
            outcomes = await asyncio.gather(*(r.begin_weight_update(version) for r in participants), return_exceptions=True)
        except BaseException:  # the caller gave up while replicas drained: do not keep them drained
            await asyncio.shield(self.abort_weight_update(f"begin of version {version} was interrupted"))
            raise
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            await self.abort_weight_update(f"begin failed: {errors[0]}")
            raise errors[0]

    def _arm_update_deadline(self, version: int) -> None:
        """A publisher that vanishes after begin must not hold the weight lock forever (every later
        update refused, restarts blocked): past `weight_update_timeout_s` the update is aborted."""
        timeout_s = self.config.scheduler.weight_update_timeout_s
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if self._update_participants is not None:  # (`_finish_update` cancels this timer)
                reason = f"weight update to version {version} not committed within weight_update_timeout_s={timeout_s:g}"
                logger.warning("%s; aborting it", reason)
                task = loop.create_task(self.abort_weight_update(reason))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        self._update_deadline = loop.call_later(timeout_s, expire)

    def _participants(self) -> list[ModelEngineReplica]:
        if self._update_participants is None:
            raise WeightSyncError("no weight update in progress (call begin_weight_update first)")
        return self._update_participants

    async def load_weight_bucket(self, bucket: "ray.ObjectRef | list[tuple[str, torch.Tensor]]") -> list[str]:
        """Put one bucket in Ray's store once and load it into every participating replica. A
        replica that dies meanwhile drops out of the update (it restarts from a peer later)."""
        participants = self._participants()
        ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
        outcomes = await asyncio.gather(*(r.load_weight_bucket(ref) for r in participants), return_exceptions=True)
        names: list[str] = []
        survivors = []
        for replica, outcome in zip(participants, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, WorkerFailed) and not replica.alive:
                    logger.warning("%s died during a weight update; it leaves the update", replica.name)
                    continue
                raise outcome
            survivors.append(replica)
            names = outcome
        if not survivors:
            raise self._no_replica_error()
        self._update_participants = survivors
        return names

    async def commit_weight_update(self, version: int, require_complete: bool | None = None) -> None:
        """Check every participant got every tensor, then serve `version` on all of them; with
        any tensor missing anywhere, abort everywhere and raise. `require_complete=None` checks
        when buckets came through `load_weight_bucket`; a transport's receivers verify their own."""
        participants = self._participants()
        if require_complete is None:
            require_complete = any(r.loaded_through_buckets for r in participants)
        try:
            if require_complete:
                missing = await asyncio.gather(*(r.missing_weights() for r in participants))
                incomplete = [(r.name, m) for r, m in zip(participants, missing) if m]
                if incomplete:
                    name, names = incomplete[0]
                    raise WeightSyncError(
                        f"sync for version {version} is missing {len(names)} tensors on {name}, e.g. {names[:3]}"
                    )
            await asyncio.gather(*(r.commit_weight_update(version, require_complete=False) for r in participants))
        except BaseException as error:
            await self.abort_weight_update(str(error))
            raise
        self.weight_version = version
        self._finish_update()

    async def abort_weight_update(self, reason: str) -> None:
        """Every participant refuses to score until a complete sync lands (never mixed weights)."""
        participants = self._update_participants or []
        await asyncio.gather(*(r.abort_weight_update(reason) for r in participants), return_exceptions=True)
        self._finish_update()

    def _finish_update(self) -> None:
        if self._update_deadline is not None:
            self._update_deadline.cancel()
            self._update_deadline = None
        if self._update_participants is not None:
            self._update_participants = None
            self._weights_lock.release()

    # ------------------------------------------------------------------ checkpoint transport target
    def _receivers(self, replicas: Sequence[ModelEngineReplica]) -> list[Any]:
        return [worker for replica in replicas for worker in replica.workers]

    async def receiver_count(self) -> int:
        """Workers that receive a transport stream: every worker of every routable replica."""
        return len(self._receivers([r for r in self.replicas if self._routable(r)]))

    async def receive_weights(self, spec: Any, version: int) -> list[Any]:
        """Stream one sync (`checkpoint_transport`) into every participating worker, between
        begin and commit; a failed receive aborts the update. One report per worker."""
        from checkpoint_transport.targets import RayWorkersTarget

        return await RayWorkersTarget(self, self._receivers(self._participants())).receive_weights(spec, version)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> buckets (each put in Ray's store once for all replicas) -> commit; atomic."""
        await self.begin_weight_update(version)
        try:
            for bucket in iter_buckets(named_tensors, self.config.weight_bucket_mb << 20):
                await self.load_weight_bucket(bucket)
        except BaseException as error:
            await self.abort_weight_update(f"{type(error).__name__}: {error}")
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
            "updating_weights": self._update_participants is not None,
            "num_replicas": len(self.replicas),
            "live_replicas": sum(1 for r in self.replicas if self._routable(r)),
            "queue_depth": sum(e.get("queue_depth", 0) for e in replicas),
            "outstanding_tokens": sum(e.get("outstanding_tokens", 0) for e in replicas),
            "retried_requests": self.retried_requests,
            "replicas": replicas,
        }

    async def get_status(self) -> dict[str, Any]:
        return self.status()
