"""Reused host buffers for buckets.

A fresh CPU allocation of hundreds of MB is paid in page faults and kernel zeroing on first
touch, about as long as copying the bytes themselves; a sync would pay it for every bucket on
both sides. The pool keeps a few idle buffers for the next bucket and the next sync, bounded in
count and in bytes (the largest that fit are kept): the process holding it is a trainer, whose
host memory is not ours to keep. A buffer larger than the byte bound (a bucket made for one
huge tensor) is never kept. GPU buckets need no pool: torch's caching allocator already reuses
device memory.
"""

from __future__ import annotations

import threading

import torch


IDLE_BYTES_BOUND = 1 << 30  # four buckets of the default 256 MiB: about what a pipelined sync holds at once


class HostBufferPool:
    def __init__(self, max_idle: int = 4, max_idle_bytes: int = IDLE_BYTES_BOUND) -> None:
        self.max_idle = max_idle
        self.max_idle_bytes = max_idle_bytes
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
        if buffer.numel() > self.max_idle_bytes:
            return
        with self._lock:
            self._idle.append(buffer)
            while len(self._idle) > self.max_idle or self._idle_bytes() > self.max_idle_bytes:
                self._idle.pop(min(range(len(self._idle)), key=lambda i: self._idle[i].numel()))

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes()

    def _idle_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._idle)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


HOST_BUFFERS = HostBufferPool()
