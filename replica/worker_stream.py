"""A worker's side of a stream someone else drives into it (verl's checkpoint engine).

A checkpoint engine's `receive_weights(global_steps)` is an async iterator of `(hf_name, tensor)`
whose tensors may be views into the engine's receive buffers, valid only until the next item is
asked for. So each tensor is loaded into the model the moment it arrives, and the stream is always
consumed to its end, even after the engine rejected a tensor or the worker was told not to load:
every receiver takes part in the same collective, so one that stopped early would stall the
sender and every other worker until their timeouts.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterable, Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import RayTaskError

from checkpoint_transport.spec import ReceiveReport

Load = Callable[[Iterable[tuple[str, torch.Tensor]]], Sequence[str]]


def load_stream(stream: AsyncIterable[tuple[str, torch.Tensor]], load: Load | None, rank: int, version: int) -> ReceiveReport:
    """Consume `stream` to its end on a fresh event loop (the worker's method runs on a plain
    thread), loading each tensor with `load` (none when `load` is None); the report says what
    was loaded and the first problem: the engine rejecting a tensor, or the stream breaking."""
    return asyncio.run(_consume(stream, load, rank, version))


async def _consume(stream: AsyncIterable[tuple[str, torch.Tensor]], load: Load | None, rank: int, version: int) -> ReceiveReport:
    report = ReceiveReport(rank=rank, version=version)
    loaded: list[str] = []
    try:
        async for name, tensor in stream:
            report.tensors += 1
            report.bytes += tensor.numel() * tensor.element_size()
            if load is None or report.error is not None:
                continue  # keep taking part in the collective; load nothing more
            try:
                loaded += load([(name, tensor)])
            except Exception as error:  # the engine refused it (name, shape, dtype): the sync is incomplete
                report.error = f"the engine rejected {name!r}: {type(error).__name__}: {error}"
    except Exception as error:  # the channel broke: the sender died, a peer left, a timeout
        report.error = report.error or (
            f"the stream broke after {report.tensors} tensors: {type(error).__name__}: {error}"
        )
    report.names_loaded = sorted(set(loaded))
    report.ok = report.error is None
    return report


def coordinator_call(ref: Any) -> Any:
    """Wait for a call on the coordinator (the service actor) and raise its own error, not
    Ray's wrapper, so verl's trainer reads the server's reason."""
    try:
        return ray.get(ref)
    except RayTaskError as error:
        if error.cause is not None:
            raise error.cause from None
        raise
