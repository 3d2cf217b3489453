"""The HTTP routes: thin translations between bodies on the wire and a `LogProbService`.

`POST /v1/logprobs` answers `{"results": [...]}`, one entry per request in order: a result, or
`{"request_id", "error"}` for that request alone. When every request of a call failed, the
call's status is that of the first failure (400, 429, 503, 504) and the body is
`{"error": ..., "results": [...]}`; an empty call is answered with no results.

`POST /v1/update_weights_from_disk` `{"model_path", "weight_version"?}` answers
`{"weight_version": N}` once the checkpoint's weights serve; a folder that does not fit the
served model is a 400 naming the difference, and the old weights go on serving.
"""

from __future__ import annotations

import asyncio

from typing import Any, Awaitable, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from model_engine_server.errors import InvalidRequest, ModelEngineError, Overloaded
from model_engine_server.http.auth import require_admin
from model_engine_server.http.errors import (
    ClientGone,
    MalformedEnvelope,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from model_engine_server.http.schemas import (
    ADMIN_JSON_BODY_BYTES,
    CallEnvelope,
    ErrorResponse,
    HealthResponse,
    LogProbResponse,
    UpdateFromDiskBody,
    WeightUpdateResponse,
)
from model_engine_server.http.wire import (
    JSON_TYPES,
    MSGPACK,
    MSGPACK_TYPES,
    json_safe,
    decode_body,
    decode_weights,
    encode_body,
    is_msgpack,
    media_type,
    public_error_wire,
)
from model_engine_server.protocol import LogProbRequest, outcome_to_wire

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DRAIN_CAP_BYTES = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413

router = APIRouter()
T = TypeVar("T")

ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 429, 503, 504)}
ADMIN_ERRORS = {status: {"model": ErrorResponse} for status in (401, 409, 413, 415)}


