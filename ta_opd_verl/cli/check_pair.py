"""`ta-opd check-pair`: the pre-flight check of a student and a teacher folder, without starting anything.

It runs what a training run checks before Ray starts (`ta_opd_verl.vocab.check_pair`: embeddings against
config.json, the vocabulary rule, the special-token map) and prints the map it would use, or that none is
needed (exit 0), or the refusal (exit 2, the status of a refused run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ta_opd_verl.special_tokens import MODES, SpecialTokenMismatchError, special_token_map_error
from ta_opd_verl.vocab import VocabularyMismatchError, check_pair

REFUSED = 2


def _special_token_map(value: str):
    """``auto``, ``none`` or a JSON object of ids (``{"151645": 151643}``: JSON keys are strings)."""
    if value in MODES:
        return value
    try:
        parsed = json.loads(value)
        mapping = {int(key): target for key, target in parsed.items()}
    except (ValueError, AttributeError):
        mapping = None
    if mapping is None or special_token_map_error(mapping) is not None:
        raise argparse.ArgumentTypeError(
            f"{value!r}: one of {list(MODES)} or a JSON object of token ids, e.g. '{{\"151645\": 151643}}'"
        )
    return mapping


def _model_folder(value: str) -> Path:
    path = Path(value)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a model folder: a folder with config.json is accepted"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd check-pair", description=__doc__)
    parser.add_argument("--teacher", required=True, type=_model_folder, help="the teacher's model folder")
    parser.add_argument("--student", required=True, type=_model_folder, help="the student's model folder")
    parser.add_argument(
        "--special-token-map",
        default="auto",
        type=_special_token_map,
        help="auto (default, as distillation.distillation_loss.ta_opd.special_token_map), none, or a JSON "
        "object student_id: teacher_id",
    )
    args = parser.parse_args(argv)
    try:
        pair = check_pair(args.student, args.teacher, args.special_token_map)
    except (VocabularyMismatchError, SpecialTokenMismatchError) as error:
        print(f"ta-opd check-pair: refused: {error}", file=sys.stderr)
        return REFUSED
    print(f"student {args.student} and teacher {args.teacher}: accepted")
    for line in pair.summary():
        print(line)
    return 0
