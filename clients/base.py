"""The one client interface every way of reaching the server shares (Ray handle, HTTP).

A rollout agent loop or a trainer codes against `LogProbClient` and can switch transport by
configuration. Two ways of receiving failures, both on every client:

- `score(requests)` returns one entry per request, in order: its `LogProbResult`, or the typed
  `ModelEngineError` for that request alone (the others are still answered). Use it when a
  batch of trajectories must survive one bad sample.
- `compute_log_probs(requests)` returns `list[LogProbResult]` in request order and raises the
  typed error of the first failed request (in request order) when any failed; the other
  outcomes are attached to the raised error as `error.outcomes`. Use it when any failure means
  the step cannot go on.

A subclass of `BaseLogProbClient` writes `score`, `pause_serving`, `resume_serving`, `get_status`,
`update_weights`, `update_weights_from_disk` and `close`; `compute_log_probs` comes from `score`. `SyncLogProbClient` wraps
any async client for synchronous code (a plain Ray actor, a script), with the same method names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from abc import ABC, abstractmethod
from typing import Any, Awaitable, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from model_engine_server.errors import DeadlineExceeded, ModelEngineError
from model_engine_server.protocol import LogProbRequest, LogProbResult, Outcome

RequestLike = LogProbRequest | dict[str, Any]
T = TypeVar("T")


@runtime_checkable
class LogProbClient(Protocol):
    """What a caller holds; async. See the module docstring for the failure contract."""

    async def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        """One entry per request, in order: its result or its own typed error."""
        ...

    async def compute_log_probs(
        self, requests: Sequence[RequestLike], timeout_s: float | None = None
    ) -> list[LogProbResult]:
        """Results in request order; raises the first failed request's typed error."""
        ...

    async def pause_serving(self) -> None:
        """Stop dispatching on the server; returns once in-flight batches have finished."""
        ...

    async def resume_serving(self) -> None: ...

    async def get_status(self) -> dict[str, Any]:
        """The server's status dict (a manager adds a `replicas` list, one entry per replica)."""
        ...

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Send a complete set of weights (HuggingFace names) to be served as `version`; atomic."""
        ...

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        """Make the server load an HF checkpoint folder (a path on the server's machine) into
        every policy replica as `version` (default: current + 1); returns the version once it
        serves. A folder that does not fit the served model raises `InvalidRequest`, and the
        old weights keep serving."""
        ...

    async def close(self) -> None:
        """Release the client's own resources; never stops the server."""
        ...


def raise_first_error(outcomes: Sequence[Outcome]) -> list[LogProbResult]:
    """The `compute_log_probs` contract on top of per-request outcomes."""
    for outcome in outcomes:
        if isinstance(outcome, ModelEngineError):
            outcome.outcomes = list(outcomes)  # type: ignore[attr-defined]
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


class BaseLogProbClient(ABC):
    """Shared behaviour of the concrete clients: `compute_log_probs` is defined once, here."""

    @abstractmethod
    async def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]: ...

    async def compute_log_probs(
        self, requests: Sequence[RequestLike], timeout_s: float | None = None
    ) -> list[LogProbResult]:
        return raise_first_error(await self.score(requests, timeout_s))

    @abstractmethod
    async def pause_serving(self) -> None: ...

    @abstractmethod
    async def resume_serving(self) -> None: ...

    @abstractmethod
    async def get_status(self) -> dict[str, Any]: ...

    @abstractmethod
    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int: ...

    @abstractmethod
    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int: ...

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> "BaseLogProbClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


CANCEL_GRACE_S = 30.0  # how long a timed-out call may take to unwind (an update's abort) before giving up on it


class SyncLogProbClient:
    """Blocking twin of an async client: the same method names, for code without an event loop.

    The async client runs on a private event loop in a daemon thread owned by this wrapper, so
    it works from plain (non-async) Ray actors and scripts alike; calling it from inside a
    running event loop would block that loop, so async code should hold the async client.
    """

    def __init__(self, client: LogProbClient, call_timeout_s: float | None = None) -> None:
        self.client = client
        self.call_timeout_s = call_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="log-prob-client", daemon=True)
        self._thread.start()

    def _call(self, awaitable: Awaitable[T]) -> T:
        """Run on the private loop. Past `call_timeout_s` the call is cancelled there and waited
        for (a weight update runs its abort), so nothing the caller was told failed lands later."""
        if self._loop.is_closed():
            raise RuntimeError("this client was closed")
        bounded = awaitable if self.call_timeout_s is None else asyncio.wait_for(awaitable, self.call_timeout_s)
        future = asyncio.run_coroutine_threadsafe(bounded, self._loop)  # type: ignore[arg-type]
        outer = None if self.call_timeout_s is None else self.call_timeout_s + CANCEL_GRACE_S
        try:
            return future.result(outer)
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise DeadlineExceeded(
                f"the call did not finish within call_timeout_s={self.call_timeout_s:g} s and was cancelled"
            ) from None

    def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        return self._call(self.client.score(requests, timeout_s))

    def compute_log_probs(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[LogProbResult]:
        return self._call(self.client.compute_log_probs(requests, timeout_s))

    def pause_serving(self) -> None:
        self._call(self.client.pause_serving())

    def resume_serving(self) -> None:
        self._call(self.client.resume_serving())

    def get_status(self) -> dict[str, Any]:
        return self._call(self.client.get_status())

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        return self._call(self.client.update_weights(named_tensors, version))

    def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        return self._call(self.client.update_weights_from_disk(model_path, version))

    def close(self) -> None:
        """Close the async client, then stop and close the private loop; idempotent."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> "SyncLogProbClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
