"""The replica manager's side of a weight update: one update at a time across every replica.

Each replica's scheduler owns its own session (its workers, every expected name); this class
opens them together, delivers each bucket once for all (one object in Ray's store), sizes and
checks the transport stream, and commits only when every replica's session is complete, else
aborts everywhere. A replica that dies meanwhile leaves the update (it restarts later and copies
the committed weights from a peer under the same lock).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import ray
import torch

from checkpoint_transport.bucket import group_into_host_buckets
from checkpoint_transport.spec import ReceiveReport, TransportSpec, failure_reason
from checkpoint_transport.threads import iterate_in_thread
from model_engine_server.errors import ModelEngineError, WeightSyncError, WorkerFailed
from replica.replica import ModelEngineReplica

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class OpenUpdate:
    """The manager's view of one update: which replicas take part and how many receive on each."""

    version: int
    participants: list[ModelEngineReplica] = field(default_factory=list)
    receivers: list[int] = field(default_factory=list)  # per participant, from its begin
    ready: bool = False  # every participant began (drained)
    holds_lock: bool = False
    deadline: asyncio.TimerHandle | None = None
    committed: bool = False
    committing: bool = False  # a commit is under way: a second one waits for its outcome
    reason: str | None = None  # why it aborted
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set once committed or aborted
    servers: dict[int, object] = field(default_factory=dict)  # per participant index, the server that began

    def lost(self, replica: ModelEngineReplica) -> bool:
        """Dead, or restarted since begin: its new server holds no session of this update (its
        weights come from a peer once the update is over), so it can only leave the update."""
        return not replica.alive or replica.server is not self.servers.get(replica.index)

    def drop(self, replica: ModelEngineReplica) -> None:
        """A participant that died leaves the update (it restarts and copies from a peer)."""
        index = self.participants.index(replica)
        del self.participants[index]
        if self.receivers:
            del self.receivers[index]

    def drop_lost(self) -> None:
        """Every participant `lost` since begin leaves the update."""
        for replica in [r for r in self.participants if self.lost(r)]:
            logger.warning("%s died (or restarted) during the update to version %d; it leaves the update",
                           replica.name, self.version)
            self.drop(replica)


