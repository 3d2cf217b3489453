"""The scheduler's side of a weight update: opens the session, gates every delivery, commits.

`ModelEngineServer` owns one `WeightUpdates`. The contract it enforces, whatever calls arrive:
- `begin(version)` opens a `WeightSession` (participants and expected names from the executor,
  one deadline), drains in-flight batches, drops half-assembled parameters an earlier aborted
  sync left in the engines, and returns the receiver count. A second `begin` while one is open
  is refused at once.
- Weights reach the engines only inside an open session: `load` / `deliver` (tensors through
  the executor), `receive` (a transport streaming into every participant, each reporting
  what it loaded) and `admit` / `record` (a stream someone else drives into each participant,
  which reports what it loaded). Anything else is refused.
- A delivery starts only once begin has drained, so no batch labelled with the old version runs
  beside it; a delivery that fails midway, or whose caller gives up, aborts the update (it may
  have written part of its tensors, on some participants).
- `commit(version)` first waits for the deliveries still writing, then serves the version only if
  every participant recorded every expected name; otherwise it aborts with a reason naming what
  is missing and raises.
- `abort(reason)` (also on the deadline): if any delivery began, the weights are incomplete and
  nothing serves until a complete sync; if none did, the old weights serve on under the old version.

Imports neither Ray nor HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable, Iterable

import torch

from checkpoint_transport.spec import ReceiveReport, TransportSpec, failure_reason
from model_engine_server.errors import ModelEngineError, WeightSyncError
from model_engine_server.executor import Executor
from model_engine_server.scheduler_state import WeightState
from model_engine_server.weight_session import WeightSession

logger = logging.getLogger(__name__)


class WeightUpdates:
    def __init__(
        self,
        executor: Executor,
        timeout_s: float,
        drain: Callable[[], Awaitable[None]],
        wake: Callable[[], None],
        initial_version: int = 0,
    ) -> None:
        self.executor = executor
        self.timeout_s = timeout_s
        self.state = WeightState(version=initial_version)
        self._drain = drain
        self._wake = wake
        self._timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._change = asyncio.Event()  # replaced on each change; see `_changed`

    # ---------------------------------------------------------------- open
    async def begin(self, version: int) -> int:
        """Open the session for `version` and drain; returns how many processes receive."""
        expected = frozenset(await self.executor.weight_specs())
        session = WeightSession(version, tuple(self.executor.participants()), expected, time.monotonic() + self.timeout_s)
        self.state.begin(session)  # check-and-set in one step: a concurrent begin is refused here
        self._timer = asyncio.get_running_loop().call_later(session.deadline - time.monotonic(), self._expire, session)
        try:
            await self._drain_unless_closed(session)
            self._check_still_open(session)
            await self.executor.discard_partial_weights()
        except BaseException as error:  # the caller gave up, or the engines are gone: nothing was loaded
            if self.state.session is session:
                self._close(f"begin of version {version} did not complete: {type(error).__name__}: {error}")
            raise
        self._check_still_open(session)
        session.ready = True  # no batch reads the old weights any more: deliveries may start
        self._changed()
        return session.receivers

    async def _drain_unless_closed(self, session: WeightSession) -> None:
        """Wait for the in-flight batches to finish, or for `session` to close (aborted by
        another call, or its deadline): dispatch resumes then, and the server may not go idle
        again for a long time under load."""
        drained = asyncio.ensure_future(self._drain())
        closed = asyncio.ensure_future(self._wait_until(lambda: self.state.session is not session))
        try:
            await asyncio.wait({drained, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (drained, closed):
                waiter.cancel()

    # ---------------------------------------------------------------- deliveries
    async def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> list[str]:
        """Load tensors through the executor into the open session; returns the names loaded."""
        self.state.current(version)  # refused before the stream is touched
        stream = iter(named_tensors)
        first = next(stream, None)
        if first is None:  # nothing to deliver: the engines are untouched
            return []
        return await self.deliver(lambda: self.executor.load_weights(itertools.chain([first], stream)), version)

    async def deliver(self, load: Callable[[], Awaitable[list[str]]], version: int | None = None) -> list[str]:
        """Run one delivery that every participant takes (`load` returns the names all of them
        loaded) inside the open session, and record it."""
        async with self._delivery(version) as session:
            names = await load()
            self._check_still_open(session)
            session.record_everywhere(names)
            return names

    async def receive(self, spec: TransportSpec, version: int, first_rank: int | None = None) -> list[ReceiveReport]:
        """Every participant receives one transport stream; what each loaded is recorded.

        `first_rank=None`: this server is the whole receiving side, so the stream must be sized
        for exactly its participants, and a failed receive aborts the update here. Otherwise it
        is one part of a larger group (a replica of a manager, which checks and aborts)."""
        standalone = first_rank is None
        first = 1 if first_rank is None else first_rank
        if spec.timeout_s > self.timeout_s:  # the update closes then anyway: no receiver waits past it
            spec = spec.model_copy(update={"timeout_s": self.timeout_s})
        receivers = self.state.current(version).receivers
        room = spec.world_size - first
        if (room != receivers) if standalone else (room < receivers):  # refused before anything is touched
            raise WeightSyncError(
                f"the stream is sized for {spec.world_size - 1} receivers, but {receivers} take part in the "
                f"update to version {version} (use the count begin_weight_update returned)"
            )
        async with self._delivery(version) as session:
            reports = await self.executor.receive_weights(spec, version, first)
            if self.state.session is not session:
                reason = f"the update to version {version} closed while its stream was received"
                reports = [replace(r, ok=False, error=r.error or reason) for r in reports]
            else:
                for participant, report in zip(session.participants, reports):
                    session.record(participant, report.names_loaded)
        reason = failure_reason(reports)
        if standalone and reason is not None:
            await self._abort_session(session, f"sync to version {version} failed: {reason}")
        return reports

    @contextlib.asynccontextmanager
    async def _delivery(self, version: int | None) -> AsyncIterator[WeightSession]:
        """One delivery into the open session. It starts only once begin has drained (a load
        must never run beside a batch labelled with the old version), commit waits while it is
        in flight, and a caller that gives up midway aborts the update: its load may still be
        writing, so what the engines hold is unknown."""
        session = self.state.current(version)
        await self._wait_until(lambda: session.ready or self.state.session is not session)
        self._check_still_open(session)
        session.delivery_began()
        try:
            yield session
        except asyncio.CancelledError:
            self._abort_in_background(session, f"the caller gave up on a delivery to version {session.version} midway")
            raise
        except Exception as error:  # it may have written part of its tensors: none of them can be trusted
            self._abort_in_background(session, f"a delivery to version {session.version} failed midway: "
                                               f"{type(error).__name__}: {error}")
            raise
        finally:
            session.delivery_ended()
            self._changed()

    def admit(self, version: int) -> None:
        """A participant is about to receive a stream this server does not drive (verl's
        checkpoint engine calls each worker itself): from here on an abort cannot trust the old
        weights. Refused when no update to `version` is open, or while its begin still drains."""
        session = self.state.current(version)
        if not session.ready:
            raise WeightSyncError(
                f"the update to version {version} is still draining its batches: wait for begin_weight_update to return"
            )
        session.start_delivery()

    def record(self, participant: str, names: Iterable[str], version: int) -> None:
        """What `participant` loaded of such a stream; commit decides completeness from it."""
        self.state.current(version).record(participant, names)

    def _check_still_open(self, session: WeightSession) -> None:
        if self.state.session is not session:
            raise WeightSyncError(
                f"the weight update to version {session.version} closed while this call was under way "
                f"({self.state.incomplete_reason or 'committed or aborted by another call'})"
            )

    # ---------------------------------------------------------------- close
    async def commit(self, version: int) -> None:
        """Serve `version` if it arrived complete everywhere; else abort, naming what is missing.
        Deliveries still writing are waited for first: a commit never serves weights a stream is
        still changing, nor skips the failure such a stream may yet report."""
        session = self.state.current(version)  # no update, or another version: refused, nothing aborted
        await self._wait_until(lambda: session.deliveries_in_flight == 0 or self.state.session is not session)
        self._check_still_open(session)
        try:
            self.state.commit(version)  # the one completeness check: refused while anything is missing
        except WeightSyncError as refusal:
            await self.abort(refusal.message)
            raise
        self._clear_timer()
        self._changed()
        self._wake()

    async def abort(self, reason: str, version: int | None = None) -> None:
        """Close the open session (if any; with `version`, only that version's) and drop the
        engines' half-assembled parameters."""
        session = self.state.session
        if session is not None and (version is None or session.version == version):
            await self._abort_session(session, reason)

    async def _abort_session(self, session: WeightSession, reason: str) -> None:
        """Close `session` if it is still the open one: a failure that arrives late (its update
        expired meanwhile) must not close the next update."""
        if self.state.session is session:
            self._close(reason)
            await self._discard_after_abort()

    async def _discard_after_abort(self) -> None:
        try:
            await self.executor.discard_partial_weights()
        except Exception as error:  # a dead executor holds nothing to discard
            logger.warning("discarding partial weights after an abort failed: %s", error)

    def mark_incomplete(self, reason: str) -> None:
        """Refuse to score until a complete update lands (e.g. a replica restarted from an older
        checkpoint than the version its peers serve)."""
        self.state.incomplete_reason = reason
        self._wake()

    async def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> load -> commit; any failure (or a cancel) aborts."""
        await self.begin(version)
        session = self.state.current(version)
        try:
            await self.load(named_tensors, version)
            await self.commit(version)
        except BaseException as error:
            await asyncio.shield(self._abort_session(session, str(error) or type(error).__name__))
            if isinstance(error, ModelEngineError) or not isinstance(error, Exception):
                raise
            raise WeightSyncError(f"{type(error).__name__}: {error}") from error
        return version

    def _close(self, reason: str) -> None:
        incomplete = self.state.abort(reason)
        self._clear_timer()
        self._changed()
        self._wake()
        if incomplete:
            logger.warning("weight update aborted, weights incomplete: %s", reason)

    def _expire(self, session: WeightSession) -> None:
        """A publisher that began an update and vanished must not leave the server drained forever."""
        self._abort_in_background(
            session, f"the weight update to version {session.version} was not committed within {self.timeout_s:g} s"
        )

    def _abort_in_background(self, session: WeightSession, reason: str) -> None:
        """Close `session` now (nothing can commit it from here on); drop the partial weights
        in a task, for callers that cannot await (a timer, a cancelled coroutine)."""
        if self.state.session is not session:
            return
        self._close(reason)
        task = asyncio.get_running_loop().create_task(self._discard_after_abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _changed(self) -> None:
        """Wake every `_wait_until`: a session became ready, closed, or a delivery ended."""
        event, self._change = self._change, asyncio.Event()
        event.set()

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._change.wait()

    def _clear_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
