"""HTTP-only failures and the one place every error becomes a JSON response.

Status codes: 400 malformed or invalid input, 401 missing/wrong admin token, 403 an admin call
the configuration does not allow (transport endpoint, weight folder), 404/405 unknown route or
method, 409 a rejected weight update, 413 body too large, 415 unsupported content type, 422 a
body of the wrong shape, 429 queue full and 503 unavailable (both with `Retry-After`), 504
deadline. A 500 means a bug in the server, never bad input: its text goes to the server log
under an error id, and the caller gets only the id.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_engine_server.errors import InvalidRequest, ModelEngineError, Overloaded
from model_engine_server.http.wire import public_error_wire


class Unauthorized(ModelEngineError):
    code = "unauthorized"
    http_status = 401


class PayloadTooLarge(ModelEngineError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ModelEngineError):
    code = "unsupported_media_type"
    http_status = 415


class ClientGone(Exception):
    """The caller closed its connection before its answer: nothing is sent, its requests are
    withdrawn from the queue, and the call is counted with status 499 (not a server fault)."""

    status = 499


class MalformedEnvelope(InvalidRequest):
    """The body decoded, but it is not `{"requests": [...]}` (wrong shape or types): 422."""

    http_status = 422


def retry_after(error: ModelEngineError, default_s: float) -> float | None:
    """Seconds a client should wait before retrying, for the statuses where retrying helps."""
    if isinstance(error, Overloaded) and error.retry_after_s is not None:
        return error.retry_after_s
    if error.http_status in (429, 503):
        return default_s
    return None


def error_response(error: ModelEngineError, retry_after_default_s: float = 1.0, extra: dict | None = None) -> JSONResponse:
    """`{"error": {"code", "message", ...}}` with the error's status and its headers (a 500:
    `{"code": "internal_error", "message", "error_id"}`, the text logged, not sent)."""
    headers: dict[str, str] = {}
    wait = retry_after(error, retry_after_default_s)
    if wait is not None:
        headers["Retry-After"] = str(max(0, math.ceil(wait)))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body: dict = {"error": public_error_wire(error), **(extra or {})}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


class EnvelopeFrameworkTooLarge:
    """ASGI middleware: a body over a route's `max_body_size` whose `Content-Length` announced it
    is refused by Starlette's own limiter in plain text, outside every exception handler; this
    answers it in the JSON envelope every other error has. Other responses pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replacing = False

        async def send_enveloped(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start" and message["status"] == 413:
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                replacing = content_type.startswith("text/plain")
            if not replacing:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                limit = scope.get(MAX_BODY_SIZE_SCOPE_KEY)
                what = f"exceeds this route's limit of {limit} bytes" if isinstance(limit, int) else "is too large"
                await error_response(PayloadTooLarge(f"the request body {what}"))(scope, receive, send)

        await self.app(scope, receive, send_enveloped)