def _schema_body(name: str, media_types: tuple[str, ...]) -> dict[str, Any]:
    content = {media: {"schema": {"$ref": f"#/components/schemas/{name}"}} for media in media_types}
    return {"requestBody": {"required": True, "content": content}}


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The body, or `PayloadTooLarge` once it passes `limit_bytes` (announced or streamed)."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit_bytes
    if too_large and int(declared) > DRAIN_CAP_BYTES:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit_bytes:
                too_large = True
                chunks.clear()
                if size > DRAIN_CAP_BYTES:
                    break
            else:
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    if too_large:
        raise PayloadTooLarge(f"body of {size if not declared.isdigit() else declared} bytes exceeds the limit of {limit_bytes}")
    return b"".join(chunks)


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` (scoring) unless the caller disconnects first: then it is cancelled, so its
    requests leave the queue instead of holding queue space until their deadline."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the server reports the caller gone (its body was read to the end before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_content_type(request: Request, allowed: frozenset[str]) -> None:
    media = media_type(request.headers.get("content-type"))
    if media not in allowed:
        raise UnsupportedMediaType(f"content type {media!r} is not accepted here; use one of {', '.join(sorted(m for m in allowed if m))}")


def _wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    if any(media in accept for media in MSGPACK_TYPES):
        return True
    if "application/json" in accept:
        return False
    return is_msgpack(request.headers.get("content-type"))


def _parse_envelope(payload: Any, max_requests: int) -> CallEnvelope:
    if not isinstance(payload, dict):
        raise MalformedEnvelope(f'the body must be an object {{"requests": [...]}}, got {type(payload).__name__}', "body")
    try:
        envelope = CallEnvelope.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise MalformedEnvelope(first["msg"], where) from None
    if len(envelope.requests) > max_requests:
        raise MalformedEnvelope(f"{len(envelope.requests)} requests in one call; the limit is {max_requests}", "requests")
    return envelope


def parse_request(item: Any, index: int) -> LogProbRequest:
    """One request of a call (an unset temperature is resolved by the scheduler at admission)."""
    where = f"requests[{index}]"
    try:
        request = LogProbRequest.parse(item)
    except InvalidRequest as error:
        raise error.within(where) from None
    except Exception as error:  # e.g. an array whose values are not numbers
        raise InvalidRequest(f"{type(error).__name__}: {error}", where) from None
    if request.input_ids and (max(request.input_ids) > INT64_MAX or min(request.input_ids) < INT64_MIN):
        raise InvalidRequest("token ids must fit in 64 bits", f"{where}.input_ids")
    return request


@router.post(
    "/v1/logprobs",
    summary="Score requests: log-probs (and entropy) of each response token",
    response_model=None,
    responses={200: {"model": LogProbResponse, "content": {MSGPACK: {}}}, **ERRORS},
    openapi_extra=_schema_body("LogProbCall", ("application/json", MSGPACK)),
)
async def logprobs(request: Request) -> Response:
    state = request.app.state
    _check_content_type(request, MSGPACK_TYPES | JSON_TYPES)
    body = await read_body(request, state.max_body_bytes)
    envelope = _parse_envelope(decode_body(body, request.headers.get("content-type")), state.max_requests_per_call)
    outcomes: list[Any] = [None] * len(envelope.requests)
    valid: list[tuple[int, LogProbRequest]] = []
    for index, item in enumerate(envelope.requests):
        try:
            valid.append((index, parse_request(item, index)))
        except InvalidRequest as error:
            outcomes[index] = error
            state.metrics.observer.request_rejected(error)
    state.scoring_in_progress += 1
    try:
        scored = await while_connected(request, state.service.score([r for _, r in valid], envelope.timeout_s)) if valid else []
    finally:
        state.scoring_in_progress -= 1
    for (index, _), outcome in zip(valid, scored):
        outcomes[index] = _indexed(outcome, index)
    entries = [
        outcome_to_wire(outcome.with_hint(state.retry_after_s) if isinstance(outcome, Overloaded) else outcome,
                        _request_id(item), error_to_wire=public_error_wire)
        for outcome, item in zip(outcomes, envelope.requests)
    ]
    if outcomes and all(isinstance(o, ModelEngineError) for o in outcomes):
        return error_response(outcomes[0], state.retry_after_s, extra={"results": json_safe(entries)})
    as_msgpack = _wants_msgpack(request)
    return Response(encode_body({"results": entries}, as_msgpack), media_type=MSGPACK if as_msgpack else "application/json")


def _indexed(outcome: Any, index: int) -> Any:
    """Name the request an `InvalidRequest` is about: `input_ids` -> `requests[3].input_ids`."""
    if not isinstance(outcome, InvalidRequest) or type(outcome) is not InvalidRequest:
        return outcome
    return outcome.within(f"requests[{index}]")


def _request_id(item: Any) -> str | None:
    value = item.get("request_id") if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


@router.post("/v1/pause", summary="Stop dispatching; returns once in-flight batches finished", responses=ADMIN_ERRORS,
             dependencies=[Depends(require_admin)])
async def pause(request: Request) -> JSONResponse:
    await request.app.state.service.pause_serving()
    return JSONResponse(json_safe(await _status(request)))


@router.post("/v1/resume", summary="Resume dispatching", responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)])
async def resume(request: Request) -> JSONResponse:
    await request.app.state.service.resume_serving()
    return JSONResponse(json_safe(await _status(request)))


@router.post(
    "/v1/update_weights",
    summary="Load a complete set of weights (msgpack) and serve them as `version`",
    response_model=WeightUpdateResponse,
    responses=ADMIN_ERRORS,
    dependencies=[Depends(require_admin)],
    openapi_extra={"requestBody": {"required": True, "content": {MSGPACK: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def update_weights(request: Request) -> JSONResponse:
    state = request.app.state
    _check_content_type(request, MSGPACK_TYPES)
    body = await read_body(request, state.max_weights_body_bytes)
    version, named = await asyncio.to_thread(decode_weights, body)  # up to GiBs: off the event loop
    served = await state.service.update_weights(named, version)
    return JSONResponse({"weight_version": served})


@router.post(
    "/v1/update_weights_from_disk",
    summary="Serve an HF checkpoint folder's weights as the policy's next version",
    response_model=WeightUpdateResponse,
    responses={400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, **ADMIN_ERRORS, 422: {"model": ErrorResponse}},
    dependencies=[Depends(require_admin)],
    max_body_size=ADMIN_JSON_BODY_BYTES,
)
async def update_weights_from_disk(body: UpdateFromDiskBody, request: Request) -> JSONResponse:
    # a folder outside the app's roots is a 403 before anything is opened (the same answer whether
    # it exists or not); the resolved path (symlinks and `..` followed) is the folder checked and read
    state = request.app.state
    served = await state.service.update_weights_from_disk(body.model_path, body.weight_version, roots=state.weight_roots)
    return JSONResponse({"weight_version": served})


async def _status(request: Request) -> dict[str, Any]:
    state = request.app.state
    status = dict(await state.service.get_status())
    status.setdefault("num_replicas", len(status.get("replicas", ())) or 1)
    status["scoring_calls_in_progress"] = state.scoring_in_progress
    return status


@router.get("/v1/status", summary="Weight version, paused, queue depth, replicas, counters")
async def status(request: Request) -> JSONResponse:
    return JSONResponse(json_safe(await _status(request)))


@router.get("/health", summary="200 while serving; 503 when shutting down or weights are incomplete",
            response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    status = await request.app.state.service.get_status()
    version = status.get("weight_version")
    if not status.get("accepting", True):
        return JSONResponse({"status": "shutting_down", "weight_version": version}, status_code=503)
    if status.get("weights_incomplete"):
        body = {"status": "weights_incomplete", "weight_version": version, "reason": str(status["weights_incomplete"])}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "weight_version": version})


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    state = request.app.state
    return Response(state.metrics.render(await _status(request)), media_type=CONTENT_TYPE_LATEST)
