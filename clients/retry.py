"""When a client sends again what the server refused for now: one policy for every transport.

Single requests answered `overloaded` or `shutting_down` (a full queue, a replica going away)
are sent again, alone, with exponential backoff and jitter, never sooner than the server's
`Retry-After`, until `max_retries` or the call's deadline; then the last answers stand. The
HTTP plans (`http_plan.py`) and the Ray-handle client (`ray_client.py`) both decide with
`entries_to_resend`, so the same server answers give the same outcome whichever way they came.
Pure: no transport, no event loop.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Sequence

from clients.base import Outcome
from model_engine_server.errors import DeadlineExceeded, Overloaded, ServerShuttingDown

RETRYABLE_ENTRY_ERRORS = (Overloaded, ServerShuttingDown)


@dataclass
class RetryPolicy:
    """How often and how patiently a client retries what the server refused for now."""

    max_retries: int = 10
    backoff_s: float = 0.05
    max_backoff_s: float = 5.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with jitter, never shorter than the server's Retry-After."""
        backoff = min(self.max_backoff_s, self.backoff_s * (2**attempt)) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after_s or 0.0)


RESPONSE_GRACE_S = 5.0  # the server answers a request's deadline itself; allow it that long to say so


class Deadline:
    """One call's deadline, covering its retries and waits (None: no deadline)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, delay_s: float) -> bool:
        remaining = self.remaining()
        return remaining is None or delay_s < remaining

    def expired_error(self, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"{what}: no answer within the deadline of {self.seconds:g} s")


def entries_to_resend(
    outcomes: Sequence[Outcome | None],
    answered: Sequence[int],
    policy: RetryPolicy,
    attempt: int,
    deadline: Deadline,
    retry_after_s: float | None = None,
) -> tuple[list[int], float | None]:
    """Of the requests just `answered`, those to send again and the wait before; a wait of None
    means the answers stand (nothing to resend, or no retries or time left)."""
    again = [i for i in answered if isinstance(outcomes[i], RETRYABLE_ENTRY_ERRORS)]
    # an entry's own hint, else the call's Retry-After header (the server's configured hint)
    waits = [o.retry_after_s for i in again if isinstance(o := outcomes[i], Overloaded) and o.retry_after_s is not None]
    delay = policy.delay(attempt, max(waits, default=retry_after_s))
    if not again or attempt >= policy.max_retries or not deadline.allows(delay):
        return again, None
    return again, delay
