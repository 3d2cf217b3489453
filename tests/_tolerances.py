"""What a test may assert when two computations of the same log-probs do not run the same kernels.

Bitwise equality holds only for the same code on the same shapes in the same process at the
same thread count. It does not hold between a Ray worker and the test process: the workers run
1 torch thread (the test cluster's runtime_env sets OMP_NUM_THREADS=1), the test process 2
(conftest). Neither does it hold between two batch compositions, since packing changes the
row count of every GEMM. Measured on an AMD EPYC with AVX-512 (torch 2.13 CPU, MKL 2024.2):
MKL's SGEMM gives different last bits at 2 threads than at 1 for 5-7 and 9-11 rows, and
for 1-3 rows the result also depends on the row count. Log-probs and entropies moved by up to
9.5e-7 (1-2 ulp at |log p| ~ 6) over 150 requests scored alone and packed, at 1 and 2 threads.

`CROSS_PROCESS_ATOL` is 10x that, the same 1e-5 the suite already allows against plain
transformers, which is a different algorithm altogether (no packing, no chunked LM head). A
test that must tell weight versions apart also checks that they differ by
`DISTINCT_FACTOR x` the tolerance (`assert_distinguishable`). Otherwise a stale or mixed
replica could sit inside the tolerance and the test could not fail. The measured gaps are
much larger: 6.9e-3 for one stale bias tensor, 0.5 or more between two perturbed versions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CROSS_PROCESS_ATOL = 1e-5  # absolute, fp32 log-probs and entropies
DISTINCT_FACTOR = 100  # versions that a test must tell apart differ by more than this x the tolerance


def assert_scores_close(actual, expected, atol: float = CROSS_PROCESS_ATOL, what: str = "") -> None:
    """Equal up to kernel-choice rounding: same shape, every element within `atol` (rtol 0)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=what)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_distinguishable(
    expected: Sequence, other: Sequence, what: str, atol: float = CROSS_PROCESS_ATOL, factor: float = DISTINCT_FACTOR
) -> None:
    """Each pair of score arrays (one per request) differs by more than `factor x atol`, so a
    result computed on the `other` weights could not pass `assert_scores_close`."""
    gaps = [max_abs_diff(e, o) for e, o in zip(expected, other, strict=True)]
    assert gaps and min(gaps) > factor * atol, (
        f"{what}: the references differ by only {min(gaps, default=0.0):.3g} (need > {factor * atol:.3g}); "
        "the comparison could not detect those weights"
    )
