"""The demo's report from verl's per-step metrics, and its plot (validation accuracy and the sampled-token
reverse KL per step)."""

from __future__ import annotations

import itertools
from pathlib import Path

from ta_opd_verl.cli.train import RunResult, validation_accuracy


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
# rollouts and swings from step to step by more than it falls over a whole demo run.
REVERSE_KL_WINDOW = 10


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` values before it (the first points average fewer)."""
    if window < 1:
        raise ValueError(f"trailing_mean: window must be >= 1, got {window}")
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def plot_report(report: dict, path: Path) -> None:
    # matplotlib only where a plot is drawn (`report_figure` selects its Agg backend first).
    import matplotlib.pyplot as plt

    figure = report_figure(report)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_figure(report: dict):
    """Validation accuracy and the sampled-token reverse KL per step, side by side (a matplotlib Figure)."""
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
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
