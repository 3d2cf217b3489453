"""Admin routes that expose a `WeightSyncTarget` over HTTP (what `clients.publisher.HttpSyncTarget` calls).

Mount with `app.include_router(weight_sync_router(), dependencies=[Depends(require_admin)])` and
set `app.state.weight_sync_target`. The buckets never cross HTTP: `/v1/weights/receive` makes
the server's workers join the transport group the publisher opened and returns their reports.
Errors are `ModelEngineError`s, mapped to status codes by the app's own handler.

  GET  /v1/weights/receivers -> {"receivers": n}
  POST /v1/weights/begin   {"version"}          drain for the version
  POST /v1/weights/receive {"spec", "version"} -> {"reports": [ReceiveReport...]}
  POST /v1/weights/commit  {"version"}
  POST /v1/weights/abort   {"reason"}
"""

from __future__ import annotations

from typing import Any, Sequence

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from checkpoint_transport.spec import TransportSpec
from checkpoint_transport.targets import WeightSyncTarget


class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)


class ReceiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: TransportSpec
    version: int = Field(ge=0)


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str


def _target(request: Request) -> WeightSyncTarget:
    return request.app.state.weight_sync_target


def weight_sync_router(dependencies: Sequence[Any] = ()) -> APIRouter:
    router = APIRouter(prefix="/v1/weights", tags=["weight sync"], dependencies=list(dependencies))

    @router.get("/receivers", summary="How many workers receive each weight stream")
    async def receivers(request: Request) -> dict[str, int]:
        return {"receivers": await _target(request).receiver_count()}

    @router.post("/begin", summary="Drain every replica for a weight update to `version`")
    async def begin(body: VersionBody, request: Request) -> dict[str, int]:
        await _target(request).begin_weight_update(body.version)
        return {"version": body.version}

    @router.post("/receive", summary="Every worker receives one stream over the given transport")
    async def receive(body: ReceiveBody, request: Request) -> dict[str, list[dict[str, Any]]]:
        reports = await _target(request).receive_weights(body.spec, body.version)
        return {"reports": [r.to_dict() for r in reports]}

    @router.post("/commit", summary="Serve `version` (every worker holds all of it)")
    async def commit(body: VersionBody, request: Request) -> dict[str, int]:
        await _target(request).commit_weight_update(body.version)
        return {"weight_version": body.version}

    @router.post("/abort", summary="Keep the version; refuse to score until a complete sync")
    async def abort(body: AbortBody, request: Request) -> dict[str, str]:
        await _target(request).abort_weight_update(body.reason)
        return {"aborted": body.reason}

    return router
