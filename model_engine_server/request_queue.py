"""The scheduler's waiting room: requests in arrival order, counted in tokens, each with its
own deadline timer. Pure asyncio bookkeeping, no policy: which requests form a batch, and when,
is the scheduler's decision."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from model_engine_server.packing import prompt_key
from model_engine_server.protocol import LogProbRequest, LogProbResult


@dataclass(eq=False)
class Pending:
    """One admitted request: the caller awaits `future`."""

    request: LogProbRequest
    future: asyncio.Future[LogProbResult]
    enqueued_at: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    tokens: int = field(init=False)
    prompt_key: tuple[int, int] | None = field(init=False)  # `packing.prompt_key`

    def __post_init__(self) -> None:
        self.tokens = self.request.num_tokens
        self.prompt_key = prompt_key(self.request.input_ids, self.request.response_start)


class RequestQueue:
    def __init__(self) -> None:
        self._items: deque[Pending] = deque()
        self.tokens = 0

    def push(self, pending: Pending, timeout_s: float, on_expiry: Callable[[Pending, float], None]) -> None:
        """Queue `pending`; `on_expiry(pending, timeout_s)` runs if it is still queued by then."""
        pending.expiry = asyncio.get_running_loop().call_later(timeout_s, on_expiry, pending, timeout_s)
        self._items.append(pending)
        self.tokens += pending.tokens

    def remove(self, pending: Pending) -> bool:
        """Take `pending` out (and stop its timer); False if it was not queued any more."""
        try:
            self._items.remove(pending)
        except ValueError:
            return False
        self.tokens -= pending.tokens
        if pending.expiry:
            pending.expiry.cancel()
        return True

    def take_all(self) -> list[Pending]:
        taken = list(self._items)
        for pending in taken:
            self.remove(pending)
        return taken

    def __iter__(self) -> Iterator[Pending]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
