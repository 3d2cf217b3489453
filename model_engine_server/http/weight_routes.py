"""The weight-update session over HTTP (what `clients.sync_targets.HttpSyncTarget` calls): thin
translations to the app's `LogProbService`.

`create_app` mounts them behind the admin token and sets `app.state.transport_spec_guard` (a
callable that raises to refuse a spec whose endpoint the operator did not allow). The buckets never cross HTTP:
`/v1/weights/receive` makes the server's workers join the transport group the publisher opened
(once the guard allowed its endpoint) and returns their reports.
Errors are `ModelEngineError`s, mapped to status codes by the app's own handler.

  POST /v1/weights/begin   {"version"}        -> {"version", "receivers"}   open the update, drain
  POST /v1/weights/receive {"spec", "version"} -> {"reports": [ReceiveReport...]}
  POST /v1/weights/commit  {"version"}
  POST /v1/weights/abort   {"reason"}
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from checkpoint_transport.spec import TransportSpec
from model_engine_server.http.schemas import ADMIN_JSON_BODY_BYTES
from model_engine_server.service import LogProbService
from model_engine_server.weight_session import MAX_WEIGHT_VERSION


class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0, le=MAX_WEIGHT_VERSION)


class ReceiveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: TransportSpec
    version: int = Field(ge=0, le=MAX_WEIGHT_VERSION)


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str
    version: int | None = Field(default=None, ge=0, le=MAX_WEIGHT_VERSION,
                                description="abort only if the open update is this version's")


def _target(request: Request) -> LogProbService:
    return request.app.state.service


async def _check_endpoint(request: Request, spec: TransportSpec) -> None:
    """Run the app's `transport_spec_guard(spec)` (it raises to refuse) off the event loop, as it
    may resolve names and list the Ray cluster's nodes. An app that set no guard refuses every
    spec: the caller would otherwise choose where the server's workers connect."""
    await asyncio.to_thread(request.app.state.transport_spec_guard, spec)


def weight_sync_router(dependencies: Sequence[Any] = ()) -> APIRouter:
    router = APIRouter(prefix="/v1/weights", tags=["weight sync"], dependencies=list(dependencies),
                       max_body_size=ADMIN_JSON_BODY_BYTES)

    @router.post("/begin", summary="Open the update to `version`: drain every replica; answers the receiver count")
    async def begin(body: VersionBody, request: Request) -> dict[str, int]:
        receivers = await _target(request).begin_weight_update(body.version)
        return {"version": body.version, "receivers": receivers}

    @router.post("/receive", summary="Every worker receives one stream over the given transport")
    async def receive(body: ReceiveBody, request: Request) -> dict[str, list[dict[str, Any]]]:
        await _check_endpoint(request, body.spec)  # before any worker is told to connect anywhere
        reports = await _target(request).receive_weights(body.spec, body.version)
        return {"reports": [r.to_dict() for r in reports]}

    @router.post("/commit", summary="Serve `version` (every worker holds all of it)")
    async def commit(body: VersionBody, request: Request) -> dict[str, int]:
        await _target(request).commit_weight_update(body.version)
        return {"weight_version": body.version}

    @router.post("/abort", summary="Close the open update (of `version`, if given): weights partly delivered "
                 "refuse to score until a complete sync; untouched ones serve on")
    async def abort(body: AbortBody, request: Request) -> dict[str, str]:
        await _target(request).abort_weight_update(body.reason, body.version)
        return {"aborted": body.reason}

    return router
