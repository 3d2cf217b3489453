"""Reused host buffers for buckets.

A fresh CPU allocation of hundreds of MB is paid in page faults and kernel zeroing on first
touch, about as long as copying the bytes themselves; a sync would pay it for every bucket on
both sides. The pool keeps a few idle buffers for the next bucket and the next sync (bounded:
`max_idle` buffers, the largest kept). GPU buckets need no pool: torch's caching allocator
already reuses device memory.
"""

from __future__ import annotations

import threading

import torch


class HostBufferPool:
    def __init__(self, max_idle: int = 4) -> None:
        self.max_idle = max_idle
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU buffer of at least `nbytes` (the smallest idle one that fits, else new)."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
            if fitting:  # (by position: tensors compare elementwise, not by identity)
                return self._idle.pop(min(fitting, key=lambda i: self._idle[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer nobody reads or writes any more."""
        with self._lock:
            self._idle.append(buffer)
            if len(self._idle) > self.max_idle:
                self._idle.pop(min(range(len(self._idle)), key=lambda i: self._idle[i].numel()))

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


HOST_BUFFERS = HostBufferPool()
