"""`ta-opd compare`: TA-OPD's selectors and budgets through verl's trainer on the tiny pair (a benchmark).

Runs, with the same step budget and the demo's settings (`ta_opd_verl.demo.demo_run_overrides`: 128
prompts per step, top-p 0.7 rollouts, the teacher colocated in the actor's worker with exact
compatibility) for 16 steps instead of the demo's 80 (so that a run, start-up included, takes about 3
minutes), the selectors `full`, `teachability`, `random`, `entropy`, `raw_kl` and `tip` at ρ = 0.05 with 3
training seeds each, and `teachability` at ρ = 0.01, 0.03, 0.10 and 0.20 with one seed: 22 runs of
``python -m verl.trainer.main_ppo`` with ``conf/ta_opd_cpu.yaml``. Each run validates at step 0 and at its
last step and saves its student as a Hugging Face model; after it, the student's reverse KL
KL(p_student || p_teacher) is measured on a fixed held-out set (the teacher's greedy answers to the first
64 validation prompts, full vocabulary, averaged over response positions) for the initial and the
trained student. Written to ``--out`` (default ``outputs/compare``):

- ``runs/<name>/result.json``: one run's numbers, written only after the run succeeded; a run whose
  result.json exists with the same settings (steps, lr, prompts per step, the demo's runtime overrides,
  extra overrides, and the tiny pair's settings hash) is reused, any other run folder
  is cleared and run again, so an interrupted comparison resumes where it stopped;
- ``table.md``: per selector and ρ, mean ± sample standard deviation over seeds of the accuracy gain,
  the held-out reverse-KL reduction and the wall time, with the actual kept fraction beside the gain
  (a group of one seed shows its standard deviation as "–");
- ``summary.json`` (the table's numbers and every run's result) and ``compare.png``.

Each run is sized to about 3 minutes on a quiet 2-core machine (verl's start-up included), so the 22
runs take about 70 minutes:

    ta-opd compare                          # all 22 runs (resumes), then table and plot
    ta-opd compare --dry-run                # the plan: run names and verl overrides, nothing runs
    ta-opd compare --only tip-r0.05-s1      # one run, then the table of whatever is complete
    ta-opd compare --steps 40 -- actor_rollout_ref.actor.ppo_mini_batch_size=16   # after --: to verl
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ta_opd_verl.demo import (
    DEMO_LR,
    DEMO_PROMPTS,
    DEMO_STEPS,
    DEMO_TOP_P,
    TA_OPD_KEY,
    build_report,
    demo_run_overrides,
    demo_runtime_overrides,
)
from ta_opd_verl.teachability import SELECTORS

# ---- the comparison's plan (issue 6) ----
COMPARED_SELECTORS = ("full", "teachability", "random", "entropy", "raw_kl", "tip")
MAIN_RATIO = 0.05
BUDGET_SELECTOR = "teachability"
BUDGET_RATIOS = (0.01, 0.03, 0.10, 0.20)
SEEDS = 3
# About 3 minutes a run on a quiet 2-core machine: verl's start-up with the colocated teacher (~80 s), two
# validations (~6 s each), the Hugging Face export, and ~5.2 s per step of 128 prompts (the demo's step
# times in docs/benchmarks.md).
COMPARE_STEPS = 16
ESTIMATED_RUN_SECONDS = 180.0

# ---- the held-out set of the reverse-KL measurement ----
HELDOUT_PROMPTS = 64
# conf/cpu_runtime.yaml's data.max_response_length: the held-out answers are as long as a rollout can be.
HELDOUT_RESPONSE_TOKENS = 32
HELDOUT_FILE = "heldout.parquet"

RESULT_FILE = "result.json"
CONFIG_NAME = "ta_opd_cpu"
NO_STD = "–"


@dataclass(frozen=True)
class PlannedRun:
    selector: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.selector}-r{self.ratio:g}-s{self.seed}"


class RunFailed(RuntimeError):
    """One run did not produce a result (verl failed, or its outputs are missing)."""


def comparison_plan(
    selectors: Sequence[str] = COMPARED_SELECTORS,
    seeds: int = SEEDS,
    budgets: Sequence[float] = BUDGET_RATIOS,
    ratio: float = MAIN_RATIO,
) -> list[PlannedRun]:
    """Every selector at ``ratio`` with seed 0, then the budgets of `teachability` (seed 0), then the
    other seeds: seed-major, so an interrupted comparison already has one run of every configuration."""
    plan = [PlannedRun(selector, ratio, 0) for selector in selectors]
    plan += [PlannedRun(BUDGET_SELECTOR, budget, 0) for budget in budgets if budget != ratio]
    plan += [PlannedRun(selector, ratio, seed) for seed in range(1, seeds) for selector in selectors]
    return plan


def run_overrides(run: PlannedRun, steps: int, lr: float, pair, extra: Sequence[str] = ()) -> list[str]:
    """verl overrides of one run: the demo's (the pair's paths, settings, seeds and runtime), the run's
    selector and ratio, validation at step 0 and the last step only, a Hugging Face export at the end."""
    overrides = [
        *demo_run_overrides(pair, steps=steps, lr=lr, seed=run.seed, test_freq=steps),
        f"{TA_OPD_KEY}.selector={run.selector}",
        f"{TA_OPD_KEY}.ratio={run.ratio:g}",
        f"trainer.save_freq={steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        *extra,
    ]
    return _last_wins(overrides)


def _last_wins(overrides: Sequence[str]) -> list[str]:
    """Hydra applies repeated keys in order, so only the last one counts; keep just that one, in its place
    (the demo's settings hold ratio=0.05, which a run's own ratio replaces)."""
    last = {_override_key(item): index for index, item in enumerate(overrides)}
    return [item for index, item in enumerate(overrides) if last[_override_key(item)] == index]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# ---- aggregation (pure, unit-tested) ----


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is undefined: None."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One row per (selector, ratio), in order of first appearance, over the seeds present.

    The gain is the validation accuracy at the last step minus step 0's; the reverse-KL reduction is the
    held-out reverse KL of the initial student minus the trained one's (positive: closer to the teacher).
    Each measured field is a ``{"mean": m, "std": s}`` pair, ``s`` None for a single seed.
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for result in results:
        groups.setdefault((result["selector"], result["ratio"]), []).append(result)
    rows = []
    for (selector, ratio), members in groups.items():
        fields = {
            "kept_fraction": [r["kept_fraction"] for r in members],
            "gain": [r["accuracy_after"] - r["accuracy_before"] for r in members],
            "kl_reduction": [r["heldout_reverse_kl_before"] - r["heldout_reverse_kl_after"] for r in members],
            "wall_seconds": [r["wall_seconds"] for r in members],
        }
        row = {"selector": selector, "ratio": ratio, "n": len(members), "seeds": [r["seed"] for r in members]}
        for field, values in fields.items():
            mean, std = mean_std(values)
            row[field] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def render_table(rows: Sequence[dict]) -> str:
    """A markdown table of `aggregate`'s rows: gain in accuracy points, KL in nats, wall in seconds."""
    lines = [
        "| selector | ρ | seeds | kept fraction | accuracy gain (points) | held-out reverse-KL reduction "
        "(nats) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["selector"],
            f"{row['ratio']:g}",
            str(row["n"]),
            f"{100 * row['kept_fraction']['mean']:.1f}%",
            _mean_pm_std(row["gain"], scale=100, digits=1, signed=True),
            _mean_pm_std(row["kl_reduction"], digits=4, signed=True),
            _mean_pm_std(row["wall_seconds"], digits=0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_pm_std(stat: dict, *, digits: int, scale: float = 1.0, signed: bool = False) -> str:
    mean = f"{scale * stat['mean']:{'+' if signed else ''}.{digits}f}"
    std = NO_STD if stat["std"] is None else f"{scale * stat['std']:.{digits}f}"
    return f"{mean} ± {std}"


# ---- running and reusing ----


def load_complete_result(run_dir: Path, settings: dict) -> dict | None:
    """The run's result.json if the tool wrote it for these settings, else None (the run must be redone)."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    return result if result.get("settings") == settings else None


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
        result = {"name": run.name, "selector": run.selector, "ratio": run.ratio, "seed": run.seed}
        result |= measured
        result["settings"] = settings
        _write_json(run_dir / RESULT_FILE, result)
        print(f"[ta-opd compare] run {run.name} done: {_one_line(result)}", flush=True)
        results.append(result)
    return results, failed


def _one_line(result: dict) -> str:
    return (
        f"accuracy {result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}, kept "
        f"{result['kept_fraction']:.4f}, held-out reverse KL {result['heldout_reverse_kl_before']:.4f} -> "
        f"{result['heldout_reverse_kl_after']:.4f}, {result['wall_seconds']:.0f}s"
    )


def _write_json(path: Path, payload: dict) -> None:
    """Write through a temporary file so an interruption never leaves a half-written result behind."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


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
        from ta_opd_verl.diagnose.models import CheckpointError, check_trained_checkpoint, config_vocab_size
        from ta_opd_verl.launch import run_verl

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


class HeldoutReverseKL:
    """Full-vocabulary reverse KL(p_student || p_teacher), averaged over every response position of a fixed
    set: the teacher's greedy answers to the first `HELDOUT_PROMPTS` validation prompts, built once and
    cached as a diagnostic bank (``heldout.parquet``, rebuilt when the pair or its paths change)."""

    def __init__(self, pair, path: Path) -> None:
        import torch
        from transformers import AutoTokenizer

        from ta_opd_verl.diagnose.bank import BankError, load_bank, save_bank
        from ta_opd_verl.diagnose.models import config_vocab_size, load_model

        self.tokenizer = AutoTokenizer.from_pretrained(pair.teacher)
        self.pad_id = self.tokenizer.pad_token_id
        self.vocab_size = config_vocab_size(pair.teacher, "teacher")
        self.teacher = load_model(pair.teacher, "cpu", torch.float32, "teacher")
        wanted = {
            "teacher": str(pair.teacher),
            "pair_settings_hash": pair.manifest.get("settings_hash"),
            "data": str(pair.val_parquet),
            "prompts": HELDOUT_PROMPTS,
        }
        try:
            bank = load_bank(path) if path.is_file() else None
        except BankError:
            bank = None
        if bank is None or {key: bank.settings.get(key) for key in wanted} != wanted:
            bank = self._greedy_bank(pair.val_parquet, wanted)
            save_bank(bank, path)
        self.bank = bank

    def _greedy_bank(self, val_parquet: Path, settings: dict):
        import torch

        from ta_opd_verl.diagnose.bank import BANK_FORMAT, Bank, prompt_token_ids, read_prompts

        prompts = read_prompts(val_parquet, HELDOUT_PROMPTS)
        encoded = [prompt_token_ids(self.tokenizer, messages) for _, messages in prompts]
        width = max(map(len, encoded))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        eos_id = self.tokenizer.eos_token_id
        with torch.no_grad():
            generated = self.teacher.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=HELDOUT_RESPONSE_TOKENS,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=self.pad_id,
            )
        responses = []
        for row in generated[:, width:].tolist():
            # Up to and including EOS, as verl's response mask counts it.
            end = row.index(eos_id) + 1 if eos_id in row else len(row)
            responses.append(tuple(row[:end]))
        return Bank(
            prompt_index=tuple(index for index, _ in prompts),
            sample=(0,) * len(prompts),
            prompts=tuple(tuple(messages) for _, messages in prompts),
            prompt_ids=tuple(tuple(ids) for ids in encoded),
            response_ids=tuple(responses),
            settings={**settings, "format": BANK_FORMAT},
        )

    def measure(self, student_path: Path | str) -> float:
        import torch

        from ta_opd_verl.diagnose.models import load_model, response_logits

        student = load_model(student_path, "cpu", torch.float32, "student")
        rows = slice(0, self.bank.rollouts)
        with torch.no_grad():
            student_logits = response_logits(student, self.bank, rows, self.pad_id)[..., : self.vocab_size]
            teacher_logits = response_logits(self.teacher, self.bank, rows, self.pad_id)[
                ..., : self.vocab_size
            ]
            student_lp = student_logits.float().log_softmax(-1)
            teacher_lp = teacher_logits.float().log_softmax(-1)
            per_position = (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
            return float(per_position[self.bank.valid_mask()].mean())


# ---- outputs ----


def write_outputs(out_dir: Path, plan: Sequence[PlannedRun], results: list[dict], settings: dict) -> dict:
    rows = aggregate(results)
    missing = [run.name for run in plan if run.name not in {r["name"] for r in results}]
    summary = {"settings": settings, "missing_runs": missing, "rows": rows, "runs": results}
    _write_json(out_dir / "summary.json", summary)
    extra = f", extra overrides `{' '.join(settings['extra'])}`" if settings["extra"] else ""
    header = [
        "# TA-OPD selectors and budgets on the tiny pair (`ta-opd compare`)",
        "",
        f"{settings['steps']} steps per run of {settings['prompts']} prompts, lr {settings['lr']:g}, "
        f"otherwise the demo's settings (`ta_opd_verl/demo.py`, {DEMO_STEPS} steps): top-p {DEMO_TOP_P:g} "
        f"rollouts, the teacher colocated in the actor's worker with exact compatibility{extra}. "
        "Mean ± sample standard deviation over seeds (– for a single seed). Gain: verl's validation "
        "accuracy at the last step minus step 0's. Reverse-KL reduction: KL(student || teacher) on the "
        f"teacher's greedy answers to {HELDOUT_PROMPTS} validation prompts, initial minus trained student. "
        "Kept fraction: `actor/ta_opd/kept_fraction` averaged over steps (min-keep 1 per sample raises it "
        "above ρ). Wall: verl's whole run, start-up included.",
        "",
    ]
    if missing:
        header += [f"Missing runs ({len(missing)} of {len(plan)}): {', '.join(missing)}.", ""]
    # A blank line before the table: a table row right after a paragraph line is read as part of it.
    (out_dir / "table.md").write_text("\n".join(header) + "\n" + render_table(rows))
    if rows:
        plot_comparison(rows, out_dir / "compare.png")
    return summary


def plot_comparison(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at_main = [row for row in rows if row["ratio"] == MAIN_RATIO]
    budget = sorted((row for row in rows if row["selector"] == BUDGET_SELECTOR), key=lambda row: row["ratio"])
    figure, (gain_axis, kl_axis, budget_axis) = plt.subplots(1, 3, figsize=(17, 4.5))
    names = [f"{row['selector']}\nkept {100 * row['kept_fraction']['mean']:.1f}%" for row in at_main]
    for axis, field, scale, label in (
        (gain_axis, "gain", 100, "accuracy gain (points)"),
        (kl_axis, "kl_reduction", 1, "held-out reverse-KL reduction (nats)"),
    ):
        means = [scale * row[field]["mean"] for row in at_main]
        errors = [scale * (row[field]["std"] or 0.0) for row in at_main]
        axis.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
        axis.axhline(0, color="gray", linewidth=0.8)
        axis.set(ylabel=label, title=f"{label.split(' (')[0]} at ρ = {MAIN_RATIO:g} (± std over seeds)")
        axis.tick_params(axis="x", labelsize=8)
    ratios = [row["ratio"] for row in budget]
    budget_axis.plot(ratios, [100 * row["gain"]["mean"] for row in budget], marker="o", color="tab:blue")
    budget_axis.set(xscale="log", xlabel="ρ", title=f"{BUDGET_SELECTOR}: budget curve")
    budget_axis.set_ylabel("accuracy gain (points)", color="tab:blue")
    kl_twin = budget_axis.twinx()
    kl_twin.plot(ratios, [row["kl_reduction"]["mean"] for row in budget], marker="s", color="tab:red")
    kl_twin.set_ylabel("reverse-KL reduction (nats)", color="tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line ----


def _ratios(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def _selectors(text: str) -> list[str]:
    names = [item for item in text.split(",") if item]
    unknown = [name for name in names if name not in SELECTORS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown selector(s) {unknown}; choose from {', '.join(SELECTORS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ta-opd compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/compare", help="output folder (default: outputs/compare)")
    # The plan
    parser.add_argument(
        "--selectors",
        type=_selectors,
        default=list(COMPARED_SELECTORS),
        help=f"comma-separated, each at ρ = {MAIN_RATIO:g} (default: {','.join(COMPARED_SELECTORS)})",
    )
    parser.add_argument(
        "--seeds", type=int, default=SEEDS, help=f"training seeds per selector (default: {SEEDS})"
    )
    parser.add_argument(
        "--budgets",
        type=_ratios,
        default=list(BUDGET_RATIOS),
        help=f"extra ρ for {BUDGET_SELECTOR}, one seed each (default: {','.join(map(str, BUDGET_RATIOS))})",
    )
    # Each run
    parser.add_argument(
        "--steps", type=int, default=COMPARE_STEPS, help=f"training steps per run (default: {COMPARE_STEPS})"
    )
    parser.add_argument(
        "--lr", type=float, default=DEMO_LR, help=f"Adam learning rate (default: the demo's {DEMO_LR:g})"
    )
    # What to do
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their overrides; run nothing"
    )
    parser.add_argument("--only", metavar="NAME", help="run only this planned run (e.g. tip-r0.05-s1)")
    return parser


def print_plan(plan: Sequence[PlannedRun], steps: int, lr: float, extra: Sequence[str]) -> None:
    """Overrides every run shares once, then each run's own."""
    from ta_opd_verl.tiny.build import planned_pair

    pair = planned_pair()
    per_run = {run.name: run_overrides(run, steps, lr, pair, extra) for run in plan}
    shared = [item for item in next(iter(per_run.values()), []) if all(item in o for o in per_run.values())]
    print(f"[ta-opd compare] {len(plan)} runs of verl's trainer, config {CONFIG_NAME}, with:")
    for item in shared:
        print(f"  {item}")
    for index, (name, overrides) in enumerate(per_run.items(), start=1):
        print(f"run {index}/{len(plan)} {name}: {' '.join(item for item in overrides if item not in shared)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    plan = comparison_plan(args.selectors, args.seeds, args.budgets)
    selected = [run for run in plan if args.only in (None, run.name)]
    if not selected:
        planned = ", ".join(run.name for run in plan)
        print(f"--only {args.only}: not a planned run; planned: {planned}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(selected, args.steps, args.lr, extra)
        return 0
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from ta_opd_verl.tiny.build import build_tiny_pair

    # A result measured on another pair (a rebuilt student, other settings) or another runtime (verl's
    # teacher server, top-p 1: the comparison before 2026-11-30) must not be reused.
    pair = build_tiny_pair()
    settings = {
        "steps": args.steps,
        "lr": args.lr,
        "prompts": DEMO_PROMPTS,
        "runtime": demo_runtime_overrides(pair),
        "extra": extra,
        "pair": pair.manifest["settings_hash"],
    }
    _, failed = run_comparison(
        selected, out_dir, settings, VerlRun(pair, out_dir, args.steps, args.lr, extra)
    )
    complete = [r for r in (load_complete_result(out_dir / "runs" / run.name, settings) for run in plan) if r]
    write_outputs(out_dir, plan, complete, settings)
    print(f"[ta-opd compare] {len(complete)}/{len(plan)} runs complete; table: {out_dir / 'table.md'}")
    if failed:
        print(f"[ta-opd compare] failed (rerun to retry): {', '.join(failed)}")
    return 1 if failed else 0
