"""The machine a benchmark ran on, recorded beside its figures (these machines are shared and noisy)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform


def package_version(name: str) -> str:
    """An installed distribution's version, read from its metadata (no import: verl takes seconds)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int | None, packages: tuple[str, ...], **extra) -> dict:
    """Date, platform, CPU counts, load, torch threads and the versions of ``packages``, plus ``extra``."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": threads,
        "python": platform.python_version(),
        **{name: package_version(name) for name in packages},
        **extra,
    }
