"""uvicorn whose shutdown drains the app's service before it waits for open connections.

uvicorn's own shutdown stops accepting, then waits (up to its graceful time) for open calls and
cuts off whatever is still open with a bare 500. A call held by a pause or an open weight update
never ends by itself, so the service is shut down first (`shut_down_service`): what can still
run finishes, what cannot is answered 503 `shutting_down`. `serve` and `ServerThread` both run
this server, so a test or a notebook stops exactly as a deployment does. A second Ctrl-C
(uvicorn's `force_exit`) stops waiting for the drain, as it stops uvicorn's own waits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from model_engine_server.http.app import shut_down_service

logger = logging.getLogger("model_engine_server.serve")
FORCE_EXIT_POLL_S = 0.1


class DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets: Any = None) -> None:
        drain = asyncio.ensure_future(shut_down_service(self.config.app))
        while not drain.done() and not self.force_exit:
            await asyncio.wait({drain}, timeout=FORCE_EXIT_POLL_S)
        if not drain.done():
            logger.warning("second signal: exiting without waiting for the drain")
            drain.cancel()  # only the wait: the service's own shutdown is shielded, and ends with the process
        await super().shutdown(sockets)
