"""Helpers for the HTTP tests: a real uvicorn on 127.0.0.1 in a background thread.

(Named test_*.py only to live beside the tests it serves; it defines no tests.)
The app and its service run on the server thread's own event loop, exactly as under `serve`;
tests talk to it over real sockets.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class ServerThread:
    """`with ServerThread(app) as server: server.url` — uvicorn on a free port of 127.0.0.1."""

    def __init__(self, app: Any, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> None:
        config = uvicorn.Config(app, host=host, port=0, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def local_http_server(model_path: str, default_temperature: float | None = None) -> ServerThread:
    """`with local_http_server(path) as server:` the real app over an in-process HF server of
    the checkpoint at `path` (its tokenizer lent to /v1/completions), as the completions,
    tokenizer and lm-eval tests use it."""
    from model_engine_server.config import HttpConfig
    from model_engine_server.engines.base import EngineSpec
    from model_engine_server.http.app import create_app
    from model_engine_server.http.metrics import ServerMetrics
    from model_engine_server.local import build_local_server
    from model_engine_server.scheduler import SchedulerConfig

    settings: dict[str, Any] = dict(max_tokens_per_batch=2048, max_queued_tokens=8192, request_timeout_s=60)
    if default_temperature is not None:
        settings["default_temperature"] = default_temperature
    service = build_local_server(EngineSpec(model_path=model_path), scheduler=SchedulerConfig(**settings))
    return ServerThread(create_app(service, HttpConfig(), ServerMetrics(), owns_service=True, model_path=model_path))
