"""The CPU heap policy: with it, freed large blocks are reused without faulting their pages in again.

Measured in a fresh interpreter each (the policy lasts for the process, and the test process
must keep glibc's default for the other tests).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_engine_server.config import ServerConfig
from model_engine_server.cpu_heap import wanted

# allocates, touches and frees two 100 MB tensors per step, as a forward's layers do; after
# ten steps (the heap has grown to its peak) counts the page faults of five more
PROBE = """
import resource, sys, torch
from model_engine_server.cpu_heap import keep_freed_memory, release_free_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    first, second = torch.ones(25_000_000), torch.ones(25_000_000)
    return float(first[0] + second[0])
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
release_free_memory()  # and the kept blocks go back: the next step faults its pages in again
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(int(kept), faults, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_OF_1_GB = 10 * 100_000_000 // 4096  # the five measured steps allocate 1 GB


def _steady_state_faults(policy: str) -> tuple[bool, int, int]:
    """Whether the heap was kept, the five steps' faults, and one step's after a release."""
    out = subprocess.run([sys.executable, "-c", PROBE, policy], check=True, capture_output=True, text=True).stdout
    kept, faults, after_release = out.split()
    return kept == "1", int(faults), int(after_release)


def test_a_kept_heap_reuses_freed_blocks_without_page_faults():
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    kept, faults_kept, after_release = _steady_state_faults("keep")
    if not kept:
        pytest.skip("this C library has no mallopt")
    _, faults_system, _ = _steady_state_faults("system")
    assert faults_system > PAGES_OF_1_GB / 2  # glibc maps every block afresh and faults its pages in
    assert faults_kept < PAGES_OF_1_GB / 20  # freed blocks are reused as they are
    assert after_release > PAGES_OF_1_GB / 10 / 2  # released, the step's 200 MB are faulted in anew


def test_auto_keeps_the_heap_only_in_a_process_the_server_owns():
    assert wanted("auto", owns_process=True) and not wanted("auto", owns_process=False)
    assert wanted("keep", owns_process=False) and not wanted("system", owns_process=True)
    config = ServerConfig()
    assert config.cpu_heap == "auto" and config.engine_spec("/m").cpu_heap == "auto"
    assert ServerConfig(cpu_heap="keep").engine_spec("/m").cpu_heap == "keep"
    with pytest.raises(ValueError):
        ServerConfig(cpu_heap="always")
