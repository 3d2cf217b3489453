"""uvicorn whose shutdown drains the app's service before it waits for open connections.

uvicorn's own shutdown stops accepting, then waits (up to its graceful time) for open calls and
cuts off whatever is still open with a bare 500. A call held by a pause or an open weight update
never ends by itself, so the service is shut down first (`shut_down_service`): what can still
run finishes, what cannot is answered 503 `shutting_down`. `serve` and `ServerThread` both run
this server, so a test or a notebook stops exactly as a deployment does.
"""

from __future__ import annotations

from typing import Any

import uvicorn

from model_engine_server.http.app import shut_down_service


class DrainingServer(uvicorn.Server):
    async def shutdown(self, sockets: Any = None) -> None:
        await shut_down_service(self.config.app)
        await super().shutdown(sockets)
