"""Where a `WeightPublisher` in another process than the server sends its session calls: a Ray
actor hosting the service (`ActorSyncTarget`) or the server's HTTP admin routes
(`HttpSyncTarget`). Only the session calls travel this way; the buckets go over the transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

from checkpoint_transport.spec import ReceiveReport, TransportSpec
from model_engine_server.errors import ModelEngineError, error_from_wire


class ActorSyncTarget:
    """A Ray actor that exposes the `WeightSyncTarget` methods (specs and reports as dicts), e.g.
    the service actor of `replica.service_actor`, so a trainer rank can publish from another process."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def begin_weight_update(self, version: int) -> int:
        return int(await self.handle.begin_weight_update.remote(version))

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        reports = await self.handle.receive_weights.remote(spec.model_dump(), version)
        return [ReceiveReport.from_dict(r) if isinstance(r, dict) else r for r in reports]

    async def commit_weight_update(self, version: int) -> None:
        await self.handle.commit_weight_update.remote(version)

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self.handle.abort_weight_update.remote(reason, version)

    async def get_status(self) -> dict[str, Any]:
        return await self.handle.get_status.remote()


class HttpSyncTarget:
    """The server's admin routes (`model_engine_server.http.weight_routes`) as a `WeightSyncTarget`,
    plus pause/resume/status; the buckets themselves travel over the transport, not HTTP."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 600.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> Any:
        """A client of the running loop: `update_weights_blocking` runs each sync on a loop of
        its own, and an httpx client's connections belong to the loop that opened them."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(base_url=self._base_url, headers=self._headers, timeout=self._timeout_s)
            self._client_loop = loop
        return self._client

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None, **options: Any) -> Any:
        response = await self._http().request(method, path, json=body, **options)
        payload = response.json() if response.content and is_json(response) else {}
        if response.status_code >= 400:
            error = payload.get("error", payload) if isinstance(payload, dict) else {}
            raise error_from_wire(error) if isinstance(error, dict) and "code" in error else ModelEngineError(
                f"{method} {path} answered {response.status_code}: {response.text[:300]}"
            )
        return payload

    async def begin_weight_update(self, version: int) -> int:
        return int((await self._request("POST", "/v1/weights/begin", {"version": version}))["receivers"])

    async def receive_weights(self, spec: TransportSpec, version: int) -> list[ReceiveReport]:
        # the call lasts the whole transfer, which the server bounds (`weight_update_timeout_s`)
        payload = await self._request("POST", "/v1/weights/receive", {"spec": spec.model_dump(), "version": version},
                                      timeout=None)
        return [ReceiveReport.from_dict(r) for r in payload["reports"]]

    async def commit_weight_update(self, version: int) -> None:
        await self._request("POST", "/v1/weights/commit", {"version": version})

    async def abort_weight_update(self, reason: str, version: int | None = None) -> None:
        await self._request("POST", "/v1/weights/abort", {"reason": reason, "version": version})

    async def pause_serving(self) -> None:
        await self._request("POST", "/v1/pause")

    async def resume_serving(self) -> None:
        await self._request("POST", "/v1/resume")

    async def get_status(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/status")

    async def close(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None


def is_json(response: Any) -> bool:
    """A body to parse: an error page from a proxy in front of the server is not."""
    return response.headers.get("content-type", "").split(";")[0].strip().endswith("json")
