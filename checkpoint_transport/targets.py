"""The server side of a sync: what a publisher drives, whatever hosts the engines.

`WeightSyncTarget` is the contract: begin (drain, get the receiver count), receive one stream
on every worker, commit or abort. The server's own update session (`SessionHost`, i.e. a
`ModelEngineServer`'s) decides completeness: a target only records into it what each worker
reports it loaded. Three targets:
- `LocalServerTarget`: a `ModelEngineServer` in this process (one receiver, loads through the
  server's session);
- `RayWorkersTarget`: a session host plus the Ray worker actors that hold its engines, each
  exposing `receive_weights(spec: dict, version: int) -> dict` (see `worker_receive_weights`);
- `ActorSyncTarget`: any Ray actor that itself exposes these methods (e.g. a server actor
  hosting the replica manager), so a trainer rank can publish from another process.
A failed receive makes the target abort the update itself, with the reason: the server then
refuses to score until a complete sync lands, even if the publisher died mid-sync.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from checkpoint_transport.receiver import receive_into_engine, receive_weights
from checkpoint_transport.spec import ReceiveReport, TransportSpec

logger = logging.getLogger(__name__)


@runtime_checkable
class WeightSyncTarget(Protocol):
    async def begin_weight_update(self, version: int) -> int:
        """Open the update: stop dispatching everywhere, return once in-flight batches finished,
        with the number of workers that receive each stream (the broadcast group is this + the
        sender). The count comes from the update itself, so it cannot go stale in between."""
        ...

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        """Receive one stream on every worker (ranks 1..n of `spec`); one report per worker."""
        ...

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` if every worker holds all of it (this is the resume); else refused."""
        ...

    async def abort_weight_update(self, reason: str) -> None:
        """Close the update; weights partly delivered refuse to score until a complete sync."""
        ...

    async def get_status(self) -> dict[str, Any]: ...


@runtime_checkable
class SessionHost(Protocol):
    """What a target drives on the server side: the update session of a `ModelEngineServer`
    (or of a replica, which wraps one)."""

    async def begin_weight_update(self, version: int) -> int: ...

    async def load_weights(self, named_tensors: Any, version: int | None = None) -> list[str]: ...

    def start_delivery(self, version: int) -> None: ...

    def record_delivery(self, version: int, participant: str, names: Sequence[str]) -> None: ...

    def participants(self) -> list[str]: ...

    async def weight_specs(self) -> dict[str, Any]: ...

    async def commit_weight_update(self, version: int) -> None: ...

    async def abort_weight_update(self, reason: str) -> None: ...

    async def get_status(self) -> dict[str, Any]: ...


