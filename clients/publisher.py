"""The trainer-side weight publisher: drain -> stream buckets to every worker -> commit.

`WeightPublisher(target, config).update_weights(weights, version)` takes the trainer's export
stream of `(hf_name, tensor)` (or a dict, or an HF checkpoint folder) and:
1. drains every replica for `version` (`begin_weight_update`: dispatch stops, in-flight
   batches finish, new requests queue);
2. opens a fresh transport group, starts receiving on every worker, and sends the buckets
   (pipelined on both sides: packing, transfer and loading overlap);
3. commits `version` on every worker when every receiver reports a complete, verified stream
   (this resumes serving), or aborts this version's update with the reason: the version
   stays, the server refuses to score until a complete sync lands (if anything reached the
   engines; otherwise the old weights serve on), and `WeightSyncError(reason)` is raised here.

Targets: any `LogProbService` in this process (a `ModelEngineServer`, the replica manager, the
composite `serve` builds), `ActorSyncTarget` (a Ray actor hosting one) and `HttpSyncTarget` (the
server's admin routes), in `clients.sync_targets`. From a Ray actor (a trainer rank) use
the same async API, or `update_weights_blocking` in synchronous code. When the sending rank is
another process than the publisher (a controller drives, trainer rank 0 sends), use
`update_weights_from(send, version)`: `send(spec, version)` runs `send_weights` over there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch

from checkpoint_transport.channel import TransportSession, get_backend
from checkpoint_transport.checkpoint_files import iter_checkpoint
from checkpoint_transport.sender import WeightSender, send_weights
from checkpoint_transport.spec import ReceiveReport, SendReport, TransportConfig, TransportSpec
from checkpoint_transport.spec import failure_reason
from checkpoint_transport.threads import run_in_thread
from clients.sync_targets import ActorSyncTarget, HttpSyncTarget  # re-exported: where they were first imported from
from model_engine_server.errors import InvalidRequest, ModelEngineError, WeightSyncError

__all__ = ["ActorSyncTarget", "HttpSyncTarget", "SyncReport", "WeightPublisher", "WeightSyncTarget", "as_named_tensors"]

logger = logging.getLogger(__name__)


@runtime_checkable
class WeightSyncTarget(Protocol):
    """What a publisher drives: the weight-update half of `model_engine_server.service.LogProbService`
    (so any service is a target), or a remote one (`ActorSyncTarget`, `HttpSyncTarget`)."""

    async def begin_weight_update(self, version: int) -> int:
        """Open the update: drain, and answer how many workers receive each stream (the
        broadcast group is this + the sender), so the count cannot go stale in between."""
        ...

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        """Receive one stream on every worker (ranks 1..n of `spec`); one report per worker. A
        failed receive aborts the update on the server by itself."""
        ...

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` if every worker holds all of it (this is the resume); else refused."""
        ...

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        """Close the open update, only if it is `version`'s when given."""
        ...

    async def get_status(self) -> dict[str, Any]: ...

Weights = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor] | str | os.PathLike
RemoteSend = Callable[[TransportSpec, int], Awaitable[SendReport | dict[str, Any]]]
SenderFactory = Callable[[TransportSpec], WeightSender]
SENDER_GRACE_AFTER_RECEIVERS_FAILED_S = 10.0


@dataclass
class SyncReport:
    """One sync, as the publisher saw it."""

    version: int
    ok: bool = False
    error: str | None = None
    send: SendReport | None = None
    receives: list[ReceiveReport] = field(default_factory=list)
    pause_window_s: float = 0.0  # begin_weight_update called -> commit/abort returned
    transfer_s: float = 0.0  # first bucket offered -> every worker finished loading

    @property
    def bytes(self) -> int:
        return self.send.bytes if self.send else 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else 0.0


