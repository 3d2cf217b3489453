"""`RayLogProbClient`: the `LogProbClient` over a Ray actor handle of the server
(`replica.service_actor.LogProbServiceActor`), usable from any Ray actor or driver.

Requests travel as Ray objects; results come back as wire dicts (numpy arrays, no copies) and
are rebuilt into `LogProbResult` / typed errors exactly as the HTTP client rebuilds them. A
service actor that is gone surfaces as `WorkerFailed`; a call that outlives `call_timeout_s`
as `DeadlineExceeded`. Requests the server refuses for now are retried as over HTTP.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Iterable, Sequence, TypeVar

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from checkpoint_transport.bucket import group_into_host_buckets
from checkpoint_transport.spec import DEFAULT_BUCKET_BYTES
from checkpoint_transport.threads import iterate_in_thread
from clients.base import BaseLogProbClient, Outcome, RequestLike, SyncLogProbClient
from clients.retry import RESPONSE_GRACE_S, Deadline, RetryPolicy, entries_to_resend
from model_engine_server.errors import DeadlineExceeded, InvalidRequest, ModelEngineError, WeightSyncError, WorkerFailed
from model_engine_server.protocol import outcome_from_wire
from replica.service_actor import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE

T = TypeVar("T")


class RayLogProbClient(BaseLogProbClient):
    """Async client over a service actor handle; `.sync()` gives the blocking twin."""

    def __init__(
        self,
        handle: Any,
        call_timeout_s: float | None = None,
        weight_bucket_mb: int = DEFAULT_BUCKET_BYTES >> 20,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.handle = handle
        self.call_timeout_s = call_timeout_s
        self.weight_bucket_bytes = weight_bucket_mb << 20
        self.retry = retry or RetryPolicy()

    @classmethod
    def from_name(cls, name: str = DEFAULT_ACTOR_NAME, namespace: str | None = DEFAULT_NAMESPACE,
                  **kwargs: Any) -> "RayLogProbClient":
        """Find the named service actor (started elsewhere, e.g. by `serve`), by default where
        `serve` and `start_service_actor` create it; namespace None: the caller's."""
        return cls(ray.get_actor(name, namespace=namespace), **kwargs)

    def sync(self) -> SyncLogProbClient:
        return SyncLogProbClient(self)

    async def _call(self, ref: Awaitable[T], what: str, timeout_s: float | None = None, cancel_on_give_up: bool = False) -> T:
        """Await one actor call. With `cancel_on_give_up`, a caller that gives up (timeout or
        cancel) cancels the task on the actor too: scoring requests then leave the server's
        queue instead of holding its bound (weight calls are not cut midway: a failed one is
        aborted explicitly)."""
        timeout = timeout_s if timeout_s is not None else self.call_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await _await(ref)
        except TimeoutError:
            if cancel_on_give_up:
                _cancel_quietly(ref)
            raise DeadlineExceeded(f"{what}: no answer from the service actor within {timeout:g} s") from None
        except asyncio.CancelledError:
            if cancel_on_give_up:
                _cancel_quietly(ref)
            raise
        except RayActorError as error:
            raise WorkerFailed(f"{what}: the service actor is gone ({type(error).__name__})") from None
        except RayTaskError as error:
            cause = error.cause
            if isinstance(cause, ModelEngineError):
                raise cause from None
            raise WorkerFailed(f"{what}: {type(cause).__name__}: {cause}") from None

    async def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        """One outcome per request; those answered `overloaded` / `shutting_down` are sent again
        as the HTTP client sends them (`clients/retry.py`), within `timeout_s`."""
        deadline = Deadline(timeout_s if timeout_s is not None else self.call_timeout_s)
        outcomes: list[Outcome | None] = [None] * len(requests)
        pending, attempt = list(range(len(requests))), 0
        while pending:
            remaining = deadline.remaining()  # a resend waking at its deadline still sends a positive one
            answers = await self._score_once([requests[i] for i in pending], None if remaining is None else max(remaining, 1e-3))
            for index, answer in zip(pending, answers):
                outcomes[index] = answer
            pending, delay = entries_to_resend(outcomes, pending, self.retry, attempt, deadline)
            if delay is None:
                break
            await asyncio.sleep(delay)
            attempt += 1
        return outcomes  # type: ignore[return-value]

    async def _score_once(self, requests: Sequence[RequestLike], timeout_s: float | None) -> list[Outcome]:
        # the request deadline is the server's; the call itself may take a little longer
        call_timeout = None if timeout_s is None else timeout_s + RESPONSE_GRACE_S
        payloads = await self._call(self.handle.score.remote(list(requests), timeout_s), "score", call_timeout,
                                    cancel_on_give_up=True)
        return [outcome_from_wire(p) for p in payloads]

    async def pause_serving(self) -> None:
        await self._call(self.handle.pause_serving.remote(), "pause")

    async def resume_serving(self) -> None:
        await self._call(self.handle.resume_serving.remote(), "resume")

    async def get_status(self) -> dict[str, Any]:
        return await self._call(self.handle.get_status.remote(), "status")

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """begin -> one call per bucket (each put in Ray's store by this caller) -> commit;
        any failure aborts the update on the server (it then refuses to score until a
        complete sync lands) and raises."""
        try:
            await self._call(self.handle.begin_weight_update.remote(version), "begin_weight_update")
        except (WeightSyncError, InvalidRequest):  # refused: nothing to undo, maybe someone else's update
            raise
        except BaseException as error:  # timed out or cancelled while the server drains: undo it there
            await self._abort_quietly(f"client: begin of version {version} interrupted: {error!r}", version)
            raise
        try:
            buckets = group_into_host_buckets(named_tensors, self.weight_bucket_bytes)
            async for bucket in iterate_in_thread(buckets):  # the caller's export runs off its event loop
                # nested in a list so Ray passes the reference on: workers fetch the tensors
                # from this caller's object store, never through the service actor
                bucket_ref = await asyncio.to_thread(ray.put, bucket)
                await self._call(self.handle.load_weights.remote([bucket_ref], version), "load_weights")
            await self._call(self.handle.commit_weight_update.remote(version), "commit_weight_update")
        except BaseException as error:
            await self._abort_quietly(f"client: {error}", version)
            if isinstance(error, ModelEngineError) or not isinstance(error, Exception):
                raise
            raise WeightSyncError(f"{type(error).__name__}: {error}") from error
        return version

    async def _abort_quietly(self, reason: str, version: int) -> None:
        try:
            await asyncio.shield(self._call(self.handle.abort_weight_update.remote(reason, version), "abort_weight_update"))
        except ModelEngineError:
            pass  # the server is gone or already aborted; the original error says why

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        """The service actor reads the folder (a path on ITS node), checks it fits, then loads
        it into every replica; the tensors never pass through this caller."""
        served = await self._call(self.handle.update_weights_from_disk.remote(str(model_path), version),
                                  "update_weights_from_disk")
        return int(served)


async def _await(ref: Awaitable[T]) -> T:
    return await ref


def _cancel_quietly(ref: Any) -> None:
    """Cancel the actor task behind `ref` (already finished or gone: nothing to do)."""
    if isinstance(ref, ray.ObjectRef):
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - best effort: the server's own deadline still applies
            pass
