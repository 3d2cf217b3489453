"""The server side of a sync: what a publisher drives, whatever hosts the engines.

`WeightSyncTarget` is the contract: drain for a version, receive one stream on every worker,
commit or abort. Three hosts implement it:
- `LocalServerTarget`: a `ModelEngineServer` in this process (one receiver, loads through its
  executor);
- `RayWorkersTarget`: a control object that gates serving (a `ModelEngineServer`, the replica
  manager, or an actor handle of either) plus the Ray worker actors that hold the engines, each
  exposing `receive_weights(spec: dict, version: int) -> dict` (see `worker_receive_weights`);
- `ActorSyncTarget`: any Ray actor that itself exposes these methods (e.g. a server actor
  hosting one of the above), so a trainer rank can publish from another process.
A failed receive makes the target abort the update itself, with the reason: the server then
refuses to score until a complete sync lands, even if the publisher died mid-sync.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from checkpoint_transport.receiver import receive_into_engine, receive_weights
from checkpoint_transport.spec import ReceiveReport, TransportSpec

logger = logging.getLogger(__name__)


@runtime_checkable
class WeightSyncTarget(Protocol):
    async def receiver_count(self) -> int:
        """How many workers receive each stream (the broadcast group is this + the sender)."""
        ...

    async def begin_weight_update(self, version: int) -> None:
        """Stop dispatching on every replica and return once in-flight batches finished."""
        ...

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        """Receive one stream on every worker (ranks 1..n of `spec`); one report per worker."""
        ...

    async def commit_weight_update(self, version: int) -> None:
        """Every worker holds all of `version`: serve it (this is the resume)."""
        ...

    async def abort_weight_update(self, reason: str) -> None:
        """Keep the old version number and refuse to score until a complete sync lands."""
        ...

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


async def invoke(target: Any, method: str, *args: Any) -> Any:
    """Call `method` on a plain object (sync or async) or on a Ray actor handle, and await it."""
    function = getattr(target, method)
    if hasattr(function, "remote"):
        return await function.remote(*args)
    result = function(*args)
    return await result if inspect.isawaitable(result) else result


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
    """begin/commit/abort/status forwarded to a control object; abort on a failed receive."""

    def __init__(self, control: Any) -> None:
        self.control = control

    async def begin_weight_update(self, version: int) -> None:
        await invoke(self.control, "begin_weight_update", version)

    async def commit_weight_update(self, version: int) -> None:
        await invoke(self.control, "commit_weight_update", version)

    async def abort_weight_update(self, reason: str) -> None:
        await invoke(self.control, "abort_weight_update", reason)

    async def get_status(self) -> dict[str, Any]:
        return await invoke(self.control, "get_status")

    async def _settle(self, reports: list[ReceiveReport], version: int) -> list[ReceiveReport]:
        reason = failure_reason(reports)
        if reason is not None:
            logger.warning("sync to version %d failed: %s", version, reason)
            await self.abort_weight_update(f"sync to version {version} failed: {reason}")
        return reports


class LocalServerTarget(_GatedTarget):
    """A `ModelEngineServer` in this process: one receiver loading through its executor.

    `device`: the GPU the engine lives on, for the nccl backend (the receiving thread joins the
    group on it); None keeps the thread's current device."""

    def __init__(self, server: Any, device: torch.device | str | None = None) -> None:
        super().__init__(server)
        self.server = server
        self.device = torch.device(device) if device is not None else None

    async def receiver_count(self) -> int:
        return 1

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        loop = asyncio.get_running_loop()
        executor = self.server.executor
        expected = set(await executor.weight_specs())

        def load_bucket(tensors: list[tuple[str, Any]]) -> list[str]:
            # The executor copies before returning, while the views are still valid.
            return asyncio.run_coroutine_threadsafe(executor.load_weights(tensors), loop).result()

        def receive() -> ReceiveReport:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            return receive_weights(spec.for_rank(1), load_bucket, version, expected)

        report = await run_in_thread(receive)
        return await self._settle([report], version)


class RayWorkersTarget(_GatedTarget):
    """Worker actors that receive in parallel, behind a control object that gates serving."""

    def __init__(self, control: Any, workers: Sequence[Any], method: str = "receive_weights") -> None:
        super().__init__(control)
        self.workers = list(workers)
        self.method = method

    async def receiver_count(self) -> int:
        return len(self.workers)

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        calls = [
            asyncio.ensure_future(getattr(worker, self.method).remote(spec.for_rank(rank).model_dump(), version))
            for rank, worker in enumerate(self.workers, start=1)
        ]
        # Past the receivers' own no-progress bound a silent worker (stuck in a collective of a
        # replica that died) is reported as failed instead of holding the sync forever.
        deadline_s = spec.timeout_s * 4 + 60
        _, stragglers = await asyncio.wait(calls, timeout=deadline_s) if calls else (set(), set())
        for call in stragglers:
            call.cancel()
        outcomes = [
            TimeoutError(f"no report within {deadline_s:g} s") if call in stragglers
            else (call.exception() or call.result())
            for call in calls
        ]
        reports = []
        for rank, outcome in enumerate(outcomes, start=1):
            if isinstance(outcome, BaseException):  # the worker died, its method raised, or it never answered
                reports.append(ReceiveReport(rank=rank, version=version, error=f"worker failed: {type(outcome).__name__}: {outcome}"))
            else:
                reports.append(ReceiveReport.from_dict(outcome) if isinstance(outcome, dict) else outcome)
        return await self._settle(reports, version)


class ActorSyncTarget:
    """A Ray actor that exposes the `WeightSyncTarget` methods (specs and reports as dicts)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def receiver_count(self) -> int:
        return int(await self.handle.receiver_count.remote())

    async def begin_weight_update(self, version: int) -> None:
        await self.handle.begin_weight_update.remote(version)

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