def as_named_tensors(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(weights, (str, os.PathLike)):
        return iter_checkpoint(Path(weights))
    if isinstance(weights, Mapping):
        return weights.items()
    return weights


class WeightPublisher:
    """Publishes complete weight versions to a `WeightSyncTarget`; one sync at a time."""

    def __init__(
        self,
        target: WeightSyncTarget,
        config: TransportConfig | None = None,
        sender_factory: SenderFactory = WeightSender.from_spec,
        session: TransportSession | None = None,
    ) -> None:
        """`session`: a rendezvous shared with other publishers (left open by `close`); by
        default the publisher opens its own from `config` at the first sync."""
        self.target = target
        self.config = config or TransportConfig()
        self.sender_factory = sender_factory
        self._session: TransportSession | None = session
        self._owns_session = session is None
        self._lock = asyncio.Lock()
        self.last_report: SyncReport | None = None

    async def update_weights(self, weights: Weights, version: int) -> SyncReport:
        """Publish `weights` as `version`; raises `WeightSyncError` with the reason on failure."""
        named = as_named_tensors(weights)
        cancelled = threading.Event()  # a thread cannot be cancelled from here: the sender stops at this

        def start(spec: TransportSpec, v: int) -> "asyncio.Future[SendReport]":
            return run_in_thread(send_weights, spec, named, v, self.sender_factory, cancelled)

        return await self._sync(version, start, stop_sender=cancelled.set)

    async def update_weights_from(self, send: RemoteSend, version: int) -> SyncReport:
        """Publish what another process sends: `send(spec, version)` makes it run
        `checkpoint_transport.send_weights(spec, its_named_tensors, version)` and returns the report."""

        async def send_remote(spec: TransportSpec, version: int) -> SendReport:
            outcome = await send(spec, version)
            return SendReport.from_dict(outcome) if isinstance(outcome, dict) else outcome

        return await self._sync(version, send_remote)

    def update_weights_blocking(self, weights: Weights, version: int) -> SyncReport:
        """`update_weights` for synchronous code (a plain Ray actor, a script); no loop may run here."""
        return asyncio.run(self.update_weights(weights, version))

    async def _open_session(self) -> TransportSession:
        if self._session is None:
            backend = get_backend(self.config.backend)
            self._session = await run_in_thread(backend.open_session, self.config)
        return self._session

    async def _sync(
        self,
        version: int,
        start_sender: Callable[[TransportSpec, int], Awaitable[SendReport]],
        stop_sender: Callable[[], None] = lambda: None,
    ) -> SyncReport:
        async with self._lock:
            session = await self._open_session()
            report = SyncReport(version=version)
            paused_at = time.monotonic()
            try:  # the receiver count comes from the update itself: it cannot change in between
                receivers = await self.target.begin_weight_update(version)
            except (WeightSyncError, InvalidRequest):  # refused (stale version, another update running, a version
                raise                                  # out of range): nothing to undo, maybe someone else's update
            except BaseException as error:  # timed out or cancelled: the server may still finish the begin
                report.error = f"begin was interrupted: {type(error).__name__}: {error}"
                await self._abort(report)
                raise
            try:
                if receivers < 1:
                    raise WeightSyncError("the target has no receiving workers (no live replica?)")
                spec = await run_in_thread(session.begin, f"v{version}-{uuid.uuid4().hex[:8]}", receivers)
                spec = spec.model_copy(update=self._spec_overrides())  # a shared session: this publisher's knobs
                await self._transfer(session, spec, version, start_sender, report, stop_sender)
            except BaseException as error:  # cancelled or a bug: the server must not stay half-updated
                report.error = report.error or f"{type(error).__name__}: {error}"
                await self._abort(report)
                raise
            if report.error is None:
                try:
                    await self.target.commit_weight_update(version)
                except Exception as error:
                    report.error = f"commit failed: {_message(error)}"
            if report.error is not None:
                await self._abort(report)
            report.ok = report.error is None
            report.pause_window_s = time.monotonic() - paused_at
            self.last_report = report
            if not report.ok:
                raise _sync_error(report)
            return report

    def _spec_overrides(self) -> dict[str, Any]:
        return {
            "bucket_bytes": self.config.bucket_bytes,
            "timeout_s": self.config.timeout_s,
            "max_buffered_buckets": self.config.max_buffered_buckets,
        }

    async def _transfer(
        self,
        session: TransportSession,
        spec: TransportSpec,
        version: int,
        start_sender: Callable[[TransportSpec, int], Awaitable[SendReport]],
        report: SyncReport,
        stop_sender: Callable[[], None],
    ) -> None:
        receiving = asyncio.ensure_future(self.target.receive_weights(spec, version))
        sending = asyncio.ensure_future(start_sender(spec, version))
        try:
            await self._collect(session, spec, version, receiving, sending, report)
        except BaseException:  # cancelled: stop both ends now rather than let them stream on
            stop_sender()
            session.abort("the publisher was cancelled")
            receiving.cancel()
            sending.cancel()
            raise
        if not sending.done():  # reported without it (a bound ran out): its thread stops at the next bucket
            stop_sender()

    async def _collect(
        self,
        session: TransportSession,
        spec: TransportSpec,
        version: int,
        receiving: "asyncio.Future[Any]",
        sending: "asyncio.Future[SendReport]",
        report: SyncReport,
    ) -> None:
        started = time.monotonic()
        done, _ = await asyncio.wait({receiving, sending}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done and _send_failed(sending):
            session.abort(_send_error(sending))  # receivers stop now instead of timing out
        # Once the sender is done, the receivers only load what they hold: a receiver silent for
        # longer than its own idle limit and one more channel timeout is stuck (an engine load
        # that never returns) and must not keep the server drained
        receive_bound_s = None if receiving.done() else spec.receiver_idle_limit_s + spec.timeout_s
        try:
            async with asyncio.timeout(receive_bound_s):
                report.receives = await receiving
        except TimeoutError:
            receiving.cancel()
            report.receives = []
            report.error = f"receiving failed: no report from the receivers {receive_bound_s:.3g} s after the sender finished"
        except Exception as error:
            report.receives = []
            report.error = f"receiving failed: {_message(error)}"
        receivers_failed = failure_reason(report.receives) is not None
        if receivers_failed and not sending.done():
            session.abort(failure_reason(report.receives) or "receivers failed")  # unblock the sender
        report.transfer_s = time.monotonic() - started
        # With the receivers gone, a sender still waiting for them to join cannot be woken on
        # every backend: give it a short grace, then report without it (its thread times out
        # by itself; the next sync uses a fresh group).
        sender_bound_s = min(spec.timeout_s + 10, SENDER_GRACE_AFTER_RECEIVERS_FAILED_S) if receivers_failed else spec.timeout_s + 10
        try:
            async with asyncio.timeout(sender_bound_s):
                report.send = await asyncio.shield(sending)
        except TimeoutError:
            report.send = SendReport(version=version, error=f"the sender did not finish within {sender_bound_s:.3g} s")
        except Exception as error:  # the sending process died, or its call raised
            report.send = SendReport(version=version, error=f"the sender failed: {type(error).__name__}: {error}")
        problems = []
        if report.send.error or not report.send.ok:
            problems.append(f"sender: {report.send.error or 'did not finish'}")
        receive_problem = report.error or failure_reason(report.receives)
        if receive_problem:
            problems.append(receive_problem)
        elif report.send.ok and any(r.tensors != report.send.tensors for r in report.receives):
            problems.append(f"workers received {[r.tensors for r in report.receives]} tensors, {report.send.tensors} were sent")
        report.error = "; ".join(problems) or None

    async def _abort(self, report: SyncReport) -> None:
        reason = f"sync to version {report.version} failed: {report.error}"
        try:
            await asyncio.shield(self.target.abort_weight_update(reason, report.version))
        except Exception as error:  # the target may be the thing that failed; report, don't mask
            logger.warning("aborting version %d on the target failed too: %s", report.version, error)

    async def get_status(self) -> dict[str, Any]:
        return await self.target.get_status()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            session, self._session = self._session, None
            await run_in_thread(session.close)


def _message(error: BaseException) -> str:
    """The error's text, or its type where it has none (httpx's timeouts)."""
    text = error.message if isinstance(error, ModelEngineError) else str(error)
    return text or type(error).__name__


def _send_failed(task: "asyncio.Future[SendReport]") -> bool:
    return task.exception() is not None or not task.result().ok


def _send_error(task: "asyncio.Future[SendReport]") -> str:
    error = task.exception()
    return f"the sender failed: {error}" if error is not None else f"the sender failed: {task.result().error}"


def _sync_error(report: SyncReport) -> WeightSyncError:
    error = WeightSyncError(f"weight sync to version {report.version} failed: {report.error}")
    error.report = report  # type: ignore[attr-defined]
    return error
