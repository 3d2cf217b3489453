"""Bearer-token check for admin routes (pause, resume, weight updates).

Both sides are hashed before `hmac.compare_digest`, so the comparison takes the same time
whatever the token's length or how much of it a guess gets right.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from model_engine_server.http.errors import Unauthorized


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(_digest(presented), _digest(expected))


async def require_admin(request: Request) -> None:
    """FastAPI dependency: passes when no token is configured or the bearer token matches."""
    expected: str | None = request.app.state.admin_token
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("this admin route needs 'Authorization: Bearer <token>'")
    if not token_matches(presented.strip(), expected):
        raise Unauthorized("the bearer token does not match")
