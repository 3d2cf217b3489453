"""Which queued requests form the next batch, and when: the scheduler's batching policy as a
pure function of the queue, so it can be read (and tested) apart from the asyncio loop that
runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from model_engine_server.request_queue import Pending


class BatchTokens:
    """Tokens a forming batch will run. Where the engine shares prompts, a request whose prompt
    is already in the batch adds only its response, as the adapter will pack it."""

    def __init__(self, shares_prompts: bool) -> None:
        self.shares_prompts = shares_prompts
        self.total = 0
        self._prompts: set[tuple[int, int]] = set()

    def cost(self, pending: Pending) -> int:
        """What adding `pending` adds: the same count `packing.split_shared_by_token_budget` uses."""
        if self.shares_prompts and pending.prompt_key in self._prompts:
            return pending.tokens - pending.request.response_start
        return pending.tokens

    def add(self, pending: Pending) -> None:
        self.total += self.cost(pending)
        if pending.prompt_key is not None:
            self._prompts.add(pending.prompt_key)


@dataclass(frozen=True)
class BatchLimits:
    """What bounds one batch (from `SchedulerConfig`)."""

    max_tokens: int
    max_requests: int | None
    max_wait_s: float
    shares_prompts: bool


LOOKAHEAD = 64  # requests looked at past the first that does not fit, for one that does


def form_batch(
    queued: Iterable[Pending], limits: BatchLimits, weight_version: int, now: float, flush: bool
) -> tuple[list[Pending], float | None]:
    """The batch to launch now (arrival order, skipping requests that wait for a later weight
    version or do not fit), or none and how long to wait for it to fill. A batch launches when
    it is full, when its oldest request has waited `max_wait_s`, or at once when `flush`.

    The scan stops once the batch is full, and `LOOKAHEAD` requests past the first that did not
    fit: forming a batch costs about a batch's worth of work, however long the queue."""
    chosen: list[Pending] = []
    tokens, left_out, looked_past = BatchTokens(limits.shares_prompts), False, 0
    for pending in queued:
        wanted = pending.request.min_weight_version
        if wanted is not None and wanted > weight_version:
            continue
        at_count = limits.max_requests is not None and len(chosen) >= limits.max_requests
        if at_count or tokens.total == limits.max_tokens:
            left_out = True
            break
        if tokens.total + tokens.cost(pending) > limits.max_tokens:
            left_out, looked_past = True, looked_past + 1
            if looked_past > LOOKAHEAD:
                break
            continue
        chosen.append(pending)
        tokens.add(pending)
    if not chosen:
        return [], None
    at_count = limits.max_requests is not None and len(chosen) >= limits.max_requests
    full = left_out or tokens.total == limits.max_tokens or at_count
    wait_left = chosen[0].enqueued_at + limits.max_wait_s - now
    if full or wait_left <= 0 or flush:
        return chosen, None
    return [], wait_left
