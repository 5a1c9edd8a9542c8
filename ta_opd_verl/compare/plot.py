"""``compare.png``: the accuracy gain and the held-out reverse-KL reduction per selector, and the budget
curve of `BUDGET_SELECTOR` when more than one budget ran."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ta_opd_verl.compare.plan import BUDGET_SELECTOR, MAIN_RATIO


def plot_comparison(rows: Sequence[dict], path: Path) -> None:
    """`results.aggregate`'s rows as three panels, written to ``path``."""
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at_main = [row for row in rows if row["ratio"] == MAIN_RATIO]
    budget = sorted((row for row in rows if row["selector"] == BUDGET_SELECTOR), key=lambda row: row["ratio"])
    has_curve = len({row["ratio"] for row in budget}) > 1
    figure, axes = plt.subplots(1, 3 if has_curve else 2, figsize=(17 if has_curve else 12, 4.5))
    gain_axis, kl_axis = axes[:2]
    # The loss under the selector's name only when the rows compare losses.
    compares_losses = len({row["loss"] for row in rows}) > 1

    def bar_name(row: dict) -> str:
        loss = f"\n{row['loss']}" if compares_losses else ""
        return f"{row['selector']}{loss}\nkept {100 * row['kept_fraction']['mean']:.1f}%"

    names = [bar_name(row) for row in at_main]
    for axis, field, scale, label in (
        (gain_axis, "gain", 100, "accuracy gain (points)"),
        (kl_axis, "kl_reduction", 1, "held-out reverse-KL reduction (nats)"),
    ):
        means = [scale * row[field]["mean"] for row in at_main]
        errors = [scale * (row[field]["std"] or 0.0) for row in at_main]
        axis.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
        axis.axhline(0, color="gray", linewidth=0.8)
        axis.set(ylabel=label, title=f"{label.split(' (')[0]} at ρ = {MAIN_RATIO:g} (± std over seeds)")
        axis.tick_params(axis="x", labelsize=8, labelrotation=30 if len(names) > 4 else 0)
    if has_curve:
        _budget_curve(axes[2], budget, compares_losses)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _budget_curve(budget_axis, budget: Sequence[dict], compares_losses: bool) -> None:
    kl_twin = budget_axis.twinx()
    # One curve per loss; the line style tells the losses apart.
    for loss, style in zip(
        dict.fromkeys(row["loss"] for row in budget), ("-", "--", ":", "-."), strict=False
    ):
        curve = [row for row in budget if row["loss"] == loss]
        ratios = [row["ratio"] for row in curve]
        gains = [100 * row["gain"]["mean"] for row in curve]
        budget_axis.plot(ratios, gains, style, marker="o", color="tab:blue", label=loss)
        kl_twin.plot(
            ratios, [row["kl_reduction"]["mean"] for row in curve], style, marker="s", color="tab:red"
        )
    budget_axis.set(xscale="log", xlabel="ρ", title=f"{BUDGET_SELECTOR}: budget curve")
    budget_axis.set_ylabel("accuracy gain (points)", color="tab:blue")
    if compares_losses:
        budget_axis.legend(fontsize="small")
    kl_twin.set_ylabel("reverse-KL reduction (nats)", color="tab:red")
