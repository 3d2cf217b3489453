"""Bearer-token check for admin routes (pause, resume, weight updates).

Both sides are hashed before `hmac.compare_digest`, so the comparison takes the same time
whatever the token's length or how much of it a guess gets right.
"""

from __future__ import annotations

import hashlib
import hmac

from typing import Any, Callable, Iterable

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from model_engine_server.http.errors import Unauthorized, error_response


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(_digest(presented), _digest(expected))


def bearer_problem(authorization: str, expected: str | None) -> str | None:
    """Why an `Authorization` header does not open an admin route, or None when it does (or no
    token is configured)."""
    if expected is None:
        return None
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return "this admin route needs 'Authorization: Bearer <token>'"
    if not token_matches(presented.strip(), expected):
        return "the bearer token does not match"
    return None


async def require_admin(request: Request) -> None:
    """FastAPI dependency: passes when no token is configured or the bearer token matches."""
    problem = bearer_problem(request.headers.get("authorization", ""), request.app.state.admin_token)
    if problem is not None:
        raise Unauthorized(problem)


class AdminTokenGate:
    """ASGI middleware: the token of an admin route is checked from the headers alone, before
    anything reads the body. FastAPI reads and parses a route's JSON body before it runs its
    dependencies, so without this a caller with no token could make the server read and parse
    whatever it sends to `/v1/weights/*`."""

    def __init__(self, app: ASGIApp, admin_paths: Callable[[], frozenset[str]], expected: Callable[[], str | None]) -> None:
        self.app = app
        self.admin_paths = admin_paths
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.admin_paths():
            authorization = Headers(scope=scope).get("authorization", "")
            problem = bearer_problem(authorization, self.expected())
            if problem is not None:
                await error_response(Unauthorized(problem))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def admin_paths(routes: Iterable[Any]) -> frozenset[str]:
    """The paths of the routes that depend on `require_admin` (their own or their router's)."""
    return frozenset(
        route.path for route in routes
        if isinstance(route, APIRoute) and any(d.dependency is require_admin for d in route.dependencies)
    )
