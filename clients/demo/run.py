"""Run the demo: make the tiny policy, start the server, run the loop(s), write logs and a plot."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from checkpoint_transport import TransportConfig
from clients.local_client import LocalClient
from clients.publisher import WeightPublisher
from clients.demo.config import DemoConfig
from clients.demo.loop import DemoLoop, Mode, RunResult, StepCallback, write_jsonl
from clients.demo.report import comparison, plot
from model_engine_server.engines.base import EngineSpec
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model

logger = logging.getLogger(__name__)


def make_policy(config: DemoConfig, directory: Path) -> Path:
    shape = TinyModelShape(**config.model.model_dump(), max_position_embeddings=max(256, 2 * (config.prompt_len + config.response_len)))
    return make_tiny_model(directory, shape, seed=config.seed)


async def run_mode(
    config: DemoConfig, model_path: Path, mode: Mode, on_step: StepCallback | None = None, progress: Any = None
) -> RunResult:
    """One loop; in server mode a server over the same initial weights runs beside it."""
    client = publisher = None
    if mode == "server":
        scheduler = SchedulerConfig(max_tokens_per_batch=config.max_tokens_per_batch, max_wait_ms=config.max_wait_ms)
        server = build_local_server(EngineSpec(model_path=str(model_path)), scheduler=scheduler)
        client = LocalClient(server)
        publisher = WeightPublisher(server, TransportConfig(backend="gloo"))
    try:
        return await DemoLoop(config, model_path, mode, client, publisher).run(on_step, progress)
    finally:  # bounded: a teardown that stalls must not keep the demo from reporting
        if publisher is not None:
            await _bounded(publisher.close(), "closing the weight publisher")
        if client is not None:
            await _bounded(client.service.shutdown(), "shutting the server down")


async def _bounded(step: Any, what: str, timeout_s: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        logger.warning("%s took over %.0f s; going on", what, timeout_s)


def run_demo(config: DemoConfig, output_dir: Path, modes: list[Mode], show_progress: bool = True) -> dict[str, RunResult]:
    from tqdm import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = make_policy(config, output_dir / "policy-init")
    log_path = output_dir / "metrics.jsonl"
    log_path.unlink(missing_ok=True)
    results: dict[str, RunResult] = {}
    for mode in modes:
        with tqdm(total=config.steps, desc=mode, disable=not show_progress) as progress:
            results[mode] = asyncio.run(run_mode(config, model_path, mode, progress=progress))
        write_jsonl(log_path, results[mode])
    plot(list(results.values()), output_dir / "demo.png")
    summary = comparison(results)
    (output_dir / "summary.txt").write_text(summary + "\n")
    (output_dir / "config.json").write_text(json.dumps(config.model_dump(), indent=2))
    return results
