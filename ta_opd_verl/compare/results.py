"""The comparison's numbers: each run's stored result, their aggregation over seeds, the table and the
files of a comparison (``summary.json``, ``table.md``, ``compare.png``)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from ta_opd_verl.compare.heldout import HELDOUT_PROMPTS
from ta_opd_verl.compare.plan import PlannedRun
from ta_opd_verl.compare.plot import plot_comparison
from ta_opd_verl.demo.run import DEMO_LOSS, DEMO_STEPS, DEMO_TOP_P

RESULT_FILE = "result.json"
NO_STD = "–"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation of a single value is undefined: None."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One row per (selector, loss, ratio), in order of first appearance, over the seeds present (a result
    without a loss, from before the loss was a dimension, ran the demo's).

    The gain is the validation accuracy at the last step minus step 0's; the reverse-KL reduction is the
    held-out reverse KL of the initial student minus the trained one's (positive: closer to the teacher).
    Each measured field is a ``{"mean": m, "std": s}`` pair, ``s`` None for a single seed.
    """
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for result in results:
        groups.setdefault((result["selector"], result.get("loss", DEMO_LOSS), result["ratio"]), []).append(
            result
        )
    rows = []
    for (selector, loss, ratio), members in groups.items():
        fields = {
            "kept_fraction": [r["kept_fraction"] for r in members],
            "gain": [r["accuracy_after"] - r["accuracy_before"] for r in members],
            "kl_reduction": [r["heldout_reverse_kl_before"] - r["heldout_reverse_kl_after"] for r in members],
            "wall_seconds": [r["wall_seconds"] for r in members],
        }
        row = {"selector": selector, "loss": loss, "ratio": ratio, "n": len(members)}
        row["seeds"] = [r["seed"] for r in members]
        for field, values in fields.items():
            mean, std = mean_std(values)
            row[field] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def render_table(rows: Sequence[dict]) -> str:
    """A markdown table of `aggregate`'s rows: gain in accuracy points, KL in nats, wall in seconds."""
    lines = [
        "| selector | loss | ρ | seeds | kept fraction | accuracy gain (points) | held-out reverse-KL "
        "reduction (nats) | wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["selector"],
            row["loss"],
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


def write_json(path: Path, payload: dict) -> None:
    """Write through a temporary file so an interruption never leaves a half-written result behind."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def write_outputs(out_dir: Path, plan: Sequence[PlannedRun], results: list[dict], settings: dict) -> dict:
    """``summary.json``, ``table.md`` and (with at least one result) ``compare.png``; returns the summary."""
    rows = aggregate(results)
    missing = [run.name for run in plan if run.name not in {r["name"] for r in results}]
    summary = {"settings": settings, "missing_runs": missing, "rows": rows, "runs": results}
    write_json(out_dir / "summary.json", summary)
    extra = f", extra overrides `{' '.join(settings['extra'])}`" if settings["extra"] else ""
    header = [
        "# TA-OPD selectors, losses and budgets on the tiny pair (`ta-opd compare`)",
        "",
        f"{settings['steps']} steps per run of {settings['prompts']} prompts, lr {settings['lr']:g}, "
        f"otherwise the demo's settings (`ta_opd_verl/demo/run.py`, {DEMO_STEPS} steps): "
        f"top-p {DEMO_TOP_P:g} rollouts, the teacher colocated in the actor's worker with exact "
        f"compatibility{extra}. "
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
