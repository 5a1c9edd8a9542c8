"""Entry point ``ta_opd_cpu`` of the ``verl.plugins`` group: the CPU runtime, activated in every process
that imports verl when ``VERL_PLATFORM=cpu``; off the CPU platform it does nothing. Loaded loudly
(`ta_opd_verl.plugin_loading`): a failure is logged and stops the run's checks instead of vanishing."""

from __future__ import annotations

from ta_opd_verl.cpu import cpu_platform_requested
from ta_opd_verl.plugin_loading import load_loudly


def activate() -> list[str]:
    """Register the CPU platform and apply the CPU patches when ``VERL_PLATFORM=cpu``; returns the names of
    the patches applied (empty off the CPU platform)."""
    if not cpu_platform_requested():
        return []
    # The platform module imports verl's platform and distributed modules: only on the CPU platform.
    from ta_opd_verl.cpu.platform import apply_cpu_patches, register_cpu_platform

    register_cpu_platform()
    return apply_cpu_patches()


load_loudly("CPU runtime", activate)
