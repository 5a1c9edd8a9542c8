"""`ta-opd train`: run verl's real trainer (``python -m verl.trainer.main_ppo``) with one of our configs.

By default it runs on the CPU: it sets the CPU runtime's environment, builds (or reuses) the tiny
teacher/student pair and points the config at it (``--gpu`` does neither: give the model and data paths as
overrides). It streams a short progress line per step (step, ETA, validation accuracy) while verl's full
log goes to a file, and on a failure prints what stopped verl. Everything after ``--`` is passed to verl as
Hydra overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
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
    # TransferQueue asks for 8 threads per call and, on a smaller machine, warns on every call before it
    # clamps to the physical cores: ask for those.
    env.setdefault("TQ_NUM_THREADS", str(psutil.cpu_count(logical=False) or 1))
    return env


def validation_accuracy(data: dict) -> float | None:
    """verl's validation accuracy in one step's metrics (``val-core/<data_source>/acc/...``), if present."""
    for key, value in data.items():
        if key.startswith(VAL_ACCURACY_PREFIX) and "/acc/" in key:
            return float(value)
    return None


# The pre-flight checks' own line, and the last line of a Python traceback (Ray prefixes a worker's lines
# with "(ActorName pid=N)").
_REFUSAL = re.compile(r"ta-opd: configuration refused before start-up: .*")
_EXCEPTION = re.compile(
    r"^(?:\([^)]*pid=\d+[^)]*\)\s*)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)\w*: .+)$"
)


def failure_reason(log: str) -> str | None:
    """What stopped a verl run, from its log: the pre-flight refusal if there is one (it names the key),
    else the last exception line."""
    refusal = _REFUSAL.search(log)
    if refusal:
        return refusal.group(0)
    exceptions = [match.group(1) for match in map(_EXCEPTION.match, log.splitlines()) if match]
    return exceptions[-1] if exceptions else None


LOGGER_KEY = "trainer.logger"
TENSORBOARD_FOLDER = "tensorboard"


def keep_file_logger(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` with verl's ``file`` logger added to any ``trainer.logger`` they set (the step lines
    and ``metrics.jsonl`` read it), and the loggers such an override names (empty when none does)."""
    kept, loggers = [], []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == LOGGER_KEY:
            loggers = [name.strip(" '\"") for name in value.strip("[] ").split(",") if name.strip(" '\"")]
            if "file" not in loggers:
                override = f"{key}=[{','.join([*loggers, 'file'])}]"
        kept.append(override)
    return kept, loggers


def main_ppo_command(config_name: str, overrides: list[str]) -> list[str]:
    """``python -m verl.trainer.main_ppo`` in this interpreter with one of our configs and overrides."""
    main_ppo = [sys.executable, "-m", "verl.trainer.main_ppo"]
    return [*main_ppo, "--config-path", config_dir(), "--config-name", config_name, *overrides]


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
    env.setdefault("TENSORBOARD_DIR", str(out_dir / TENSORBOARD_FOLDER))
    overrides, loggers = keep_file_logger(overrides)
    if progress:
        print(f"[ta-opd] metrics: {metrics_path}; verl's log: {out_dir / LOG_FILE}", flush=True)
        if "tensorboard" in loggers:
            print(f"[ta-opd] TensorBoard: {env['TENSORBOARD_DIR']}", flush=True)
    command = main_ppo_command(
        config_name,
        [
            f"trainer.default_local_dir={out_dir / 'checkpoints'}",
            f"hydra.run.dir={out_dir / 'hydra'}",
            *overrides,
        ],
    )
    result = supervise(command, out_dir, env, timeout=timeout, progress=progress)
    if progress and result.returncode != 0:
        reason = failure_reason(result.log_path.read_text(errors="replace"))
        print(f"[ta-opd] verl failed: {reason or 'no error message in the log'}", flush=True)
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
    line per step of ``out_dir/metrics.jsonl``. The child runs in a session of its own, which Ctrl-C at the
    terminal does not reach: Ctrl-C, SIGTERM, SIGHUP or a timeout while waiting stop it here
    (`_RunProcesses.stop`), and whatever of the run is left when it ends is killed."""
    started = time.monotonic()
    with open(out_dir / LOG_FILE, "w") as log, _stop_signals_raise_system_exit():
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out_dir, start_new_session=True
        )
        run, memory = _RunProcesses(process), _MemoryWatch()
        try:
            returncode = _wait_with_progress(
                process, out_dir / METRICS_FILE, started, timeout, progress, memory, run
            )
        finally:
            run.stop()
    return RunResult(returncode, out_dir, time.monotonic() - started, memory.peak_gib)


# How long verl's driver gets to shut its Ray cluster down after SIGTERM.
STOP_GRACE_SECONDS = 30


class _RunProcesses:
    """The sessions of a run: the child's own, and those its descendants start (Ray's dashboard and
    runtime-env agents start their own and can outlive the driver). Noted at every poll while the child
    runs, since a process whose parent has exited no longer shows whose it was; this process's own
    session is never one of them."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.sessions = {process.pid}

    def sample(self) -> None:
        # Once the child is reaped its pid may be reused: read its descendants only while it runs.
        if self.process.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for descendant in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(OSError):
                    self.sessions.add(os.getsid(descendant.pid))
        self.sessions.discard(os.getsid(0))

    def stop(self) -> None:
        """SIGTERM to a child still running (verl's driver then shuts its Ray cluster down) and up to
        STOP_GRACE_SECONDS for it to exit, cut short by another Ctrl-C; then SIGKILL to every process left
        in the run's sessions."""
        self.sample()
        try:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait(timeout=STOP_GRACE_SECONDS)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        finally:
            for leftover in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(leftover.pid) in self.sessions:
                        leftover.kill()
            self.process.wait()


