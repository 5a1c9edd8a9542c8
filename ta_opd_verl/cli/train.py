"""`ta-opd train`: run verl's real trainer (``python -m verl.trainer.main_ppo``) with one of our configs.

On a CPU machine (``--cpu``, the default when no CUDA device is visible) it sets the CPU runtime's
environment, builds (or reuses) the tiny teacher/student pair, points the config at it, and streams a short
progress line per step (step, ETA, validation accuracy) while verl's full log goes to a file. Everything
after ``--`` is passed to verl as Hydra overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ta_opd_verl.cpu import CPU_ENVIRONMENT
from ta_opd_verl.tiny.build import build_tiny_pair

# The clone's conf/, beside the package folder.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "verl.log"
VAL_ACCURACY_PREFIX = "val-core/"


def config_dir() -> str:
    """The folder of our Hydra configs: the clone's conf/, or the installed package's copy of it."""
    if (CONF_DIR / "ta_opd_trainer.yaml").exists():
        return str(CONF_DIR)
    # `ta_opd_verl.conf` exists only in an installed wheel, as a namespace package (no __init__.py, no
    # __file__): its folder is the package's search location.
    spec = importlib.util.find_spec("ta_opd_verl.conf")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no {CONF_DIR} and no installed ta_opd_verl.conf package")
    return next(iter(spec.submodule_search_locations))


@dataclass
class RunResult:
    returncode: int
    out_dir: Path
    wall_seconds: float
    # Peak memory the run added to the machine (see _MemoryWatch).
    peak_memory_gib: float = 0.0

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def metrics(self) -> list[dict]:
        """verl's file logger: one JSON object per step, ``{"step": n, "data": {...}}``."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]


def tiny_pair_overrides(pair) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={pair.student}",
        f"distillation.teacher_models.teacher_model.model_path={pair.teacher}",
        f"data.train_files={pair.train_parquet}",
        f"data.val_files={pair.val_parquet}",
    ]


# vLLM-CPU sizes each engine's KV cache from host RAM when this is unset (about 2.4 GiB per engine on a
# 24 GiB machine; a CPU run has two engines, student and teacher). Tiny models need a fraction of 1 GiB.
VLLM_CPU_KV_CACHE_GIB = "1"


def cpu_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CPU_ENVIRONMENT)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_CPU_KV_CACHE_GIB)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("HYDRA_FULL_ERROR", "1")
    env.setdefault("RAY_DEDUP_LOGS", "1")
    return env


def validation_accuracy(data: dict) -> float | None:
    """verl's validation accuracy in one step's metrics (``val-core/<data_source>/acc/...``), if present."""
    for key, value in data.items():
        if key.startswith(VAL_ACCURACY_PREFIX) and "/acc/" in key:
            return float(value)
    return None


def run_verl(
    config_name: str,
    overrides: list[str],
    out_dir: Path,
    *,
    cpu: bool = True,
    timeout: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Run ``python -m verl.trainer.main_ppo`` with our config; the file logger writes
    ``out_dir/metrics.jsonl``, verl's own output goes to ``out_dir/verl.log``."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    env = cpu_environment() if cpu else dict(os.environ)
    env["VERL_FILE_LOGGER_PATH"] = str(metrics_path)
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path",
        config_dir(),
        "--config-name",
        config_name,
        f"trainer.default_local_dir={out_dir / 'checkpoints'}",
        f"hydra.run.dir={out_dir / 'hydra'}",
        *overrides,
    ]
    result = supervise(command, out_dir, env, timeout=timeout, progress=progress)
    if progress:
        print(
            f"[ta-opd] verl exited with {result.returncode} after {result.wall_seconds:.0f}s, peak memory "
            f"+{result.peak_memory_gib:.1f} GiB; log: {result.log_path}"
        )
    return result


