"""The seam every front end talks to: one scheduler in this process, or a manager of replicas.

The HTTP app, the Ray-handle client and the trainer-side publisher hold a `LogProbService`
and never learn which one it is, so a feature written once works for both.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Iterable, Protocol, Sequence, runtime_checkable

import torch

from model_engine_server.errors import ModelEngineError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult


@runtime_checkable
class LogProbService(Protocol):
    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[LogProbResult | ModelEngineError]:
        """One entry per request: its result, or the error for that request alone."""
        ...

    async def pause_serving(self) -> None:
        """Stop dispatching; return once in-flight work has finished."""
        ...

    async def resume_serving(self) -> None: ...

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Load a complete set of weights and serve them as `version`; atomic."""
        ...

    async def get_status(self) -> dict[str, Any]: ...

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None: ...


async def gather_outcomes(calls: Iterable[Awaitable[LogProbResult]]) -> list[LogProbResult | ModelEngineError]:
    """Await per-request calls together: each entry is its result or its own typed error, so one
    failed request never fails the others; anything untyped becomes `WorkerFailed` naming it."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return [
        o if isinstance(o, (LogProbResult, ModelEngineError)) else WorkerFailed(f"{type(o).__name__}: {o}")
        for o in outcomes
    ]
