"""Weight updates whose stream each worker is handed by someone else: verl's checkpoint engine.

verl's `CheckpointEngineManager` drives every rollout worker itself: it builds one broadcast
group through each worker's `execute_checkpoint_engine`, then calls `update_weights(global_steps)`
on every worker while the trainer sends. Unlike `receive_weights`, the server does not start
these streams, so each worker tells the server where it stands, and the manager's update
session (`manager_weights.ManagerWeightUpdates`) stays the one that decides:

- `join(version, replica, rank)`, before the worker touches its engine: the first worker of an
  attempt opens the manager's update to `version` (every live replica drains and takes part;
  one deadline); the others wait for that same begin. From a worker's join on, its replica's
  session counts as touched: a stream that breaks later cannot leave the old weights trusted.
- `report(version, replica, rank, report)`, once its stream ended: the names it loaded are
  recorded as that worker's; a failed report aborts the update everywhere at once; the report
  that completes every participant's set of workers commits, and the sessions refuse unless
  every worker holds every tensor. Each worker's call returns the update's outcome: committed,
  or a `WeightSyncError` with the reason it was aborted (also by the deadline, when a worker
  never reports).

verl pauses and resumes its replicas around the sync (`abort_all_requests` / `resume_generation`),
which here are `hold` / `release`: the service pauses (running batches finish, new requests
wait) and resumes. verl calls no resume after a sync that raised, so a failed attempt releases
by itself: the old version serves on if nothing reached the engines (e.g. a stale version was
refused), otherwise nothing is scored (requests wait, and time out naming the incomplete
weights) until a complete sync.

An attempt takes as many joins as there were live workers when it began; one more join for the
same version starts a new attempt (verl retrying a sync that failed). A version the manager
already serves, complete, is not loaded again: `join` answers False and the worker consumes the
stream without loading it (verl syncs its initial weights under the number the server already
serves them as: 0, or the step it resumed from).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from checkpoint_transport.spec import ReceiveReport
from model_engine_server.errors import ModelEngineError, WeightSyncError
from replica.manager_weights import ManagerWeightUpdates, OpenUpdate
from replica.replica import ModelEngineReplica

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Attempt:
    """One try at a version: the joins it admits, its begin, and which workers reported."""

    version: int
    joins_expected: int
    begun: "asyncio.Future[OpenUpdate]"
    joins: int = 0
    reported: set[tuple[int, int]] = field(default_factory=set)  # (replica index, rank)


class Serving(Protocol):
    """The pause the sync holds (the replica manager's)."""

    paused: bool

    async def pause_serving(self) -> None: ...

    async def resume_serving(self) -> None: ...


class WorkerDrivenUpdates:
    """The server's side of syncs that each worker receives by itself (`join` / `report`)."""

    def __init__(
        self,
        updates: ManagerWeightUpdates,
        replicas: Sequence[ModelEngineReplica],
        routable: Callable[[ModelEngineReplica], bool],
        serving: Serving,
    ) -> None:
        self.updates = updates
        self.replicas = replicas
        self._routable = routable
        self._serving = serving
        self._holding = False  # this sync paused serving (an admin's earlier pause is not ours to lift)
        self._attempt: _Attempt | None = None

    # ---------------------------------------------------------------- the pause around a sync
    async def hold(self) -> None:
        """Pause serving for a sync: running batches finish, new requests wait in the queues."""
        self._holding = self._holding or not self._serving.paused
        await self._serving.pause_serving()

    async def release(self) -> None:
        """Resume serving, if the sync's `hold` paused it."""
        if self._holding:
            self._holding = False
            await self._serving.resume_serving()

    # ---------------------------------------------------------------- join
    async def join(self, version: int, replica_index: int, rank: int) -> bool:
        """Wait until the update to `version` is open; True: load the stream, False: the version
        is already served complete (consume the stream, load nothing). Raises the refusal."""
        if self._already_served(version):
            logger.info("version %d is already served complete: %s rank %d drops the stream", version,
                        self.replicas[replica_index].name, rank)
            return False
        attempt = self._attempt_for(version)
        attempt.joins += 1
        try:
            update = await asyncio.shield(attempt.begun)  # every joiner sees the begin's own refusal
        except ModelEngineError:
            await self.release()  # refused before any delivery: the old weights serve on
            raise
        replica = self._participant(update, replica_index)
        replica.admit_worker_delivery(version)
        return True

    def _already_served(self, version: int) -> bool:
        live = [r for r in self.replicas if self._routable(r)]
        return (
            version == self.updates.version
            and not self.updates.in_progress
            and bool(live)
            and not any(r.status().get("weights_incomplete") for r in live)
        )

    def _attempt_for(self, version: int) -> _Attempt:
        current = self._attempt
        if current is not None and current.version == version and current.joins < current.joins_expected:
            return current
        expected = sum(len(r.workers) for r in self.replicas if self._routable(r))
        attempt = _Attempt(version, expected, asyncio.ensure_future(self._begin(version)))
        self._attempt = attempt
        return attempt

    async def _begin(self, version: int) -> OpenUpdate:
        await self.updates.begin(version)
        update = self.updates.update_open  # the update this begin opened (no await in between)
        assert update is not None
        return update

    @staticmethod
    def _participant(update: OpenUpdate, replica_index: int) -> ModelEngineReplica:
        if update.closed.is_set():
            raise WeightSyncError(_outcome(update))
        for replica in update.participants:
            if replica.index == replica_index:
                return replica
        raise WeightSyncError(
            f"replica {replica_index} is not taking part in the update to version {update.version} "
            f"(it was not live when the update began)"
        )

    # ---------------------------------------------------------------- report
    async def report(self, version: int, replica_index: int, rank: int, report: ReceiveReport) -> None:
        """Record what one worker loaded (or its failure) and wait for the update's outcome:
        returns once committed, raises `WeightSyncError` naming why it was not."""
        attempt = self._attempt
        if attempt is None or attempt.version != version or not attempt.begun.done() or attempt.begun.exception():
            raise WeightSyncError(f"no weight update to version {version} is open for replica {replica_index} rank {rank}")
        update = attempt.begun.result()
        if not update.closed.is_set():
            await self._take(attempt, update, replica_index, rank, report)
        await update.closed.wait()
        if not update.committed:
            await self.release()  # verl resumes nothing after a failed sync
            raise WeightSyncError(_outcome(update))

    async def _take(self, attempt: _Attempt, update: OpenUpdate, replica_index: int, rank: int,
                    report: ReceiveReport) -> None:
        replica = self.replicas[replica_index]
        if not report.ok:
            await self.updates.abort(f"sync to version {attempt.version} failed: {replica.name} rank {rank}: {report.error}",
                                     attempt.version)
            return
        try:
            replica.record_worker_delivery(rank, report.names_loaded, attempt.version)
        except ModelEngineError as error:  # its session closed (the replica died or was aborted)
            await self.updates.abort(f"{replica.name} rank {rank}: {error}", attempt.version)
            return
        attempt.reported.add((replica_index, rank))
        await self._commit_if_complete(attempt, update)

    async def _commit_if_complete(self, attempt: _Attempt, update: OpenUpdate) -> None:
        """Commit once every worker of every participant still alive has reported (one that
        died since begin leaves the update, as on the manager's own path)."""
        update.drop_lost()
        if update.closed.is_set() or not attempt.reported >= _expected_reports(update):
            return
        try:
            await self.updates.commit(attempt.version)
        except ModelEngineError as refusal:  # the update is closed with this reason; every reporter raises it
            logger.warning("version %d was not committed: %s", attempt.version, refusal)

    async def settle_after_losses(self) -> None:
        """A participant that died after the others reported would leave them waiting for its
        report until the deadline: the health monitor calls this to settle the attempt then."""
        attempt = self._attempt
        if attempt is None or not attempt.begun.done() or attempt.begun.cancelled() or attempt.begun.exception():
            return
        update = attempt.begun.result()
        if not update.closed.is_set() and any(update.lost(r) for r in update.participants):
            await self._commit_if_complete(attempt, update)


def _expected_reports(update: OpenUpdate) -> set[tuple[int, int]]:
    """Every worker of every participant (as counted at begin) must report."""
    return {(replica.index, rank) for replica, count in zip(update.participants, update.receivers) for rank in range(count)}


def _outcome(update: OpenUpdate) -> str:
    return update.reason or f"the weight update to version {update.version} closed without being committed"
