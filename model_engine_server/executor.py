"""The executor seam: where the scheduler's batches actually run.

The scheduler only knows this interface. `InProcessExecutor` runs an adapter on a worker
thread of this process (tests, single-device serving); the replica layer puts Ray workers
behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from model_engine_server.adapter import ModelEngineServerAdapter, Outcome
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.protocol import LogProbRequest

logger = logging.getLogger(__name__)


@runtime_checkable
class Executor(Protocol):
    """Runs packed batches and receives weights; may be in-process or spread over workers."""

    def model_info(self) -> ModelInfo: ...

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[Outcome]:
        """One outcome per request, in order: a `ScoreOutput` or the error for that request."""
        ...

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors (HF names) into the engine(s); returns the names loaded."""
        ...

    async def weight_specs(self) -> dict[str, WeightSpec]: ...

    async def close(self) -> None: ...


class InProcessExecutor:
    """An adapter on one dedicated thread, so the event loop never blocks on the model.

    One thread also serialises weight loads with forward passes, which the scheduler relies
    on only as a second line of defence (it drains before any load).
    """

    def __init__(self, adapter: ModelEngineServerAdapter) -> None:
        self.adapter = adapter
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def model_info(self) -> ModelInfo:
        return self.adapter.engine.info

    async def _run(self, function, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[Outcome]:
        return await self._run(self.adapter.score, list(requests))

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        return await self._run(self.adapter.engine.load_weights, named_tensors)

    async def weight_specs(self) -> dict[str, WeightSpec]:
        return self.adapter.engine.weight_specs()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Wait (off the event loop, bounded) for a forward still running; a hung one is left
        behind rather than freezing the loop that answers everyone else."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.to_thread(self._pool.shutdown, True)
        except TimeoutError:
            logger.warning("the engine thread did not finish within %.0f s; closing without it", timeout_s)
            self._pool.shutdown(wait=False, cancel_futures=True)
