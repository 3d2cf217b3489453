"""What Megatron-core 0.16 needs to run on a machine without CUDA, and nothing else.

Megatron assumes a GPU in a handful of places (measured in ../shared/notes/cpu-megatron.md).
Every function here is a no-op when CUDA is available, so GPU runs keep Megatron's own code
paths; on a CPU-only machine those places would raise anyway, so the patches cannot change
the behaviour of anything that worked before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_CPU = torch.device("cpu")


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def _cpu_current_device() -> torch.device:
    return _CPU


def route_current_device_to_cpu() -> None:
    """Make `torch.cuda.current_device()` name the CPU (buffers, RoPE tables, P2P receives).

    Megatron allocates with `device=torch.cuda.current_device()` in its tensor-parallel
    mappings, attention and rotary embedding. Without CUDA that call raises, so routing it to
    the CPU device is the only way those allocations can happen at all.
    """
    if cuda_absent() and torch.cuda.current_device is not _cpu_current_device:
        torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


def seed_model_parallel(seed: int) -> None:
    """Seed Megatron's RNG tracker (used by attention dropout, which is 0 here, and init).

    On CUDA this is Megatron's own `model_parallel_cuda_manual_seed`. Without CUDA that
    function fails on the CUDA RNG, so seed torch and install Megatron's no-op inference
    tracker instead: forward-only scoring never draws random numbers.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if cuda_absent():
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def tensor_cuda_is_identity() -> Iterator[None]:
    """While building a model without CUDA, let `Tensor.cuda()` return the tensor itself.

    Megatron's tied-embedding setup for pipeline parallelism moves the shared weight with
    `.cuda()` before all-reducing it between the first and last stage. Scoped to model
    construction and restored afterwards.
    """
    if not cuda_absent():
        yield
        return
    original = torch.Tensor.cuda

    def identity(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self

    torch.Tensor.cuda = identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def cpu_config_overrides() -> dict[str, object]:
    """TransformerConfig settings whose fused CUDA kernels do not exist on CPU."""
    if not cuda_absent():
        return {}
    return {
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "use_cpu_initialization": True,
    }
