"""`create_app(service, ...)`: the FastAPI app over any `LogProbService`.

The app holds only the service seam, so the same app serves the in-process scheduler and the
replica manager. It translates and delegates; every error becomes JSON in `errors.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_engine_server.config import HttpConfig
from model_engine_server.errors import ModelEngineError
from model_engine_server.http.admin_policy import transport_spec_guard
from model_engine_server.http.errors import ClientGone, EnvelopeFrameworkTooLarge, MalformedEnvelope, error_response
from model_engine_server.http.auth import AdminTokenGate, admin_paths, require_admin
from model_engine_server.http.completions_routes import completions_router
from model_engine_server.http.completions_schema import CompletionsBody
from model_engine_server.http.tokens import TokenText
from model_engine_server.http.metrics import ServerMetrics
from model_engine_server.http.routes import router
from model_engine_server.http.weight_routes import weight_sync_router
from model_engine_server.reference import front
from model_engine_server.http.schemas import LogProbCall
from model_engine_server.http.wire import internal_error_wire
from model_engine_server.service import LogProbService

logger = logging.getLogger(__name__)

MB = 1 << 20


def create_app(
    service: LogProbService,
    http: HttpConfig | None = None,
    metrics: ServerMetrics | None = None,
    owns_service: bool = False,
    admin_token: str | None = None,
    allowed_endpoints: Sequence[str] = (),
    weight_roots: Sequence[str] | None = None,
    model_path: str | None = None,
    served_model_name: str | None = None,
) -> FastAPI:
    """Build the app. `metrics` should be the one whose observer the service's scheduler
    reports to (see `launch.build_service`); `owns_service` shuts the service down (draining
    accepted requests) when the app stops. `admin_token` overrides `http`'s token.
    The `/v1/weights/*` admin routes (what `clients.sync_targets.HttpSyncTarget` drives) act on the
    service's weight session; a bare service is held as a policy-only `PolicyWithReference`.
    `allowed_endpoints` (hosts, CIDRs) are the transport endpoints `/v1/weights/receive` may
    join besides loopback and the server's Ray nodes (`admin_policy`). `weight_roots` are the
    folders `/v1/update_weights_from_disk` may read; None reads anywhere, for embedding
    callers and tests (`serve` always passes roots: `launch.build_serving`). `model_path` (the
    served checkpoint folder) lends its tokenizer, if it has one, to the OpenAI-compatible
    `/v1/completions`, and names the model in `/v1/models` unless `served_model_name` does (as
    vLLM: the path as given); with neither, the model is called "model-engine-server"."""
    http = http or HttpConfig()
    metrics = metrics or ServerMetrics()
    service = front(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_service:  # replicas start on the serving loop (Ray actors, placement)
            await service.start()
        yield
        if owns_service:
            await shut_down_service(app)

    app = FastAPI(
        title="Model Engine Server",
        summary="Log-probs and entropy of finished trajectories, scored by the training engine's model code",
        version="0.1.0",
        lifespan=lifespan,
    )
    state = app.state
    state.service = service
    state.metrics = metrics
    state.admin_token = admin_token if admin_token is not None else http.token()
    state.max_body_bytes = int(http.max_body_mb * MB)
    state.max_weights_body_bytes = int(http.max_weights_body_mb * MB)
    state.max_requests_per_call = http.max_requests_per_call
    state.retry_after_s = http.retry_after_s
    state.scoring_in_progress = 0
    state.allowed_endpoints = tuple(allowed_endpoints)
    state.transport_spec_guard = transport_spec_guard(state.allowed_endpoints)
    state.weight_roots = None if weight_roots is None else tuple(str(root) for root in weight_roots)
    state.model_name = served_model_name or model_path or "model-engine-server"
    state.model_root = model_path or state.model_name
    state.token_text = TokenText(model_path)
    state.created = int(time.time())
    state.graceful_shutdown_s = http.graceful_shutdown_s
    state.owns_service = owns_service
    state.service_shutdown = None  # the one shutdown task, whoever starts it first
    weights_router = weight_sync_router(dependencies=[Depends(require_admin)])
    routers = (router, completions_router, weights_router)
    for each in routers:
        app.include_router(each)
    gated = admin_paths(route for each in routers for route in each.routes)
    app.add_middleware(AdminTokenGate, admin_paths=lambda: gated, expected=lambda: state.admin_token)
    app.add_middleware(EnvelopeFrameworkTooLarge)
    _install_error_handlers(app, http.retry_after_s)
    _install_http_metrics(app, metrics)
    _install_openapi(app)
    return app


async def shut_down_service(app: FastAPI) -> None:
    """Drain and shut the service down, once however often it is called: `serve` calls it when a
    signal arrives, before uvicorn waits for open connections, so requests that cannot run any
    more (queued behind a pause or an open weight update) are answered 503 `shutting_down` rather
    than cut off when that wait runs out; the lifespan's exit calls it again."""
    state = app.state
    if not state.owns_service:  # an embedding caller shuts its service down itself
        return
    if state.service_shutdown is None:
        logger.info("draining: finishing accepted requests, then shutting the service down")
        state.service_shutdown = asyncio.ensure_future(
            state.service.shutdown(drain=True, timeout_s=state.graceful_shutdown_s))
        state.service_shutdown.add_done_callback(lambda _: logger.info("service shut down"))
    await asyncio.shield(state.service_shutdown)


def _install_error_handlers(app: FastAPI, retry_after_s: float) -> None:
    @app.exception_handler(ModelEngineError)
    async def engine_error(request: Request, error: ModelEngineError) -> JSONResponse:
        return error_response(error, retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        return error_response(MalformedEnvelope(str(first.get("msg", "invalid input")), where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        body = {"error": {"code": codes.get(error.status_code, "http_error"), "message": str(error.detail)}}
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        logger.debug("%s %s: the client disconnected before its answer", request.method, request.url.path)
        return Response(status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # the text goes to the log under an id, never to the caller (it can name paths, hosts, values)
        body = {"error": internal_error_wire(error, f"{request.method} {request.url.path}")}
        return JSONResponse(body, status_code=500)


def _install_http_metrics(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        metrics.http_in_progress.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.http_in_progress.dec()
            route = request.scope.get("route")
            metrics.http_requests.labels(route=getattr(route, "path", "unmatched"), status=str(status)).inc()


def _install_openapi(app: FastAPI) -> None:
    """Routes read raw bodies (JSON or msgpack), so their request schemas are added here."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        call_schema = LogProbCall.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(call_schema.pop("$defs", {}))
        components["LogProbCall"] = call_schema
        completions_schema = CompletionsBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(completions_schema.pop("$defs", {}))
        components["CompletionsBody"] = completions_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["create_app"]
