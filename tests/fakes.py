"""An in-process fake executor for scheduler unit tests (real engines are tested elsewhere).

Its "weights" are one number; every log-prob it returns equals the weights it saw when the
batch started, and it records whether the weights changed while a batch was running.
"""

from __future__ import annotations

import asyncio
from typing import Iterable, Sequence

import numpy as np
import torch

from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import WorkerFailed
from model_engine_server.protocol import LogProbRequest, ScoreOutput


class FakeExecutor:
    def __init__(self, compute_s: float = 0.0, vocab_size: int = 100, max_positions: int = 10_000) -> None:
        self.compute_s = compute_s
        self.weights = 0.0
        self.batches: list[list[LogProbRequest]] = []
        self.running = 0
        self.max_running = 0
        self.mixed_batches = 0
        self.fail_next_batch: Exception | None = None
        self.poison_token: int | None = None  # requests containing it fail alone
        self.started = asyncio.Event()
        self._info = ModelInfo("Fake", vocab_size, max_positions, 8, 1, "float32", "cpu", False)

    def model_info(self) -> ModelInfo:
        return self._info

    async def execute(self, requests: Sequence[LogProbRequest]):
        self.batches.append(list(requests))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        seen = self.weights
        try:
            await asyncio.sleep(self.compute_s)
            if self.fail_next_batch is not None:
                error, self.fail_next_batch = self.fail_next_batch, None
                raise error
        finally:
            self.running -= 1
        if self.weights != seen:
            self.mixed_batches += 1
        return [
            WorkerFailed("poisoned") if self.poison_token in r.input_ids
            else ScoreOutput(log_probs=np.full(r.num_response_tokens, seen, dtype=np.float32))
            for r in requests
        ]

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        names = []
        for name, tensor in named_tensors:
            if name != "w":
                raise ValueError(f"unknown weight {name!r}")
            await asyncio.sleep(0)
            self.weights = float(tensor.item())
            names.append(name)
        return names

    async def weight_specs(self) -> dict[str, WeightSpec]:
        return {"w": WeightSpec((), torch.float32)}

    def participants(self) -> list[str]:
        return ["engine"]

    async def discard_partial_weights(self) -> None:
        pass

    async def close(self) -> None:
        pass


def request(length: int = 10, response_start: int = 1, **kwargs) -> LogProbRequest:
    return LogProbRequest(input_ids=[1] * length, response_start=response_start, **kwargs)
