"""`ModelEngineReplica`: one model-parallel copy of the policy on its own GPUs.

It owns, in order of creation: the placement groups (its GPUs), one `ModelEngineWorker` actor
per bundle, a `RayWorkerExecutor` over them, and a `ModelEngineServer` (the scheduler) in the
caller's event loop. Scoring and the weight session go through that scheduler (its update
session's participants are this replica's workers), so a manager drives several replicas the
way a publisher drives one.

Lifecycle: `start(timeout_s)` -> serving -> (a worker dies: `alive` is False, requests fail
fast with `WorkerFailed`) -> `restart()` or `shutdown()`. `shutdown()` leaves no actor and no
placement group behind, whatever state the replica was in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import ray
import torch

from checkpoint_transport.bucket import group_into_host_buckets
from checkpoint_transport.threads import iterate_in_thread
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import ModelEngineError, ServerShuttingDown, WeightSyncError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import ModelEngineServer
from model_engine_server.scheduler_state import SchedulerObserver
from model_engine_server.service import gather_outcomes
from replica.config import ReplicaConfig
from replica.executor import RayWorkerExecutor, participant_name
from replica.placement import ReplicaPlacement, connect_ray, reserve_replica_gpus
from replica.worker import WorkerInfo, worker_actor_class

if TYPE_CHECKING:
    from checkpoint_transport.spec import ReceiveReport, TransportSpec

logger = logging.getLogger(__name__)


class LossAwareObserver(SchedulerObserver):
    """A replica scheduler's hooks: a request it fails because the replica died is counted as
    `lost`, not `failed` (the manager retries it elsewhere, or counts its failure once)."""

    def __init__(self, inner: SchedulerObserver, failure: Callable[[], str | None]) -> None:
        self.inner = inner
        self.failure = failure

    def request_done(self, result: LogProbResult, tokens: int) -> None:
        self.inner.request_done(result, tokens)

    def request_failed(self, error: ModelEngineError) -> None:
        if self.failure() is not None and isinstance(error, (WorkerFailed, ServerShuttingDown)):
            self.inner.request_lost(error)
        else:
            self.inner.request_failed(error)

    def request_rejected(self, error: ModelEngineError) -> None:
        self.inner.request_rejected(error)

    def request_lost(self, error: ModelEngineError) -> None:
        self.inner.request_lost(error)

    def batch_done(self, num_requests: int, num_tokens: int, compute_s: float) -> None:
        self.inner.batch_done(num_requests, num_tokens, compute_s)


class ModelEngineReplica:
    """One replica: placement groups, workers, executor and scheduler, started and stopped together."""

    def __init__(self, config: ReplicaConfig, index: int = 0, observer: SchedulerObserver | None = None) -> None:
        self.config = config
        self.index = index
        self.name = f"replica-{index}"
        self.observer = observer
        self.placement: ReplicaPlacement | None = None
        self.workers: list[Any] = []
        self.worker_infos: list[WorkerInfo] = []
        self.executor: RayWorkerExecutor | None = None
        self.server: ModelEngineServer | None = None
        self.failure: str | None = None
        self.restarting: str | None = None  # why a restart is under way (status reports it as the failure)
        self.started_at: float | None = None
        self.restarts = 0
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def alive(self) -> bool:
        """Started, not shut down, and no worker known dead."""
        return self.server is not None and self.failure is None

    def can_take(self, num_tokens: int) -> bool:
        """Whether a request of `num_tokens` would be served here now rather than refused or
        held: alive, weights complete (not marked incomplete by a failed sync or a restart
        without a peer) and room in the queue."""
        server = self.server
        return (self.alive and server is not None and server.weights.incomplete_reason is None
                and server.has_room_for(num_tokens))

    @property
    def shares_prompts(self) -> bool:
        """Whether its engines run a batch's identical prompts once (then routing keeps a
        GRPO group together)."""
        return self.executor is not None and self.executor.model_info().shares_prompts

    async def start(self, timeout_s: float | None = None) -> "ModelEngineReplica":
        """Reserve GPUs (at most `timeout_s`, default `config.start_timeout_s`), start the
        workers, form their process group and build the engines (at most `init_timeout_s`).
        Any failure leaves nothing behind and raises with the reason."""
        if self.server is not None:
            return self
        config = self.config
        self.failure = None
        connect_ray(config.ray_address, num_gpus_needed=config.world_size * config.num_replicas)
        self.placement = await reserve_replica_gpus(
            config.nodes_per_replica, config.gpus_per_replica_node, config.cpus_per_worker,
            timeout_s if timeout_s is not None else config.start_timeout_s, self.name, config.placement_strategy,
        )
        try:
            await self._start_workers()
        except BaseException:
            await self._teardown()
            raise
        self.started_at = time.time()
        logger.info("%s started: %d workers", self.name, len(self.workers))
        return self

    async def _start_workers(self) -> None:
        config, placement = self.config, self.placement
        assert placement is not None
        actor_class = worker_actor_class()
        self.workers = [
            actor_class.options(
                num_gpus=1, num_cpus=config.cpus_per_worker, scheduling_strategy=placement.scheduling_for(rank),
                name=None,
            ).remote(rank, config.world_size, self.name)
            for rank in range(config.world_size)
        ]
        deadline = config.init_timeout_s
        async with asyncio.timeout(deadline):
            master_addr, master_port = await _await(self.workers[0].rendezvous_address.remote())
        inits = [
            worker.initialize.remote(
                master_addr, master_port, config.backend, config.engine, config.build_engine_kwargs(),
                config.scheduler.max_tokens_per_batch, config.tensor_model_parallel_size,
                config.data_parallel_size, deadline,
            )
            for worker in self.workers
        ]
        try:
            async with asyncio.timeout(deadline):
                self.worker_infos = list(await asyncio.gather(*inits))
        except TimeoutError:
            raise TimeoutError(f"{self.name}: workers did not initialise within init_timeout_s={deadline:g}") from None
        model_info = await _await(self.workers[0].model_info.remote())
        specs = await _weight_specs_or_refusal(self.workers[0])
        self.executor = RayWorkerExecutor(
            self.name, self.workers, self.worker_infos, model_info, specs,
            batch_timeout_s=config.batch_timeout_s,
            weight_bucket_bytes=config.weight_bucket_mb << 20,
            on_failure=self._on_worker_failure,
            max_failed_batches_in_a_row=config.max_failed_batches_in_a_row,
        )
        observer = None if self.observer is None else LossAwareObserver(self.observer, lambda: self.failure)
        self.server = ModelEngineServer(self.executor, config.scheduler, observer, config.initial_weight_version)
        await self.server.start()

    def _on_worker_failure(self, reason: str) -> None:
        """Mark the replica dead and stop its scheduler without draining, so requests queued
        behind the lost batch fail now (and can be retried elsewhere) instead of waiting."""
        if self.failure is not None:
            return
        self.failure = reason
        server = self.server
        if server is not None:
            task = asyncio.get_running_loop().create_task(server.shutdown(drain=False, timeout_s=self.config.batch_timeout_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def health(self) -> dict[str, Any]:
        """Ping every worker (within `health_timeout_s`); a silent or dead one marks the replica
        dead, with the ranks named."""
        if self.server is None:
            return {"replica": self.index, "alive": False, "reason": self.failure or "not started"}
        pings = [asyncio.ensure_future(_await(worker.ping.remote())) for worker in self.workers]
        done, silent = await asyncio.wait(pings, timeout=self.config.health_timeout_s)
        for task in silent:
            task.cancel()
        problems = [f"rank {rank} did not answer a ping within {self.config.health_timeout_s:g} s"
                    for rank, task in enumerate(pings) if task in silent]
        problems += [f"worker rank {rank} died ({type(task.exception()).__name__})"
                     for rank, task in enumerate(pings) if task in done and task.exception() is not None]
        if problems and self.failure is None:
            reason = f"{self.name}: health check: {'; '.join(problems)}"
            if self.executor is not None:
                self.executor.mark_failed(reason)
            self._on_worker_failure(reason)
        return {"replica": self.index, "alive": self.alive, "reason": self.failure}

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop the scheduler (draining when the replica is alive), then kill every worker and
        remove the placement groups."""
        server, self.server = self.server, None
        if server is not None:
            await server.shutdown(drain=drain and self.failure is None, timeout_s=timeout_s)
        await self._teardown()

    async def _teardown(self) -> None:
        workers, self.workers = self.workers, []
        if workers:  # let live workers leave the process group; dead or stuck ones are killed anyway
            goodbyes = [_await(w.shutdown.remote()) for w in workers]
            try:
                async with asyncio.timeout(5.0):
                    await asyncio.gather(*goodbyes, return_exceptions=True)
            except TimeoutError:
                logger.warning("%s: workers did not leave the process group within 5 s; killing them", self.name)
        for worker in workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception as error:  # already dead
                logger.debug("kill %s: %s", self.name, error)
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
        self.executor = None
        self.worker_infos = []

    async def restart(self, timeout_s: float | None = None) -> "ModelEngineReplica":
        """Tear down whatever is left and start again on a fresh placement group; weights come
        from the model path (version `initial_weight_version`) — the manager then copies the
        current weights from a live peer."""
        previous = self.failure
        await self.shutdown(drain=False, timeout_s=5.0)
        self.failure = None
        self.restarts += 1
        self.restarting = f"restarting (restart {self.restarts}) after: {previous or 'shut down'}"
        try:
            return await self.start(timeout_s)
        finally:
            self.restarting = None

    # ------------------------------------------------------------------ serving
    def _server(self) -> ModelEngineServer:
        if self.server is None:
            raise WorkerFailed(f"{self.name} is not running ({self.failure or 'not started'})")
        return self.server

    async def submit(self, request: LogProbRequest | dict[str, Any], timeout_s: float | None = None) -> LogProbResult:
        """Queue one request; raises its typed error. A request lost because the replica died
        (its batch, or its place in the queue) fails with `WorkerFailed` naming the cause."""
        try:
            return await self._server().submit(request, timeout_s)
        except ServerShuttingDown:
            if self.failure is not None:
                raise WorkerFailed(self.failure) from None
            raise

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[LogProbResult | ModelEngineError]:
        """One entry per request, in order: its result or its own typed error."""
        return await gather_outcomes(self.submit(r, timeout_s) for r in requests)

    async def pause_serving(self) -> None:
        await self._server().pause_serving()

    async def resume_serving(self) -> None:
        await self._server().resume_serving()

    @property
    def weight_version(self) -> int:
        return self._server().weight_version

    # ------------------------------------------------------------------ weights
    # Every path records into the scheduler's update session (`model_engine_server.weight_updates`),
    # whose participants are this replica's workers: completeness is decided there, per worker.
    async def begin_weight_update(self, version: int) -> int:
        """Open the update and drain; returns the number of workers that receive a stream."""
        return await self._server().begin_weight_update(version)

    async def load_weights(self, bucket: "ray.ObjectRef | list[tuple[str, torch.Tensor]]", version: int | None = None) -> list[str]:
        """Load one bucket (a list of (HF name, tensor), or a reference to one in Ray's store)
        into every worker, inside the open update (refused when none is open)."""
        executor = self._executor()

        async def load() -> list[str]:  # runs once the session admitted the delivery
            return await executor.load_weights_ref(bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket))

        return await self._server().deliver(load, version)

    async def receive_weights(self, spec: "TransportSpec", version: int, first_rank: int = 1) -> list["ReceiveReport"]:
        """This replica's workers receive one transport stream as ranks `first_rank..`; what each
        loaded is recorded into the update session (the caller settles failures)."""
        return await self._server().receive_weights(spec, version, first_rank)

    def admit_worker_delivery(self, version: int) -> None:
        """This replica's workers are about to load a stream someone else drives into them
        (verl's checkpoint engine, `replica.worker_driven`): the open update counts as touched."""
        self._server().updates.admit(version)

    def record_worker_delivery(self, rank: int, names: Sequence[str], version: int) -> None:
        """What worker `rank` loaded of such a stream, recorded as that participant's."""
        self._server().updates.record(participant_name(rank), names, version)

    async def weight_layout(self) -> tuple[ModelInfo, dict[str, WeightSpec]]:
        return await self._server().weight_layout()

    def weight_update_refusal(self, version: int) -> str | None:
        """Why `version` cannot be committed here (what is missing on which worker), or None."""
        refusal = self._server().weight_update_refusal(version)
        return f"{self.name}: {refusal}" if refusal else None

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` if every worker holds every tensor; else abort and raise the reason."""
        await self._server().commit_weight_update(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self._server().abort_weight_update(reason, version)

    def mark_weights_incomplete(self, reason: str) -> None:
        self._server().mark_weights_incomplete(reason)

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> every bucket -> commit; any failure aborts (weights marked incomplete)."""
        await self.begin_weight_update(version)
        try:
            buckets = group_into_host_buckets(named_tensors, self.config.weight_bucket_mb << 20)
            async for bucket in iterate_in_thread(buckets):  # reads and copies off the event loop
                await self.load_weights(await asyncio.to_thread(ray.put, bucket), version)
            await self.commit_weight_update(version)
        except BaseException as error:
            if self.server is not None:
                await asyncio.shield(self.server.abort_weight_update(str(error) or type(error).__name__, version))
            if isinstance(error, ModelEngineError) or not isinstance(error, Exception):
                raise
            raise WeightSyncError(f"{self.name}: {type(error).__name__}: {error}") from error
        return version

    async def copy_weights_from(self, peer: "ModelEngineReplica", version: int) -> None:
        """Take `peer`'s current weights as `version` (after a restart): worker to worker through
        Ray's object store, recorded into this replica's update session like any delivery. The
        peer must not be mid-update."""
        buckets = await peer._executor().export_weight_buckets()
        await self.begin_weight_update(version)
        try:
            for bucket in buckets:
                await self.load_weights(bucket, version)
            await self.commit_weight_update(version)
        except BaseException as error:
            if self.server is not None:
                await asyncio.shield(self.server.abort_weight_update(f"copy from {peer.name} failed: {error}", version))
            raise

    def _executor(self) -> RayWorkerExecutor:
        if self.executor is None:
            raise WorkerFailed(f"{self.name} has no workers ({self.failure or 'not started'})")
        return self.executor

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        base: dict[str, Any] = {"replica": self.index, "name": self.name, "alive": self.alive,
                                "failure": self.failure or self.restarting, "restarts": self.restarts,
                                "workers": len(self.workers),
                                "nodes": [info.node_id for info in self.worker_infos]}  # Ray node of each rank
        if self.server is not None:
            base.update(self.server.status())
        return base

    async def get_status(self) -> dict[str, Any]:
        return self.status()

    async def worker_placements(self) -> list[WorkerInfo]:
        """Where each worker runs (rank, GPU ids, placement group, bundle resources)."""
        return list(self.worker_infos)


async def _weight_specs_or_refusal(worker: Any) -> "dict[str, Any] | WeightSyncError":
    """The engine's weight layout, or the reason it takes no syncs (the replica still scores)."""
    try:
        return await _await(worker.weight_specs.remote())
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, WeightSyncError):
            return error.cause
        raise


async def _await(ref: Any) -> Any:
    return await ref