def run_in_thread(function: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
    """Run a blocking call on a daemon thread: a sender stuck in the trainer's export stream
    must never keep the process (or the event loop's shutdown) waiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def body() -> None:
        try:
            outcome, error = function(*args), None
        except BaseException as caught:  # handed to the awaiting coroutine
            outcome, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    threading.Thread(target=body, name="weight-publisher", daemon=True).start()
    return future


def failure_reason(reports: Sequence[ReceiveReport]) -> str | None:
    """The first receiver's error, naming its rank; None when every report is ok."""
    failed = [r for r in reports if not r.ok]
    if not reports:
        return "no worker received the stream"
    if not failed:
        return None
    first = failed[0]
    more = f" (and {len(failed) - 1} more workers failed)" if len(failed) > 1 else ""
    return f"rank {first.rank}: {first.error}{more}"


class _GatedTarget:
    """begin/commit/abort/status forwarded to the server's session; abort on a failed receive."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    async def begin_weight_update(self, version: int) -> int:
        return await self.host.begin_weight_update(version)

    async def commit_weight_update(self, version: int) -> None:
        await self.host.commit_weight_update(version)

    async def abort_weight_update(self, reason: str) -> None:
        await self.host.abort_weight_update(reason)

    async def get_status(self) -> dict[str, Any]:
        return await self.host.get_status()

    async def _settle(self, reports: list[ReceiveReport], version: int) -> list[ReceiveReport]:
        reason = failure_reason(reports)
        if reason is not None:
            logger.warning("sync to version %d failed: %s", version, reason)
            await self.abort_weight_update(f"sync to version {version} failed: {reason}")
        return reports


def _check_receivers(spec: TransportSpec, expected: int) -> None:
    if spec.world_size - 1 != expected:
        from model_engine_server.errors import WeightSyncError

        raise WeightSyncError(
            f"the stream is sized for {spec.world_size - 1} receivers, but {expected} take part in this update "
            "(use the count begin_weight_update returned)"
        )


class LocalServerTarget(_GatedTarget):
    """A `ModelEngineServer` in this process: one receiver loading through the server's session.

    `device`: the GPU the engine lives on, for the nccl backend (the receiving thread joins the
    group on it); None keeps the thread's current device."""

    def __init__(self, server: SessionHost, device: torch.device | str | None = None) -> None:
        super().__init__(server)
        self.device = torch.device(device) if device is not None else None

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        loop = asyncio.get_running_loop()
        host = self.host
        _check_receivers(spec, len(host.participants()))
        expected = set(await host.weight_specs())
        host.start_delivery(version)

        def load_bucket(tensors: list[tuple[str, Any]]) -> list[str]:
            # The server copies before returning, while the views are still valid.
            return asyncio.run_coroutine_threadsafe(host.load_weights(tensors, version), loop).result()

        def receive() -> ReceiveReport:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            return receive_weights(spec.for_rank(1), load_bucket, version, expected)

        report = await run_in_thread(receive)
        return await self._settle([report], version)


async def receive_on_workers(
    host: SessionHost, workers: Sequence[Any], spec: TransportSpec, version: int, first_rank: int = 1
) -> list[ReceiveReport]:
    """Worker actors (`receive_weights(spec: dict, version) -> dict`) receive in parallel as ranks
    `first_rank..`; what each loaded is recorded into `host`'s session as its participant."""
    participants = host.participants()
    host.start_delivery(version)
    calls = [
        asyncio.ensure_future(worker.receive_weights.remote(spec.for_rank(rank).model_dump(), version))
        for rank, worker in enumerate(workers, start=first_rank)
    ]
    # Past the receivers' own no-progress bound a silent worker (stuck in a collective of a
    # replica that died) is reported as failed instead of holding the sync forever.
    deadline_s = spec.timeout_s * 4 + 60
    _, stragglers = await asyncio.wait(calls, timeout=deadline_s) if calls else (set(), set())
    for call in stragglers:
        call.cancel()
    reports = []
    for index, call in enumerate(calls):
        rank = first_rank + index
        outcome: Any = (
            TimeoutError(f"no report within {deadline_s:g} s") if call in stragglers else (call.exception() or call.result())
        )
        if isinstance(outcome, BaseException):  # the worker died, its method raised, or it never answered
            report = ReceiveReport(rank=rank, version=version, error=f"worker failed: {type(outcome).__name__}: {outcome}")
        else:
            report = ReceiveReport.from_dict(outcome) if isinstance(outcome, dict) else outcome
        try:
            host.record_delivery(version, participants[index], report.names_loaded)
        except Exception as error:  # the update closed meanwhile (deadline, abort)
            report.ok, report.error = False, report.error or f"not recorded: {getattr(error, 'message', error)}"
        reports.append(report)
    return reports


class RayWorkersTarget(_GatedTarget):
    """Worker actors that receive in parallel, behind the session host that gates serving."""

    def __init__(self, host: SessionHost, workers: Sequence[Any]) -> None:
        super().__init__(host)
        self.workers = list(workers)

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        _check_receivers(spec, len(self.workers))
        reports = await receive_on_workers(self.host, self.workers, spec, version)
        return await self._settle(reports, version)


class ActorSyncTarget:
    """A Ray actor that exposes the `WeightSyncTarget` methods (specs and reports as dicts)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def begin_weight_update(self, version: int) -> int:
        return int(await self.handle.begin_weight_update.remote(version))

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        reports = await self.handle.receive_weights.remote(spec.model_dump(), version)
        return [ReceiveReport.from_dict(r) if isinstance(r, dict) else r for r in reports]

    async def commit_weight_update(self, version: int) -> None:
        await self.handle.commit_weight_update.remote(version)

    async def abort_weight_update(self, reason: str) -> None:
        await self.handle.abort_weight_update.remote(reason)

    async def get_status(self) -> dict[str, Any]:
        return await self.handle.get_status.remote()


def worker_receive_weights(engine: Any, spec: TransportSpec | dict[str, Any], version: int) -> dict[str, Any]:
    """The body of a worker actor's `receive_weights(spec, version)` method: receive one stream
    into the worker's engine; returns the report as a dict (never raises)."""
    spec = spec if isinstance(spec, TransportSpec) else TransportSpec.model_validate(spec)
    return receive_into_engine(spec, engine, version).to_dict()
