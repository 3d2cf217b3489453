"""Which replica takes a request: least outstanding tokens, with prompt affinity.

A GRPO group's samples share their prompt, and a replica whose engine shares prompts runs it
once per batch only if the samples meet in that replica. So a request goes where its prompt
went last, unless that replica is more than `slack_tokens` busier than the least busy one
(then it goes there, and its prompt follows it). Pure bookkeeping: no Ray, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Mapping


class PromptAffinity:
    """The replica each recent prompt was sent to; the oldest are forgotten beyond `capacity`."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._last: OrderedDict[Hashable, int] = OrderedDict()

    def preferred(self, key: Hashable | None) -> int | None:
        return None if key is None else self._last.get(key)

    def record(self, key: Hashable | None, replica: int) -> None:
        if key is None:
            return
        self._last[key] = replica
        self._last.move_to_end(key)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)


def pick_replica(outstanding: Mapping[int, int], preferred: int | None, slack_tokens: int) -> int:
    """Among `outstanding` (replica -> tokens in flight; never empty): `preferred` if it is a
    candidate within `slack_tokens` of the least busy, else the least busy (lowest index first)."""
    lightest = min(outstanding, key=lambda index: (outstanding[index], index))
    if preferred in outstanding and outstanding[preferred] <= outstanding[lightest] + slack_tokens:
        return preferred
    return lightest