class ManagerWeightUpdates:
    def __init__(
        self,
        replicas: Sequence[ModelEngineReplica],
        routable: Callable[[ModelEngineReplica], bool],
        no_replica_error: Callable[[], WorkerFailed],
        initial_version: int,
        timeout_s: float,
        bucket_bytes: int,
    ) -> None:
        self.replicas = replicas
        self._routable = routable
        self._no_replica_error = no_replica_error
        self.version = initial_version
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.lock = asyncio.Lock()  # held by an open update, and by a restart's weight copy
        self.update_open: OpenUpdate | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def in_progress(self) -> bool:
        return self.update_open is not None

    async def begin(self, version: int) -> int:
        """Drain every live replica for `version`; returns how many workers receive each stream.
        A second begin while one is open is refused at once. Holds the manager's weight lock
        until commit or abort (a restart's weight copy waits for it)."""
        if self.update_open is not None:
            raise WeightSyncError(
                f"a weight update to version {self.update_open.version} is already in progress; commit or abort it first"
            )
        update = self.update_open = OpenUpdate(version)
        try:
            await self.lock.acquire()  # waits only for a restart's weight copy
        except BaseException:
            self.update_open = None
            raise
        update.holds_lock = True
        if self.update_open is not update:  # aborted while waiting for the lock
            self.lock.release()
            raise WeightSyncError(f"the weight update to version {version} was aborted while it began")
        participants = [r for r in self.replicas if self._routable(r)]
        if version <= self.version:
            self._finish_update(update)
            raise WeightSyncError(f"new weight version must be greater than the current {self.version}, got {version}")
        if not participants:
            self._finish_update(update)
            raise self._no_replica_error()
        update.participants = participants
        update.servers = {r.index: r.server for r in participants}
        self._arm_update_deadline(update)
        try:
            outcomes = await asyncio.gather(*(r.begin_weight_update(version) for r in participants), return_exceptions=True)
        except BaseException:  # the caller gave up while replicas drained: do not keep them drained
            await asyncio.shield(self._abort(update, f"begin of version {version} was interrupted"))
            raise
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors or self.update_open is not update:
            await self._abort(update, f"begin failed: {errors[0] if errors else 'aborted meanwhile'}")
            raise errors[0] if errors else WeightSyncError(f"the weight update to version {version} was aborted while it began")
        update.receivers = [int(count) for count in outcomes]
        update.ready = True
        return sum(update.receivers)

    def _arm_update_deadline(self, update: "OpenUpdate") -> None:
        """A publisher that vanishes after begin must not hold the weight lock forever (every later
        update refused, restarts blocked): past `weight_update_timeout_s` the update is aborted."""
        timeout_s = self.timeout_s
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if self.update_open is update:
                reason = f"weight update to version {update.version} not committed within weight_update_timeout_s={timeout_s:g}"
                logger.warning("%s; aborting it", reason)
                task = loop.create_task(self._abort(update, reason))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        update.deadline = loop.call_later(timeout_s, expire)

    def _open_update(self, version: int | None = None) -> "OpenUpdate":
        update = self.update_open
        if update is None or not update.ready:
            raise WeightSyncError("no weight update is open: begin one (with its version) before sending weights")
        if version is not None and version != update.version:
            raise WeightSyncError(f"the weight update in progress is to version {update.version}, not {version}")
        return update

    async def load(self, bucket: "ray.ObjectRef | Iterable[tuple[str, torch.Tensor]]", version: int | None = None) -> list[str]:
        """Put one bucket in Ray's store once and load it into every participating replica. A
        replica that dies meanwhile drops out of the update (it restarts from a peer later)."""
        update = self._open_update(version)
        ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(list(bucket))
        update.drop_lost()
        participants = list(update.participants)
        outcomes = await asyncio.gather(*(r.load_weights(ref, version) for r in participants), return_exceptions=True)
        names: list[str] = []
        for replica, outcome in zip(participants, outcomes):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, ModelEngineError) and update.lost(replica):
                    update.drop_lost()
                    continue
                # it may have loaded part of the bucket, on some workers: the update cannot commit
                await asyncio.shield(self._abort(update, f"{replica.name}: a load failed midway: {outcome}"))
                raise outcome
            names = outcome
        if not update.participants:
            raise self._no_replica_error()
        return names

    async def receive(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        """Stream one sync (`checkpoint_transport`) into every participating worker, as sized at
        begin; a participant lost since begin, or a failed receive, aborts the update."""
        update = self._open_update(version)
        if spec.world_size - 1 != sum(update.receivers):
            raise WeightSyncError(
                f"the stream is sized for {spec.world_size - 1} receivers, but {sum(update.receivers)} take part in "
                f"the update to version {version} (use the count begin_weight_update returned)"
            )
        # a participant's worker that died since begin would never join the broadcast group: ping
        # them all now and fail at once, not at the rendezvous timeout
        await asyncio.gather(*(r.health() for r in update.participants if not update.lost(r)))
        dead = [r.name for r in update.participants if update.lost(r)]
        if dead:
            reason = f"{', '.join(dead)} died after the update to version {version} began; begin it again"
            await self._abort(update, reason)
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
            await self._abort(update, f"sync to version {version} failed: {reason}")
        return reports

    async def commit(self, version: int) -> None:
        """Serve `version` on every participant, only if every worker of each holds every
        tensor; otherwise abort everywhere and raise the reason naming what is missing where."""
        update = self._open_update(version)
        if update.committing:  # e.g. the last report's commit and the health monitor's settle
            await update.closed.wait()
            if not update.committed:
                raise WeightSyncError(update.reason or f"the update to version {version} was not committed")
            return
        update.committing = True
        update.drop_lost()
        live = list(update.participants)
        try:
            if not live:
                raise self._no_replica_error()
            refusals = [refusal for refusal in (r.weight_update_refusal(version) for r in live) if refusal]
            if refusals:
                raise WeightSyncError("; ".join(refusals))
            await asyncio.gather(*(r.commit_weight_update(version) for r in live))
        except BaseException as error:
            await asyncio.shield(self._abort(update, str(error) or type(error).__name__))
            raise
        self.version = version
        update.committed = True
        self._finish_update(update)

    async def abort(self, reason: str, version: int | None = None) -> None:
        """Close the open update (with `version`, only that version's) on every participant:
        weights partly delivered refuse to score until a complete sync lands (never mixed
        weights); untouched ones serve on."""
        update = self.update_open
        if update is not None and (version is None or update.version == version):
            await self._abort(update, reason)

    async def _abort(self, update: "OpenUpdate", reason: str) -> None:
        """Abort `update` only: the late tail of an update the deadline already closed must not
        abort the next one."""
        if self.update_open is not update:
            return
        update.reason = reason
        began = [r for r in update.participants if not update.lost(r)]  # a restarted one has nothing to abort
        await asyncio.gather(*(r.abort_weight_update(reason, update.version) for r in began), return_exceptions=True)
        self._finish_update(update)

    def _finish_update(self, update: "OpenUpdate") -> None:
        update.closed.set()
        if update.deadline is not None:
            update.deadline.cancel()
        if self.update_open is update:
            self.update_open = None
        if update.holds_lock:
            update.holds_lock = False
            self.lock.release()

    async def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> buckets (each put in Ray's store once for all replicas) -> commit; atomic."""
        await self.begin(version)
        update = self._open_update(version)
        try:
            buckets = group_into_host_buckets(named_tensors, self.bucket_bytes)
            async for bucket in iterate_in_thread(buckets):  # reads and copies off the event loop
                await self.load(await asyncio.to_thread(ray.put, bucket), version)
        except BaseException as error:
            await asyncio.shield(self._abort(update, f"{type(error).__name__}: {error}"))
            if isinstance(error, ModelEngineError) or not isinstance(error, Exception):
                raise
            raise WeightSyncError(f"{type(error).__name__}: {error}") from error
        await self.commit(version)
        return version
