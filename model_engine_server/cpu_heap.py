"""Keep freed CPU memory in the process heap, so a forward's large activations stop faulting in.

glibc serves every block above its mmap threshold (32 MiB at most) with a fresh `mmap` and
unmaps it on free. A packed 4,096-token batch of Qwen2.5-0.5B allocates its MLP activations
(80 MB each) that way in every layer, so the kernel zero-fills every page again on first
touch: about 2.3 million page faults and 6-9 s of system time per 37 s batch on a 2-core CPU
(`bench/notes/scoring_shapes_0_5b_full_4096_tiles.md`). With `mmap` off and the heap never trimmed, freed blocks are
reused as they are. The price is that the process keeps its peak heap resident: right for a
process that only serves (a Ray worker, `model-engine-server serve`), wrong for a trainer that
hosts an in-process server, so `auto` applies it only where the server owns the process.
GPU activations live in CUDA's caching allocator already; this concerns the CPU path.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Literal

logger = logging.getLogger(__name__)

CpuHeap = Literal["auto", "keep", "system"]
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = -1  # mallopt takes an int; glibc reads it as a size_t, so -1 is the largest: never

_applied = False


def wanted(policy: CpuHeap, owns_process: bool) -> bool:
    """Whether `policy` asks for the heap to be kept, in a process the server does or does not own."""
    return policy == "keep" or (policy == "auto" and owns_process)


def keep_freed_memory() -> bool:
    """Turn glibc's `mmap` of large blocks off and its heap trimming down, once per process.

    True where it took (or had already); False on a C library without `mallopt` (macOS, musl):
    it is an optimisation, never a requirement."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if _applied:
        logger.info("CPU heap: freed memory is kept for reuse (no mmap of large blocks, no trimming)")
    return _applied


def release_free_memory() -> None:
    """Give the heap's free blocks back to the system (`malloc_trim`), for a process that kept
    them and now changes what it holds (a benchmark moving to a larger model): a kept heap
    otherwise stays at the largest peak the process has had."""
    if _applied:
        ctypes.CDLL(None).malloc_trim(0)


def apply(policy: CpuHeap, owns_process: bool) -> bool:
    """`keep_freed_memory()` where `policy` wants it; whether the heap is now kept."""
    return keep_freed_memory() if wanted(policy, owns_process) else _applied
