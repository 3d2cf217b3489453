"""HTTP clients of the server: `HttpLogProbClient` (async) and `SyncHttpLogProbClient` (blocking).

Both implement the `LogProbClient` interface of `clients/base.py`, so a rollout agent loop or a
trainer swaps them for the Ray-handle client without other changes. Both keep a pool of
connections (httpx), speak msgpack by default (arrays as raw bytes; `wire="json"` for lists),
and give every call a deadline (`timeout_s`, covering retries) that is also sent to the server
as the requests' own deadline, so neither side waits longer than the caller. Each post is
bounded whole, its wait for a pooled connection included: httpx bounds those stages one by one,
so the async client wraps the post in one timeout and the blocking one waits for a connection
on its own semaphore and gives the post what time is left.

What to send, how to read replies and when to retry is written once, as plans of steps
(`clients/http_plan.py`); the two clients here only execute those steps, each with its own
kind of httpx client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Generator, Iterable, Sequence

import httpx
import torch

from clients.base import BaseLogProbClient, Outcome, RequestLike, raise_first_error
from clients.http_plan import HttpPlans, Post, Reply, RetryPolicy, Sleep, Step

__all__ = ["HttpLogProbClient", "RetryPolicy", "SyncHttpLogProbClient"]


# ==================================================================== async
class HttpLogProbClient(BaseLogProbClient):
    """Async client over HTTP with pooled connections. `.sync()` gives the blocking twin."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        wire: str = "msgpack",
        timeout_s: float | None = 600.0,
        connect_timeout_s: float = 10.0,
        admin_token: str | None = None,
        max_connections: int = 32,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._plans = HttpPlans(base_url, wire, timeout_s, retry or RetryPolicy(), admin_token)
        self._settings = dict(wire=wire, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                              admin_token=admin_token, max_connections=max_connections, retry=retry)
        self._http = httpx.AsyncClient(
            base_url=self._plans.base_url,
            headers=self._plans.headers,
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def sync(self) -> "SyncHttpLogProbClient":
        return SyncHttpLogProbClient(self._plans.base_url, **self._settings)  # type: ignore[arg-type]

    async def _run(self, plan: Generator[Step, Reply, Any]) -> Any:
        reply: Reply = None
        try:
            while True:
                step = plan.send(reply)
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    reply = None
                    continue
                try:  # one bound for the whole call: httpx bounds the pool wait and the read each on its own
                    async with asyncio.timeout(step.timeout_s):
                        reply = await self._http.post(
                            step.path, content=step.body, headers={"content-type": step.content_type},
                            timeout=httpx.Timeout(step.timeout_s, connect=self._http.timeout.connect),
                        )
                except httpx.HTTPError as error:
                    reply = error
                except TimeoutError:
                    reply = httpx.ReadTimeout(f"no answer within {step.timeout_s:g} s (connection wait included)")
        except StopIteration as done:
            return done.value

    async def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        return await self._run(self._plans.score_plan(requests, timeout_s))

    async def pause_serving(self) -> None:
        await self._run(self._plans.admin_plan("/v1/pause"))

    async def resume_serving(self) -> None:
        await self._run(self._plans.admin_plan("/v1/resume"))

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        reply = await self._run(self._plans.weights_plan(named_tensors, version))
        return int(reply["weight_version"])

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        reply = await self._run(self._plans.from_disk_plan(model_path, version))
        return int(reply["weight_version"])

    async def get_status(self) -> dict[str, Any]:
        return (await self._get("/v1/status")).json()

    async def health(self) -> dict[str, Any]:
        """`{"status": "ok" | "shutting_down" | "weights_incomplete", ...}`; never raises on 503."""
        return (await self._get("/health", ok_statuses=(200, 503))).json()

    async def metrics(self) -> str:
        return (await self._get("/metrics")).text

    async def _get(self, path: str, ok_statuses: tuple[int, ...] = (200,)) -> httpx.Response:
        try:
            response = await self._http.get(path, timeout=httpx.Timeout(self._plans.timeout_s, connect=self._http.timeout.connect))
        except httpx.HTTPError as error:
            raise self._plans.get_error(error, path) from None
        if response.status_code not in ok_statuses:
            raise self._plans.get_error(response, path)
        return response

    async def close(self) -> None:
        await self._http.aclose()


# ==================================================================== blocking
class SyncHttpLogProbClient:
    """The same client for code without an event loop (scripts, plain Ray actors)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        wire: str = "msgpack",
        timeout_s: float | None = 600.0,
        connect_timeout_s: float = 10.0,
        admin_token: str | None = None,
        max_connections: int = 32,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._plans = HttpPlans(base_url, wire, timeout_s, retry or RetryPolicy(), admin_token)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._http = httpx.Client(
            base_url=self._plans.base_url,
            headers=self._plans.headers,
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def _run(self, plan: Generator[Step, Reply, Any]) -> Any:
        reply: Reply = None
        try:
            while True:
                step = plan.send(reply)
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    reply = None
                    continue
                reply = self._post_within(step)
        except StopIteration as done:
            return done.value

    def _post_within(self, step: Post) -> Reply:
        """Post with one bound for the wait for a connection and the answer together.

        httpx's blocking client bounds its pool wait and each read separately, so the wait for
        a free connection happens here instead, on a semaphore as wide as the pool, and the
        post gets what is left of the step's time."""
        started = time.monotonic()
        if step.timeout_s is None:
            self._slots.acquire()  # no deadline: wait as long as it takes
        elif not self._slots.acquire(timeout=step.timeout_s):
            return httpx.PoolTimeout(f"no connection free within {step.timeout_s:g} s")
        try:
            left = None if step.timeout_s is None else max(step.timeout_s - (time.monotonic() - started), 1e-3)
            connect = self._http.timeout.connect
            return self._http.post(
                step.path, content=step.body, headers={"content-type": step.content_type},
                timeout=httpx.Timeout(left, connect=connect if left is None or connect is None else min(connect, left)),
            )
        except httpx.HTTPError as error:
            return error
        finally:
            self._slots.release()

    def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        return self._run(self._plans.score_plan(requests, timeout_s))

    def compute_log_probs(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Any]:
        return raise_first_error(self.score(requests, timeout_s))

    def pause_serving(self) -> None:
        self._run(self._plans.admin_plan("/v1/pause"))

    def resume_serving(self) -> None:
        self._run(self._plans.admin_plan("/v1/resume"))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        return int(self._run(self._plans.weights_plan(named_tensors, version))["weight_version"])

    def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        return int(self._run(self._plans.from_disk_plan(model_path, version))["weight_version"])

    def get_status(self) -> dict[str, Any]:
        return self._get("/v1/status").json()

    def health(self) -> dict[str, Any]:
        return self._get("/health", ok_statuses=(200, 503)).json()

    def metrics(self) -> str:
        return self._get("/metrics").text

    def _get(self, path: str, ok_statuses: tuple[int, ...] = (200,)) -> httpx.Response:
        try:
            response = self._http.get(path, timeout=httpx.Timeout(self._plans.timeout_s, connect=self._http.timeout.connect))
        except httpx.HTTPError as error:
            raise self._plans.get_error(error, path) from None
        if response.status_code not in ok_statuses:
            raise self._plans.get_error(response, path)
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "SyncHttpLogProbClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