def supervise(
    command: list[str], out_dir: Path, env: dict[str, str], *, timeout: float | None, progress: bool
) -> RunResult:
    """Run ``command`` in ``out_dir`` with its output in ``out_dir/verl.log`` and wait for it, printing a
    line per step of ``out_dir/metrics.jsonl``. Ctrl-C, SIGTERM or a timeout while waiting stop the child
    too: verl's driver exits on SIGTERM and its Ray cluster with it."""
    started = time.monotonic()
    with open(out_dir / LOG_FILE, "w") as log, _sigterm_raises_system_exit():
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out_dir)
        memory = _MemoryWatch()
        try:
            returncode = _wait_with_progress(
                process, out_dir / METRICS_FILE, started, timeout, progress, memory
            )
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return RunResult(returncode, out_dir, time.monotonic() - started, memory.peak_gib)


@contextlib.contextmanager
def _sigterm_raises_system_exit():
    """Python's default SIGTERM ends the process without running ``finally`` blocks, which would leave verl
    (a child in our process group) and its Ray cluster running; raise SystemExit instead, so the
    supervising ``finally`` stops them. Only the main thread may set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _MemoryWatch:
    """The machine's used memory (``MemTotal - MemAvailable``) above its value at the start, sampled every
    2 s: verl's whole process tree (Ray, vLLM engines, FSDP workers, shared memory) counted once, plus
    whatever else runs meanwhile. Summed per-process RSS would count shared libraries once per process."""

    def __init__(self) -> None:
        self._used = lambda: psutil.virtual_memory().total - psutil.virtual_memory().available
        self._baseline = self._used()
        self.peak_gib = 0.0

    def sample(self) -> None:
        self.peak_gib = max(self.peak_gib, (self._used() - self._baseline) / 2**30)


def _wait_with_progress(process, metrics_path: Path, started: float, timeout, progress: bool, memory) -> int:
    seen = 0
    first_step_at = None
    while True:
        memory.sample()
        try:
            return process.wait(timeout=2.0) if timeout is None else _wait_bounded(process, started, timeout)
        except subprocess.TimeoutExpired:
            pass
        if not progress or not metrics_path.exists():
            continue
        lines = metrics_path.read_text().splitlines()
        for line in lines[seen:]:
            entry = json.loads(line)
            step, data = entry.get("step"), entry.get("data", {})
            elapsed = time.monotonic() - started
            if step and first_step_at is None:
                first_step_at = (step, elapsed)
            accuracy = validation_accuracy(data)
            parts = [f"[ta-opd] step {step}", f"{elapsed:.0f}s"]
            if first_step_at and step and step > first_step_at[0]:
                per_step = (elapsed - first_step_at[1]) / (step - first_step_at[0])
                parts.append(f"{per_step:.1f}s/step")
            if "actor/ta_opd/kept_fraction" in data:
                parts.append(f"kept {data['actor/ta_opd/kept_fraction']:.3f}")
            if accuracy is not None:
                parts.append(f"val acc {accuracy:.3f}")
            print(" | ".join(parts), flush=True)
        seen = len(lines)


def _wait_bounded(process, started: float, timeout: float) -> int:
    remaining = timeout - (time.monotonic() - started)
    if remaining <= 0:
        process.kill()
        process.wait()
        raise TimeoutError(f"verl did not finish within {timeout:.0f}s")
    return process.wait(timeout=min(2.0, remaining))


def split_overrides(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """A command line (default: this process's) split at the first ``--``: (our arguments, what follows,
    the Hydra overrides handed to verl)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(prog="ta-opd train", description=__doc__)
    parser.add_argument(
        "--config", default="ta_opd_cpu", help="config name under conf/ (default: ta_opd_cpu)"
    )
    parser.add_argument("--out", default="outputs/train", help="run folder (metrics.jsonl, verl.log)")
    parser.add_argument("--steps", type=int, default=None, help="trainer.total_training_steps")
    parser.add_argument("--gpu", action="store_true", help="do not set the CPU runtime's environment")
    args = parser.parse_args(argv)
    cpu = not args.gpu
    if cpu:
        overrides = tiny_pair_overrides(build_tiny_pair()) + overrides
    if args.steps is not None:
        overrides.append(f"trainer.total_training_steps={args.steps}")
    result = run_verl(args.config, overrides, Path(args.out), cpu=cpu)
    return result.returncode
