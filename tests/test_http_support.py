"""Helpers for the HTTP tests: a real uvicorn on 127.0.0.1 in a background thread
(`model_engine_server/http/thread_server.py`, re-exported here for the tests that import it
from this module).

(Named test_*.py only to live beside the tests it serves; it defines no tests.)
"""

from __future__ import annotations

from typing import Any

from model_engine_server.http.thread_server import ServerThread

__all__ = ["ServerThread", "local_http_server"]


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
