"""`ta-opd compare`: TA-OPD's selectors and budgets through verl's trainer on the tiny pair (a benchmark).

Runs, with the same step budget and the demo's settings (`ta_opd_verl.demo.run.demo_run_overrides`: 128
prompts per step, top-p 0.7 rollouts, the teacher colocated in the actor's worker with exact
compatibility) for 16 steps instead of the demo's full length, the selectors `full`, `teachability`,
`random`, `entropy`, `raw_kl` and `tip` at ρ = 0.05 with 3 training seeds each, and `teachability` at
ρ = 0.01, 0.03, 0.10 and 0.20 with one seed: 22 runs of ``python -m verl.trainer.main_ppo`` with
``conf/ta_opd_cpu.yaml``. Each run validates at step 0 and at its last step and saves its student as a
Hugging Face model; after it, the student's reverse KL KL(p_student || p_teacher) is measured on a fixed
held-out set (the teacher's greedy answers to the first 64 validation prompts, full vocabulary, averaged
over response positions) for the initial and the trained student. Written to ``--out`` (default
``outputs/compare``):

- ``runs/<name>/result.json``: one run's numbers, written only after the run succeeded; a run whose
  result.json exists with the same settings (steps, lr, prompts per step, the demo's runtime overrides,
  extra overrides, and the tiny pair's settings hash) is reused, any other run folder
  is cleared and run again, so an interrupted comparison resumes where it stopped;
- ``table.md``: per selector and ρ, mean ± sample standard deviation over seeds of the accuracy gain,
  the held-out reverse-KL reduction and the wall time, with the actual kept fraction beside the gain
  (a group of one seed shows its standard deviation as "–");
- ``summary.json`` (the table's numbers and every run's result) and ``compare.png``.

How long a run and the whole comparison take on a 2-core machine: docs/benchmarks.md ("Selector
comparison through verl's trainer").

    ta-opd compare                          # all 22 runs (resumes), then table and plot
    ta-opd compare --dry-run                # the plan: run names and verl overrides, nothing runs
    ta-opd compare --only tip-r0.05-s1      # one run, then the table of whatever is complete
    ta-opd compare --steps 40 -- actor_rollout_ref.actor.ppo_mini_batch_size=16   # after --: to verl

The loss is a dimension too: ``--losses`` runs the whole plan with each loss (default: the demo's,
``reverse_kl_topk``; a run with another loss is named ``<selector>-<loss>-r<ρ>-s<seed>``), e.g. the four
losses with TA-OPD and full OPD at ρ = 0.05, 3 seeds each (24 runs):

    ta-opd compare --selectors teachability,full --budgets= \\
        --losses pg_k1,reverse_kl_topk,reverse_kl_topk_tail,reverse_kl_full
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ta_opd_verl.cli.train import positive_int, split_overrides
from ta_opd_verl.compare.plan import (
    BUDGET_RATIOS,
    BUDGET_SELECTOR,
    COMPARE_STEPS,
    COMPARED_SELECTORS,
    CONFIG_NAME,
    MAIN_RATIO,
    SEEDS,
    PlannedRun,
    comparison_plan,
    run_overrides,
)
from ta_opd_verl.compare.results import load_complete_result, write_outputs
from ta_opd_verl.compare.runner import VerlRun, run_comparison
from ta_opd_verl.config import LOSSES
from ta_opd_verl.demo.run import DEMO_LOSS, DEMO_LR, DEMO_PROMPTS, demo_runtime_overrides
from ta_opd_verl.teachability import SELECTORS
from ta_opd_verl.tiny.build import build_tiny_pair, planned_pair


def _ratios(text: str) -> list[float]:
    """argparse type: comma-separated budgets ρ, each in (0, 1] (what ``ta_opd.ratio`` accepts)."""
    try:
        ratios = [float(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated numbers in (0, 1] are accepted"
        ) from None
    wrong = [ratio for ratio in ratios if not 0 < ratio <= 1]
    if wrong:
        raise argparse.ArgumentTypeError(
            f"budget(s) {wrong} outside (0, 1]; a budget is a share of the positions"
        )
    return ratios


def _selectors(text: str) -> list[str]:
    names = [item for item in text.split(",") if item]
    unknown = [name for name in names if name not in SELECTORS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown selector(s) {unknown}; choose from {', '.join(SELECTORS)}")
    return names


def _losses(text: str) -> list[str]:
    names = [item for item in text.split(",") if item]
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")
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
        "--seeds", type=positive_int, default=SEEDS, help=f"training seeds per selector (default: {SEEDS})"
    )
    parser.add_argument(
        "--losses",
        type=_losses,
        default=[DEMO_LOSS],
        help=f"comma-separated ta_opd.loss values, the whole plan with each (default: {DEMO_LOSS})",
    )
    parser.add_argument(
        "--budgets",
        type=_ratios,
        default=list(BUDGET_RATIOS),
        help=f"extra ρ for {BUDGET_SELECTOR}, one seed each (default: {','.join(map(str, BUDGET_RATIOS))})",
    )
    # Each run
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=COMPARE_STEPS,
        help=f"training steps per run (default: {COMPARE_STEPS})",
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
    pair = planned_pair()
    per_run = {run.name: run_overrides(run, steps, lr, pair, extra) for run in plan}
    shared = [item for item in next(iter(per_run.values()), []) if all(item in o for o in per_run.values())]
    print(f"[ta-opd compare] {len(plan)} runs of verl's trainer, config {CONFIG_NAME}, with:")
    for item in shared:
        print(f"  {item}")
    for index, (name, overrides) in enumerate(per_run.items(), start=1):
        print(f"run {index}/{len(plan)} {name}: {' '.join(item for item in overrides if item not in shared)}")


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_overrides(argv)
    args = build_parser().parse_args(argv)
    plan = comparison_plan(args.selectors, args.seeds, args.budgets, losses=args.losses)
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
