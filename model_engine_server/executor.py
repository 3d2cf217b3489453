"""The executor seam: where the scheduler's batches actually run.

The scheduler only knows this interface. `InProcessExecutor` runs an adapter on a worker
thread of this process (tests, single-device serving); the replica layer puts Ray workers
behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from checkpoint_transport.receiver import receive_weights
from checkpoint_transport.spec import ReceiveReport, TransportSpec
from checkpoint_transport.threads import run_in_thread
from model_engine_server.adapter import EngineOutcome, ModelEngineServerAdapter
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import WeightSyncError, WorkerFailed
from model_engine_server.protocol import LogProbRequest

T = TypeVar("T")

logger = logging.getLogger(__name__)


@runtime_checkable
class Executor(Protocol):
    """Runs packed batches and receives weights; may be in-process or spread over workers."""

    def model_info(self) -> ModelInfo: ...

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[EngineOutcome]:
        """One outcome per request, in order: a `ScoreOutput` or the error for that request."""
        ...

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors (HF names) into the engine(s); returns the names loaded."""
        ...

    async def weight_specs(self) -> dict[str, WeightSpec]: ...

    def participants(self) -> list[str]:
        """Every process that must hold a new weight version (one name each, in receive-rank order)."""
        ...

    async def receive_weights(self, spec: TransportSpec, version: int, first_rank: int) -> list[ReceiveReport]:
        """Every participant joins one transport stream (as ranks `first_rank..`, in participant
        order) and loads what it receives; one report per participant, never raises for a bad
        stream (the report says what went wrong)."""
        ...

    async def discard_partial_weights(self) -> None:
        """Drop parameters still waiting for some of their parts (fused qkv, gate/up), so what an
        aborted sync left never combines with the next sync's tensors; a stream still arriving
        from that sync loads nothing after this returns."""
        ...

    async def close(self) -> None: ...


class InProcessExecutor:
    """An adapter on one dedicated thread, so the event loop never blocks on the model.

    One thread also serialises weight loads with forward passes, which the scheduler relies
    on only as a second line of defence (it drains before any load). A batch that outlives
    `batch_timeout_s` fails with `WorkerFailed`, and so does every later call (the thread may
    be stuck in the engine for good): the same contract as a replica's Ray workers.
    """

    PARTICIPANT = "engine"

    def __init__(self, adapter: ModelEngineServerAdapter, batch_timeout_s: float = 600.0) -> None:
        self.adapter = adapter
        self.batch_timeout_s = batch_timeout_s
        self.failure: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # Bumped on the engine thread by every discard (each begin and abort): a stream that
        # began before it, still arriving on its own thread, loads none of its later buckets.
        self._weights_epoch = 0

    def model_info(self) -> ModelInfo:
        return self.adapter.engine.info

    async def _run(self, what: str, function: Callable[..., T], *args: Any) -> T:
        if self.failure is not None:
            raise WorkerFailed(self.failure)
        call = asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
        try:
            async with asyncio.timeout(self.batch_timeout_s):
                return await call
        except TimeoutError:
            self.failure = f"the engine did not finish {what} within batch_timeout_s={self.batch_timeout_s:g} s"
            logger.error("%s; the in-process engine takes no more work", self.failure)
            raise WorkerFailed(self.failure) from None

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[EngineOutcome]:
        return await self._run(f"a batch of {len(requests)} requests", self.adapter.score, list(requests))

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        return await self._run("a weight load", self.adapter.engine.load_weights, named_tensors)

    async def weight_specs(self) -> dict[str, WeightSpec]:
        return self.adapter.engine.weight_specs()

    def participants(self) -> list[str]:
        return [self.PARTICIPANT]

    async def receive_weights(self, spec: TransportSpec, version: int, first_rank: int) -> list[ReceiveReport]:
        """Join the stream on a daemon thread; each bucket loads on the engine thread (never
        beside a forward), copied while the receiver's views are valid."""
        if self.failure is not None:
            raise WorkerFailed(self.failure)
        engine = self.adapter.engine
        expected = set(engine.weight_specs())
        device = torch.device(engine.info.device)
        epoch = await self._run("reading the weight epoch", lambda: self._weights_epoch)

        def load_in_epoch(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
            if self._weights_epoch != epoch:
                raise WeightSyncError(f"the update to version {version} was closed; its stream loads nothing more")
            return engine.load_weights(tensors)

        def load_bucket(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
            return self._pool.submit(load_in_epoch, tensors).result()

        def receive() -> ReceiveReport:
            if device.type == "cuda":  # nccl: the receiving thread joins the group on the engine's GPU
                torch.cuda.set_device(device)
            return receive_weights(spec.for_rank(first_rank), load_bucket, version, expected)

        return [await run_in_thread(receive)]

    async def discard_partial_weights(self) -> None:
        await self._run("discarding partial weights", self._discard_on_engine_thread)

    def _discard_on_engine_thread(self) -> None:
        self._weights_epoch += 1
        self.adapter.engine.discard_partial_weights()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Wait (off the event loop, bounded) for a forward still running; a hung one is left
        behind rather than freezing the loop that answers everyone else."""
        if self.failure is not None:  # the thread is stuck: do not wait for it
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.to_thread(self._pool.shutdown, True)
        except TimeoutError:
            logger.warning("the engine thread did not finish within %.0f s; closing without it", timeout_s)
            self._pool.shutdown(wait=False, cancel_futures=True)
