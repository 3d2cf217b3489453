"""The scheduler's waiting room: requests in arrival order, counted in tokens, each with its
own deadline timer. Pure asyncio bookkeeping, no policy: which requests form a batch, and when,
is the scheduler's decision."""

from __future__ import annotations

import asyncio
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from model_engine_server.errors import InvalidRequest
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


def wait_limit_s(timeout_s: float | None, request_timeout_s: float) -> float:
    """How long a request may wait: the caller's `timeout_s` can shorten the server's
    `request_timeout_s`, never extend it (a huge one would hold queue space for good)."""
    if timeout_s is None:
        return request_timeout_s
    try:
        seconds = float(timeout_s) if isinstance(timeout_s, numbers.Real) and not isinstance(timeout_s, bool) else math.nan
    except OverflowError:  # an integer too large for a float: longer than any limit
        seconds = math.inf
    if not seconds > 0 or math.isnan(seconds):
        raise InvalidRequest(f"must be a positive number of seconds, got {timeout_s!r}", "timeout_s")
    return min(seconds, request_timeout_s)


class RequestQueue:
    """Admitted requests in arrival order. Removal is O(1) (a caller that leaves, an expiry, a
    launch), and requests waiting for a weight version the server does not hold yet are parked
    apart, so forming a batch does not step over them again and again."""

    def __init__(self) -> None:
        self._ready: dict[Pending, None] = {}  # insertion-ordered: arrival order
        self._parked: dict[Pending, None] = {}  # min_weight_version above the version last asked for
        self._parked_below = 0  # the version `eligible` last ran with
        self.tokens = 0

    def push(self, pending: Pending, timeout_s: float, on_expiry: Callable[[Pending, float], None]) -> None:
        """Queue `pending`; `on_expiry(pending, timeout_s)` runs if it is still queued by then."""
        pending.expiry = asyncio.get_running_loop().call_later(timeout_s, on_expiry, pending, timeout_s)
        (self._parked if _waits_beyond(pending, self._parked_below) else self._ready)[pending] = None
        self.tokens += pending.tokens

    def remove(self, pending: Pending) -> bool:
        """Take `pending` out (and stop its timer); False if it was not queued any more."""
        if self._ready.pop(pending, _ABSENT) is _ABSENT and self._parked.pop(pending, _ABSENT) is _ABSENT:
            return False
        self.tokens -= pending.tokens
        if pending.expiry:
            pending.expiry.cancel()
        return True

    def eligible(self, version: int) -> Iterator[Pending]:
        """The requests that can run under weight `version` (the server's, which only grows), in
        arrival order. Requests waiting for a later version stay parked, from their push on,
        until a call names a version that serves them; each is looked at again only then. The
        iterator must be used up before the queue changes."""
        if version > self._parked_below and self._parked:
            released = [p for p in self._parked if not _waits_beyond(p, version)]
            if released:
                for pending in released:
                    del self._parked[pending]
                self._ready = dict.fromkeys(sorted([*self._ready, *released], key=lambda p: p.enqueued_at))
        self._parked_below = max(self._parked_below, version)
        return iter(self._ready)

    def take_all(self) -> list[Pending]:
        taken = sorted([*self._ready, *self._parked], key=lambda p: p.enqueued_at)
        for pending in taken:
            self.remove(pending)
        return taken

    def __iter__(self) -> Iterator[Pending]:
        return iter([*self._ready, *self._parked])

    def __len__(self) -> int:
        return len(self._ready) + len(self._parked)


_ABSENT = object()


def _waits_beyond(pending: Pending, version: int) -> bool:
    wanted = pending.request.min_weight_version
    return wanted is not None and wanted > version
