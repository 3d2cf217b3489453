"""The HTTP app served from inside an async Ray actor's event loop, beside the service it fronts.

uvicorn runs as a task of the actor's loop. The socket is bound here first, so a port in use
is an `OSError` the caller sees (uvicorn would exit the process instead), and signals stay with
the process that started the actor: uvicorn installs no handlers off the main thread.
"""

from __future__ import annotations

import asyncio
import math
import socket
from typing import Any

STARTUP_TIMEOUT_S = 60.0


class HttpInActor:
    """One uvicorn server over `app` on this event loop; `start`, then `stop` once."""

    def __init__(self, app: Any, graceful_shutdown_s: float) -> None:
        self.app = app
        self.graceful_shutdown_s = graceful_shutdown_s
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        bound_host, bound_port = sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=math.ceil(self.graceful_shutdown_s))
        self._server = uvicorn.Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                while not self._server.started:
                    if self._task.done():  # it failed before serving: its error, not a wait
                        self._task.result()
                        raise RuntimeError("the HTTP server stopped before it started serving")
                    await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            sock.close()
            raise
        return bound_host, bound_port

    async def stop(self) -> None:
        """Stop accepting, let open calls finish (up to the graceful time), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None
