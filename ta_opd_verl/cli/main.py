"""`ta-opd`: the package's command line. Each subcommand lives in its own module and is imported lazily,
so `ta-opd --help` stays fast and a subcommand's heavy imports happen only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with a `main(argv) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-tiny": (
        "ta_opd_verl.tiny.command",
        "build (or reuse) the tiny CPU teacher/student pair and its data",
    ),
    "build-shapes": (
        "ta_opd_verl.shapes.build",
        "build (or reuse) the paper's models shrunken to 2 layers (real tokenizers, vocabularies, layouts)",
    ),
    "check-pair": (
        "ta_opd_verl.cli.check_pair",
        "the pre-flight check of a student and a teacher folder: vocabulary and special-token map",
    ),
    "diagnose": (
        "ta_opd_verl.diagnose.main",
        "the paper's fixed-context diagnostic: which score predicts the gain (report in outputs/diagnose)",
    ),
    "compare": (
        "ta_opd_verl.compare.main",
        "benchmark: selectors and budgets through verl on the tiny pair (table and plot in outputs/compare)",
    ),
    "demo": (
        "ta_opd_verl.demo.run",
        "TA-OPD on the tiny pair through verl's trainer; report and plot in outputs/demo",
    ),
    "prepare-data": (
        "ta_opd_verl.data.prepare",
        "DAPO-Math-17k or GSM8K (a downloaded copy, or --download) as verl parquet files",
    ),
    "show-selection": (
        "ta_opd_verl.show_selection.main",
        "a selection dump (ta_opd.selection_dump_dir) as one self-contained HTML page",
    ),
    "recipe-cpu": (
        "ta_opd_verl.shapes.recipe_cpu",
        "run a recipe (recipes/*.sh) for real on the CPU, on the shrunken real models (outputs/recipe-cpu)",
    ),
    "train": ("ta_opd_verl.cli.train", "run verl's trainer with TA-OPD (on CPU: on the tiny pair)"),
}


# The shell's status for a command stopped by SIGINT (128 + 2).
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ta-opd", description=__doc__)
    parser.add_argument(
        "command",
        choices=sorted(SUBCOMMANDS),
        help="; ".join(f"{name}: {help_}" for name, (_, help_) in sorted(SUBCOMMANDS.items())),
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except KeyboardInterrupt:
        # The subcommands stop what they started on the way out (`cli.train.supervise`); the traceback
        # would only say where Ctrl-C landed.
        print(f"\nta-opd {args.command}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
