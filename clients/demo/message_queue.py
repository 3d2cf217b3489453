"""The bounded queue between rollout and trainer, with a staleness bound.

Items are whole groups (GRPO needs every sample of a prompt). A group generated more than
`staleness_limit` versions before the trainer's current version is stale: dropped (counted)
or kept, as the config says. `put` waits when the queue is full, which is what slows the
rollouter down when the trainer falls behind.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

Group = list[dict[str, Any]]


@dataclass
class Batch:
    groups: list[Group]
    dropped_stale: int
    wait_s: float


class MessageQueue:
    def __init__(self, max_groups: int, staleness_limit: int, stale_policy: Literal["drop", "keep"]) -> None:
        self._queue: asyncio.Queue[Group] = asyncio.Queue(maxsize=max_groups)
        self.staleness_limit = staleness_limit
        self.stale_policy = stale_policy
        self.dropped_total = 0

    async def put(self, group: Group) -> None:
        await self._queue.put(group)

    def qsize(self) -> int:
        return self._queue.qsize()

    def is_stale(self, group: Group, trainer_version: int) -> bool:
        return trainer_version - group[0]["rollout_version"] > self.staleness_limit

    async def get_batch(self, num_groups: int, trainer_version: int) -> Batch:
        loop = asyncio.get_running_loop()
        started = loop.time()
        groups: list[Group] = []
        dropped = 0
        while len(groups) < num_groups:
            group = await self._queue.get()
            if self.stale_policy == "drop" and self.is_stale(group, trainer_version):
                dropped += 1
                continue
            groups.append(group)
        self.dropped_total += dropped
        return Batch(groups, dropped, loop.time() - started)
