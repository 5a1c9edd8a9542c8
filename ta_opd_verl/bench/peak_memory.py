"""Peak memory of one call, measured in a fresh Python process (`run_child`), for the benchmarks.

Method: the peak resident memory the call adds on top of the process's resident memory just before it.
On Linux the kernel keeps the peak (``VmHWM`` in ``/proc/self/status``), and writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident size, so the figure is exact (no sampling)
and counts every allocation, torch's CPU tensors included. Elsewhere ``ru_maxrss`` stands in, which can
hide a peak below the one reached while the inputs were built. A fresh process per call keeps memory
freed by earlier calls (and kept by the allocator) out of the baseline.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_extra(call: Callable[[], object]) -> dict:
    """Run ``call`` once; its peak resident memory above the resident memory before it, in MiB, and the
    method that measured it (``VmHWM`` or ``ru_maxrss``)."""
    gc.collect()
    baseline = _status_kib("VmRSS")
    if baseline is not None and _reset_peak():
        call()
        peak, method = _status_kib("VmHWM"), "VmHWM"
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {"peak_extra_mib": (peak - baseline) / 1024, "method": method}


def print_result(result: dict) -> None:
    """What a child prints last: one JSON line that `run_child` reads."""
    print(json.dumps(result), flush=True)


def run_child(module: str, function: str, *args, timeout_s: float = 3600) -> dict:
    """``module.function(*args)`` in a fresh Python process (this package importable); the JSON line it
    prints last (`print_result`)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = f"from {module} import {function}; {function}(*{args!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=timeout_s
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child {function}{args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