@contextlib.contextmanager
def _stop_signals_raise_system_exit():
    """Python's default SIGTERM and SIGHUP (the terminal closed) end the process without running
    ``finally`` blocks, which would leave verl and its Ray cluster running in their own session; raise
    SystemExit instead, so the supervising ``finally`` stops them. Only the main thread may set signal
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum, frame):
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, exit_on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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


# Ray prefixes every line of an actor's output with "(ActorClass pid=N)": the first line of each actor class
# marks its start. The classes of a TA-OPD run, in words; any other class is named as it is.
_ACTOR_LINE = re.compile(r"\((\w+) pid=\d+\)")
_ACTOR_PHASES = {
    "TaskRunnerV1": "verl's task runner started: building the workers",
    "WorkerDict": "actor workers started (FSDP2)",
    "TeacherServerKeepingSampledToken": "teacher server starting (vLLM)",
    "vLLMHttpServer": "student rollout server starting (vLLM)",
    "AgentLoopWorkerTQ": "rollout agent loop started",
    "RewardLoopWorker": "reward workers started",
}
_SKIPPED_ACTORS = {
    "CheckpointEngineWorker",
    "GlobalRequestLoadBalancer",
    "SimpleStorageUnit",
    "DashboardAgent",
}
_LOG_PHASES = {
    "Started a local Ray instance": "Ray started",
    "Training Progress:": "training loop started (validation first when trainer.val_before_train)",
}


class StartupPhases:
    """Start-up phases read from verl's log as it grows, each reported once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def feed(self, text: str) -> list[str]:
        """The phases that ``text`` (new log lines) starts, in order."""
        phases = []
        for line in text.splitlines():
            names = [name for marker, name in _LOG_PHASES.items() if marker in line]
            actor = _ACTOR_LINE.search(line)
            if actor and actor.group(1) not in _SKIPPED_ACTORS:
                names.append(_ACTOR_PHASES.get(actor.group(1), f"{actor.group(1)} started"))
            for name in names:
                if name not in self.seen:
                    self.seen.add(name)
                    phases.append(name)
        return phases


def _wait_with_progress(
    process, metrics_path: Path, started: float, timeout, progress: bool, memory, run: _RunProcesses
) -> int:
    seen = 0
    first_step_at = None
    phases, log_offset = StartupPhases(), 0
    log_path = metrics_path.parent / LOG_FILE
    while True:
        memory.sample()
        run.sample()
        try:
            return process.wait(timeout=2.0) if timeout is None else _wait_bounded(process, started, timeout)
        except subprocess.TimeoutExpired:
            pass
        if progress and log_path.exists():
            with open(log_path, "rb") as log:
                log.seek(log_offset)
                chunk = log.read()
            # A partial last line waits for the next poll.
            chunk = chunk[: chunk.rfind(b"\n") + 1]
            log_offset += len(chunk)
            for phase in phases.feed(chunk.decode(errors="replace")):
                print(f"[ta-opd] {time.monotonic() - started:.0f}s: {phase}", flush=True)
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="ta-opd train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: ta-opd train --steps 5 -- distillation.distillation_loss.ta_opd.ratio=0.1",
    )
    parser.add_argument(
        "--config", default="ta_opd_cpu", help="config name under conf/ (default: ta_opd_cpu)"
    )
    parser.add_argument("--out", default="outputs/train", help="run folder (metrics.jsonl, verl.log)")
    parser.add_argument("--steps", type=positive_int, default=None, help="trainer.total_training_steps")
    parser.add_argument("--gpu", action="store_true", help="do not set the CPU runtime's environment")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = " (Hydra overrides go after `--`: ta-opd train -- key=value)" if "=" in unknown[0] else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    cpu = not args.gpu
    if cpu:
        overrides = tiny_pair_overrides(build_tiny_pair()) + overrides
    if args.steps is not None:
        overrides.append(f"trainer.total_training_steps={args.steps}")
    result = run_verl(args.config, overrides, Path(args.out), cpu=cpu)
    return result.returncode
