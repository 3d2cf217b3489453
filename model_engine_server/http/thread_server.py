"""The app served by uvicorn on a background thread, on a free port: `with ServerThread(app) as
server: server.url`.

For a process that has its own work on the main thread and serves beside it (a notebook, a
benchmark, the HTTP tests): the app and its service run on the server thread's own event loop,
exactly as under `serve`, and callers talk to it over real sockets. `serve` itself runs uvicorn
on the main thread, where it owns the signals.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from model_engine_server.http.draining import DrainingServer


class ServerThread:
    """uvicorn on `host`, port 0 (the OS picks a free one); `url` once entered."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0,
                 stop_timeout_s: float = 60.0) -> None:
        config = uvicorn.Config(app, host=host, port=0, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=30)
        self.server = DrainingServer(config)  # stops as `serve` does: the service drains first
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True  # a slow start must not come up later, unowned
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.stop_timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"uvicorn did not stop within {self.stop_timeout_s:g} s")
