"""verl on a CPU-only machine: a verl platform, gloo process groups, and vLLM-CPU weight refit.

Selected with ``VERL_PLATFORM=cpu``. `ta_opd_verl.verl_plugin` calls :func:`activate` on every
``import verl`` (verl loads ``verl.plugins`` entry points in every Ray process); off the CPU platform
nothing here runs. Every patch names the verl / torch / vLLM internal it leans on (verl 0.9.1,
torch 2.13, vLLM-CPU 0.31).
"""

from __future__ import annotations

import os

CPU_PLATFORM_NAME = "cpu"

# Environment a CPU run needs in every process (Ray workers inherit the driver's environment):
#   VERL_PLATFORM=cpu       -> verl's PlatformRegistry picks our platform instead of guessing "nvidia".
#   VERL_ENGINE_DEVICE=cuda -> verl's EngineRegistry.get_engine_cls has FSDP engines only for accelerator
#                              device keys; the CUDA FSDP engine is plain torch and runs on CPU tensors.
CPU_ENVIRONMENT = {"VERL_PLATFORM": CPU_PLATFORM_NAME, "VERL_ENGINE_DEVICE": "cuda"}


def cpu_platform_requested() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == CPU_PLATFORM_NAME


def activate() -> list[str]:
    """Register the CPU platform and apply the CPU patches when ``VERL_PLATFORM=cpu``.

    Returns the names of the patches applied (empty off the CPU platform). Raises
    :class:`CPURuntimeError` when the CPU platform is requested but cannot be set up.
    """
    if not cpu_platform_requested():
        return []
    from ta_opd_verl.cpu.platform import apply_cpu_patches, register_cpu_platform

    register_cpu_platform()
    return apply_cpu_patches()


class CPURuntimeError(RuntimeError):
    """The CPU runtime was requested (VERL_PLATFORM=cpu) but cannot run here."""
