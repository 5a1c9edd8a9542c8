"""The verl platform for CPU-only machines, and the patches a CPU run needs.

Leans on verl 0.9.1 internals:
- ``verl.plugin.platform.platform_manager.PlatformRegistry`` (registration by name, chosen by
  ``VERL_PLATFORM``) and the abstract ``PlatformBase`` interface;
- ``verl.utils.distributed.initialize_global_process_group_ray``, which builds the backend string
  ``"cpu:gloo,<device>:<backend>"`` = ``"cpu:gloo,cpu:gloo"`` on CPU, which torch rejects as a
  duplicate device type; ``verl.workers.engine_workers`` imports it by name, so the replacement must
  be in place before that module is imported (verl loads plugins first thing in ``import verl``);
- the FSDP2 engine (``verl/workers/engine/fsdp/transformer_impl.py``) builds
  ``CPUOffloadPolicy(pin_memory=True)`` for forward-only models (ref, teacher); pinned memory needs an
  accelerator.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

import psutil
import torch
import torch.distributed.fsdp as torch_fsdp
import verl.utils.distributed as verl_distributed
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

from ta_opd_verl.cpu import CPU_PLATFORM_NAME
from ta_opd_verl.verl_fence import FINGERPRINTS

FINGERPRINTS.update(
    {
        "verl.utils.distributed:initialize_global_process_group_ray": "761a94d1a2e058d3",
        "verl.plugin.platform.platform_manager:PlatformRegistry.register": "81bf1fb5c8ae6103",
    }
)

_APPLIED: list[str] = []


def _no_op(*_args, **_kwargs) -> None:
    return None


class _CPUProperties:
    name = "cpu"
    total_memory = psutil.virtual_memory().total
    major, minor = 0, 0


class CPUDeviceModule(types.ModuleType):
    """A ``torch.cuda``-shaped namespace for CPU: verl calls ``get_torch_device().<fn>()`` throughout
    (``empty_cache``, ``synchronize``, ``mem_get_info``, rng state, streams). Cache and sync calls are
    no-ops; memory queries report host RAM; anything else falls through to ``torch.cpu``."""

    def __init__(self) -> None:
        super().__init__("ta_opd_verl_cpu_device")
        self.set_device = _no_op
        self.synchronize = _no_op
        self.empty_cache = _no_op
        self.ipc_collect = _no_op
        self.reset_peak_memory_stats = _no_op
        self.set_per_process_memory_fraction = _no_op
        self.manual_seed = torch.manual_seed
        self.manual_seed_all = torch.manual_seed

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def get_device_name(*_args, **_kwargs) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(*_args, **_kwargs) -> _CPUProperties:
        return _CPUProperties()

    @staticmethod
    def is_bf16_supported(*_args, **_kwargs) -> bool:
        return True

    @staticmethod
    def mem_get_info(*_args, **_kwargs) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @staticmethod
    def memory_allocated(*_args, **_kwargs) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def get_rng_state(*_args, **_kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str):
        # Stream, Event, current_stream, stream(): torch.cpu has CPU stand-ins for these.
        return getattr(torch.cpu, name)


CPU_DEVICE_MODULE = CPUDeviceModule()


def build_platform_class():
    class PlatformCPU(PlatformBase):
        """CPU tensors, gloo collectives, and Ray's logical ``GPU`` resource for placement: verl's
        resource pools count ``GPU``s, so a CPU run declares logical GPUs with
        ``ray_kwargs.ray_init.num_gpus`` (one per training rank / rollout replica)."""

        device_name = "cpu"
        vendor_name = "cpu"
        device_module = CPU_DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Never auto-detected: a CPU run is asked for explicitly with VERL_PLATFORM=cpu.
            return False

        def current_device(self) -> str:
            # verl moves tensors with `.to(get_device_id())`; an int would mean "accelerator N".
            return "cpu"

        def device_count(self) -> int:
            return 1

        set_device = staticmethod(_no_op)
        synchronize = staticmethod(_no_op)
        set_allocator_settings = staticmethod(_no_op)
        empty_cache = staticmethod(_no_op)
        profiler_start = staticmethod(_no_op)
        profiler_stop = staticmethod(_no_op)

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    return PlatformCPU


def register_cpu_platform() -> None:
    if PlatformRegistry.get(CPU_PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=CPU_PLATFORM_NAME)(build_platform_class())


class CPUOffloadPolicyWithoutPinning(torch.distributed.fsdp.CPUOffloadPolicy):
    """FSDP2's CPU offload policy with ``pin_memory`` forced off: pinning needs an accelerator."""

    def __init__(self, pin_memory: bool = False) -> None:
        super().__init__(pin_memory=False)


def apply_cpu_patches() -> list[str]:
    """Idempotent; returns the names of the patches in place."""
    if _APPLIED:
        return list(_APPLIED)
    original_init = verl_distributed.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original_init(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    verl_distributed.initialize_global_process_group_ray = initialize_global_process_group_ray
    # verl.workers.engine_workers imports it by name: patch that copy too if it was imported first.
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None:
        engine_workers.initialize_global_process_group_ray = initialize_global_process_group_ray
    _APPLIED.append("verl.utils.distributed.initialize_global_process_group_ray: backend 'cpu:gloo'")

    # verl.utils.fsdp_utils does `from torch.distributed.fsdp import CPUOffloadPolicy` when the FSDP
    # engine is first imported, after this runs.
    torch_fsdp.CPUOffloadPolicy = CPUOffloadPolicyWithoutPinning
    fsdp_utils = sys.modules.get("verl.utils.fsdp_utils")
    if fsdp_utils is not None:
        fsdp_utils.CPUOffloadPolicy = CPUOffloadPolicyWithoutPinning
    _APPLIED.append("torch.distributed.fsdp.CPUOffloadPolicy: pin_memory=False")
    return list(_APPLIED)
