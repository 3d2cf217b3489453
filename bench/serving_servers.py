"""The serving benchmark's servers: the model served over HTTP in a child process, as `serve`
runs it, and a service that replays stored results (serving without compute, for the
msgpack-against-JSON comparison; `ServerThread` serves it on a thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import uvicorn

from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import InvalidRequest, WeightSyncError
from model_engine_server.http.app import create_app
from model_engine_server.local import build_local_server
from model_engine_server.protocol import LogProbRequest, LogProbResult
from model_engine_server.scheduler import SchedulerConfig

SERVER_START_TIMEOUT_S = 600.0


class _PortReportingServer(uvicorn.Server):
    """Writes the free port it bound to a file, once it accepts connections."""

    def __init__(self, config: uvicorn.Config, port_file: Path) -> None:
        super().__init__(config)
        self.port_file = port_file

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            staging = self.port_file.with_suffix(".tmp")
            staging.write_text(str(self.servers[0].sockets[0].getsockname()[1]))
            staging.rename(self.port_file)  # atomic: the parent reads a whole number or nothing


def serve_model(model_path: str, dtype: str, scheduler_json: str, port_file: str) -> None:
    """The server process: the in-process service and the app as `serve` builds them for one
    device; SIGTERM drains and stops it."""
    scheduler = SchedulerConfig.model_validate_json(scheduler_json)
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    service = build_local_server(EngineSpec(model_path=model_path, dtype=dtype), scheduler=scheduler)
    config = uvicorn.Config(create_app(service, owns_service=True), host="127.0.0.1", port=0,
                            log_config=None, access_log=False, lifespan="on")
    _PortReportingServer(config, Path(port_file)).run()


def _exit_when_orphaned(parent: int) -> None:
    """A parent killed without its cleanup (SIGKILL, a hard timeout) must not leave a server behind."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


@contextmanager
def model_server_process(model_path: str, dtype: str, scheduler: SchedulerConfig) -> Iterator[str]:
    """A child process serving the model over HTTP on 127.0.0.1; yields its URL, stops it after.

    A fresh interpreter (not multiprocessing), so callers need no `__main__` guard."""
    with tempfile.TemporaryDirectory() as folder:
        port_file = Path(folder) / "port"
        code = "import sys; from bench.serving_servers import serve_model; serve_model(*sys.argv[1:])"
        args = [model_path, dtype, scheduler.model_dump_json(), str(port_file)]
        process = subprocess.Popen([sys.executable, "-c", code, *args])
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while not port_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server process did not start (exit code {process.poll()})")
                time.sleep(0.1)
            yield f"http://127.0.0.1:{int(port_file.read_text())}"
        finally:
            process.terminate()  # SIGTERM: uvicorn drains, the app shuts the service down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class ReplayService:
    """A `LogProbService` that answers with results computed earlier: serving without compute."""

    def __init__(self, results: Iterable[LogProbResult]) -> None:
        self.results = {result.request_id: result for result in results}

    async def score(self, requests: Sequence[Any], timeout_s: float | None = None) -> list[Any]:
        parsed = [LogProbRequest.parse(r) for r in requests]
        return [self.results.get(r.request_id) or InvalidRequest(f"no stored result for {r.request_id!r}", "request_id")
                for r in parsed]

    async def pause_serving(self) -> None:
        """Nothing runs, so there is nothing to drain."""

    async def resume_serving(self) -> None:
        """Nothing was stopped."""

    async def update_weights(self, named_tensors: Any, version: int) -> int:
        raise WeightSyncError("a replay service holds no weights")

    async def get_status(self) -> dict[str, Any]:
        return {"weight_version": 0, "paused": False, "accepting": True}

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Holds nothing to release."""
