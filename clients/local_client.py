"""A `LogProbClient` over a service in this very process (demo, tests, a trainer hosting the server).

Same interface as the Ray and HTTP clients, so code written against it moves to a remote
server by swapping the client.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from clients.base import BaseLogProbClient, Outcome, RequestLike
from model_engine_server.reference import front
from model_engine_server.service import LogProbService


class LocalClient(BaseLogProbClient):
    def __init__(self, service: LogProbService) -> None:
        self.service = front(service)  # the composite: disk updates and ref mode like every front end

    async def score(self, requests: Sequence[RequestLike], timeout_s: float | None = None) -> list[Outcome]:
        return await self.service.score(requests, timeout_s)

    async def pause_serving(self) -> None:
        await self.service.pause_serving()

    async def resume_serving(self) -> None:
        await self.service.resume_serving()

    async def get_status(self) -> dict[str, Any]:
        return await self.service.get_status()

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        return await self.service.update_weights(named_tensors, version)

    async def update_weights_from_disk(self, model_path: str, version: int | None = None) -> int:
        return await self.service.update_weights_from_disk(model_path, version)
