"""A verl platform for machines without an accelerator.

verl picks its device, collective backend and device module through its platform registry; with
no accelerator it falls back to "nvidia" and fails starting NCCL. This platform reports device
``cpu`` and backend ``gloo`` and answers the cuda-like calls verl makes (set_device, synchronize,
memory counters, seeds) harmlessly, so verl's own `TrainingWorker` runs on a CPU machine — our
`backend: verl` there, and the reference the tests compare against. It is registered under the
name ``cpu`` and chosen only by ``VERL_PLATFORM=cpu`` (`use_cpu_platform`), never auto-detected,
so it cannot displace a real accelerator.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


def _cpu_device_module() -> types.ModuleType:
    """A stand-in for `torch.cuda` whose calls are harmless on a CPU-only process."""
    module = types.ModuleType("model_engine_server_cpu_device")
    no_op = lambda *args, **kwargs: None  # noqa: E731
    zero = lambda *args, **kwargs: 0  # noqa: E731
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats", "manual_seed",
                 "manual_seed_all", "ipc_collect"):
        setattr(module, name, no_op)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved",
                 "current_device"):
        setattr(module, name, zero)
    module.device_count = lambda: 1
    module.is_available = lambda: True
    module.get_device_name = lambda *args, **kwargs: "cpu"
    module.mem_get_info = lambda *args, **kwargs: (0, 0)
    module.memory_stats = lambda *args, **kwargs: {}
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    module.Stream = None
    module.Event = None
    return module


@PlatformRegistry.register(platform=PLATFORM_NAME)
class CPUPlatform(PlatformBase):
    """verl on CPU: device ``cpu``, collectives over gloo, no profiler, no IPC."""

    _device_module = _cpu_device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: only VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # verl moves tensors with `.to(get_device_id())`; an int would mean an accelerator.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {}

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def use_cpu_platform() -> None:
    """Select this platform for verl in this process (and the processes it starts).

    verl's FSDP engine registers itself for devices cuda/npu only; ``VERL_ENGINE_DEVICE=cuda``
    makes its registry hand out that same engine class, which then runs on the platform's
    device (``cpu``).
    """
    os.environ["VERL_PLATFORM"] = PLATFORM_NAME
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")


def accelerator_present() -> bool:
    return torch.cuda.is_available()
