"""Running the comparison: each planned run not already complete, through verl's trainer, then the held-out
reverse KL of its trained student."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

from ta_opd_verl.cli.train import run_verl
from ta_opd_verl.compare.heldout import HELDOUT_FILE, HeldoutReverseKL
from ta_opd_verl.compare.plan import CONFIG_NAME, PlannedRun, run_overrides
from ta_opd_verl.compare.results import RESULT_FILE, load_complete_result, write_json
from ta_opd_verl.demo.report import build_report
from ta_opd_verl.diagnose.models import CheckpointError, check_trained_checkpoint, config_vocab_size

# The ETA's guess per run until one has finished (the measured run times: docs/benchmarks.md).
ESTIMATED_RUN_SECONDS = 180.0


class RunFailed(RuntimeError):
    """One run did not produce a result (verl failed, or its outputs are missing)."""


def run_comparison(
    plan: Sequence[PlannedRun],
    out_dir: Path,
    settings: dict,
    execute: Callable[[PlannedRun, Path], dict],
) -> tuple[list[dict], list[str]]:
    """Run each planned run not already complete; returns (results in plan order, names that failed).

    ``execute(run, run_dir)`` trains and measures one run and returns its numbers (raising `RunFailed`
    when it cannot); this function adds the run's identity and settings and writes result.json last, so
    a folder without it is an interrupted run.
    """
    results, failed = [], []
    durations: list[float] = []
    for index, run in enumerate(plan, start=1):
        run_dir = out_dir / "runs" / run.name
        result = load_complete_result(run_dir, settings)
        if result is not None:
            print(f"[ta-opd compare] run {index}/{len(plan)} {run.name}: reused {run_dir / RESULT_FILE}")
            results.append(result)
            continue
        remaining = sum(
            load_complete_result(out_dir / "runs" / later.name, settings) is None
            for later in plan[index - 1 :]
        )
        per_run = statistics.fmean(durations) if durations else ESTIMATED_RUN_SECONDS
        print(
            f"[ta-opd compare] run {index}/{len(plan)} {run.name} … ETA {remaining * per_run / 60:.0f} min "
            f"for {remaining} run(s) left",
            flush=True,
        )
        # verl's trainer.resume_mode=auto would resume from a checkpoint an interrupted run left behind.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        started = time.monotonic()
        try:
            measured = execute(run, run_dir)
        except RunFailed as error:
            print(f"[ta-opd compare] run {run.name} failed: {error}", flush=True)
            failed.append(run.name)
            continue
        finally:
            durations.append(time.monotonic() - started)
        result = {"name": run.name, "selector": run.selector, "loss": run.loss, "ratio": run.ratio}
        result["seed"] = run.seed
        result |= measured
        result["settings"] = settings
        write_json(run_dir / RESULT_FILE, result)
        print(f"[ta-opd compare] run {run.name} done: {_one_line(result)}", flush=True)
        results.append(result)
    return results, failed


def _one_line(result: dict) -> str:
    return (
        f"accuracy {result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}, kept "
        f"{result['kept_fraction']:.4f}, held-out reverse KL {result['heldout_reverse_kl_before']:.4f} -> "
        f"{result['heldout_reverse_kl_after']:.4f}, {result['wall_seconds']:.0f}s"
    )


class VerlRun:
    """The real `execute` of `run_comparison`: verl's trainer, then the held-out reverse KL. The held-out
    set is prepared at the first run, so a fully reused comparison loads no model."""

    def __init__(self, pair, out_dir: Path, steps: int, lr: float, extra: Sequence[str]) -> None:
        self.pair, self.out_dir, self.steps, self.lr, self.extra = pair, out_dir, steps, lr, list(extra)

    @cached_property
    def heldout(self) -> HeldoutReverseKL:
        return HeldoutReverseKL(self.pair, self.out_dir / HELDOUT_FILE)

    @cached_property
    def initial_kl(self) -> float:
        return self.heldout.measure(self.pair.student)

    def __call__(self, run: PlannedRun, run_dir: Path) -> dict:
        overrides = run_overrides(run, self.steps, self.lr, self.pair, self.extra)
        outcome = run_verl(CONFIG_NAME, overrides, run_dir, progress=False)
        if outcome.returncode != 0:
            raise RunFailed(f"verl exited with {outcome.returncode}; see {outcome.log_path}")
        report = build_report(outcome, self.pair.manifest, run.seed)
        checkpoints = run_dir / "checkpoints"
        trained = checkpoints / f"global_step_{report['steps']}" / "actor" / "huggingface"
        missing = [
            name for name in ("student_accuracy_before", "student_accuracy_after") if report[name] is None
        ]
        if missing or report["steps"] != self.steps or report["kept_fraction"] is None:
            raise RunFailed(
                f"{report['steps']} of {self.steps} steps logged, validation missing: {missing or 'none'}, "
                f"kept fraction logged: {report['kept_fraction'] is not None}; see {outcome.log_path}"
            )
        try:
            check_trained_checkpoint(
                trained, self.pair.teacher, config_vocab_size(self.pair.student, "student")
            )
        except CheckpointError as error:
            raise RunFailed(f"no Hugging Face export to measure: {error}") from error
        trained_kl = self.heldout.measure(trained)
        # The FSDP shards and optimizer state are most of a run's disk; the small HF export stays.
        for shard in checkpoints.rglob("*.pt"):
            shard.unlink()
        return {
            "accuracy_before": report["student_accuracy_before"],
            "accuracy_after": report["student_accuracy_after"],
            "gain": report["student_accuracy_after"] - report["student_accuracy_before"],
            "kept_fraction": report["kept_fraction"],
            "steps": report["steps"],
            "wall_seconds": report["wall_seconds"],
            "heldout_reverse_kl_before": self.initial_kl,
            "heldout_reverse_kl_after": trained_kl,
        }
