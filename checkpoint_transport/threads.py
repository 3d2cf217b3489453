"""Blocking transport calls (joining a group, receiving a stream) run on daemon threads, so a
peer that never arrives cannot keep the process, or an event loop's shutdown, waiting. Such a
thread starts on its caller's CUDA device, so an NCCL sender packs on its own rank's GPU."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


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

    device = _callers_cuda_device()

    def body() -> None:
        if device is not None:  # the current CUDA device is per thread: keep the caller's (its rank's GPU)
            torch.cuda.set_device(device)
        try:
            outcome, error = function(*args), None
        except BaseException as caught:  # handed to the awaiting coroutine
            outcome, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    threading.Thread(target=body, name="weight-transport", daemon=True).start()
    return future


def _callers_cuda_device() -> int | None:
    """The calling thread's CUDA device, when this process uses CUDA at all (never initialises it)."""
    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


_DONE = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Items of a blocking iterator (safetensors reads, copies, a trainer's export) produced on a
    worker thread one at a time, so the event loop keeps answering health and metrics meanwhile."""
    while True:
        item = await asyncio.to_thread(next, iterator, _DONE)
        if item is _DONE:
            return
        yield item  # type: ignore[misc]
