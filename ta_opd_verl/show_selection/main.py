"""`ta-opd show-selection`: a run's selection dump as one self-contained HTML page.

    ta-opd show-selection outputs/run/selection                  # the last step -> selection/selection.html
    ta-opd show-selection DUMP --steps all --out page.html
    ta-opd show-selection DUMP --steps 5,10 --tokenizer ~/models/Qwen3-1.7B

The dump is the folder a run's ``distillation.distillation_loss.ta_opd.selection_dump_dir`` names. The
student's tokenizer, found by default where the dump's header says the student's model was, turns token
ids into text. The page (`page`) shows per step the selector, ρ, the kept fraction and D, C, H at the
normalisation's quantiles, and per sample its prompt and its response tokens coloured by the selector's
score, the selected ones outlined, with D, C, H and their normalised values on hover.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ta_opd_verl.show_selection.page import render_page
from ta_opd_verl.show_selection.steps import DumpError, page_data, read_steps
from ta_opd_verl.show_selection.tokens import TokenizerNotFoundError, load_tokenizer

PAGE_NAME = "selection.html"


def write_selection_page(
    dump: Path, out: Path, *, steps: str = "last", tokenizer: Path | None = None
) -> tuple[Path, dict]:
    """Write the page for the chosen steps of ``dump`` to ``out``; returns ``out`` and the page's data.
    ``tokenizer``: a tokenizer folder, else the student's model folder the dump's header names."""
    chosen = read_steps(dump, steps)
    if tokenizer is None:
        last_header, _ = chosen[max(chosen)]
        student = last_header.get("student_path")
        if not student:
            raise DumpError(f"{dump}: the header names no student model; pass --tokenizer DIR")
        tokenizer = Path(student)
    data = page_data(chosen, load_tokenizer(tokenizer), source=str(dump), tokenizer_path=str(tokenizer))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(data), encoding="utf-8")
    return out, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ta-opd show-selection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dump", type=Path, help="the selection dump folder (ta_opd.selection_dump_dir)")
    parser.add_argument("--out", type=Path, help=f"the page to write (default: DUMP/{PAGE_NAME})")
    parser.add_argument(
        "--steps", default="last", help="'last' (default), 'all', or step numbers such as 5,10"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a local Hugging Face folder with the student's tokenizer (default: the student's model folder "
        "the dump's header names)",
    )
    args = parser.parse_args(argv)
    try:
        out, data = write_selection_page(
            args.dump, args.out or args.dump / PAGE_NAME, steps=args.steps, tokenizer=args.tokenizer
        )
    except (DumpError, TokenizerNotFoundError) as error:
        print(f"ta-opd show-selection: {error}", file=sys.stderr)
        return 2
    shown = ", ".join(str(step["summary"]["step"]) for step in data["steps"])
    print(f"[ta-opd show-selection] step {shown}: {out}")
    return 0
