"""The seam every front end talks to: one scheduler in this process, or a manager of replicas.

The HTTP app, the Ray service actor, the in-process client and the trainer-side publisher hold a
`LogProbService` and never learn which one it is, so a feature written once works for all.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Iterable, Protocol, Sequence, runtime_checkable

import torch

from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import ModelEngineError, WorkerFailed
from model_engine_server.protocol import LogProbRequest, LogProbResult

if TYPE_CHECKING:
    from checkpoint_transport.spec import ReceiveReport, TransportSpec


@runtime_checkable
class LogProbService(Protocol):
    """Scoring, its lifecycle, and the weight-update session of `weight_updates.py`.

    Implemented by `ModelEngineServer` (one engine in this process), `replica.ReplicaManager`
    (Ray replicas) and `reference.PolicyWithReference` (what every front end holds). Weight
    methods act on the policy only; every call is a coroutine."""

    async def start(self) -> Any:
        """Ready to serve (replicas reserve devices and build engines on the serving loop)."""
        ...

    async def score(
        self, requests: Sequence[LogProbRequest | dict[str, Any]], timeout_s: float | None = None
    ) -> list[LogProbResult | ModelEngineError]:
        """One entry per request: its result, or the error for that request alone."""
        ...

    async def pause_serving(self) -> None:
        """Stop dispatching; return once in-flight work has finished."""
        ...

    async def resume_serving(self) -> None: ...

    async def get_status(self) -> dict[str, Any]: ...

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None: ...

    # ---------------------------------------------------------------- the weight session
    async def begin_weight_update(self, version: int) -> int:
        """Open the update to `version` and drain; returns how many workers receive a stream.
        Refused at once while another update is open."""
        ...

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> list[str]:
        """Deliver tensors (HF names) into the open update; refused when none is open."""
        ...

    async def receive_weights(self, spec: "TransportSpec", version: int) -> list["ReceiveReport"]:
        """Every worker receives one `checkpoint_transport` stream into the open update."""
        ...

    async def commit_weight_update(self, version: int) -> None:
        """Serve `version` if every worker holds every tensor; else abort and raise the reason."""
        ...

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        """Close the open update (weights partly delivered then refuse to score until a complete
        sync); with `version`, only if the open update is that version's: a caller's late abort
        never closes another caller's update."""
        ...

    async def weight_layout(self) -> tuple[ModelInfo, dict[str, WeightSpec]]:
        """The served model and every tensor name (shape, dtype) a complete update delivers."""
        ...

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> load -> commit in one call; atomic."""
        ...


async def gather_outcomes(calls: Iterable[Awaitable[LogProbResult]]) -> list[LogProbResult | ModelEngineError]:
    """Await per-request calls together: each entry is its result or its own typed error, so one
    failed request never fails the others; anything untyped becomes `WorkerFailed` naming it."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return [
        o if isinstance(o, (LogProbResult, ModelEngineError)) else WorkerFailed(f"{type(o).__name__}: {o}")
        for o in outcomes
    ]
