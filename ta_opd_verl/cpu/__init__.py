"""verl on a CPU-only machine: a verl platform, gloo process groups, and vLLM-CPU weight refit.

Selected with ``VERL_PLATFORM=cpu``: `ta_opd_verl.cpu.verl_plugin` (a ``verl.plugins`` entry point, loaded
on every ``import verl`` in every Ray process) activates it; off the CPU platform nothing here runs. Every
patch names the verl / torch / vLLM internal it leans on (verl 0.9.1, torch 2.13, vLLM-CPU 0.31); the verl
ones are fingerprinted with the plugin's (`ta_opd_verl.verl_fence.FINGERPRINTS`).
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


class CPURuntimeError(RuntimeError):
    """The CPU runtime was requested (VERL_PLATFORM=cpu) but cannot run here."""
