"""`ta-opd prepare-data`: DAPO-Math-17k and GSM8K as verl parquet files for the recipes under recipes/.

    ta-opd prepare-data dapo-math --source ~/downloads/dapo-math-17k.parquet --out ~/data/ta-opd/dapo-math
    ta-opd prepare-data gsm8k --source ~/downloads/gsm8k --out ~/data/ta-opd/gsm8k
    ta-opd prepare-data gsm8k --download --out ~/data/ta-opd/gsm8k      # needs network access
    ta-opd prepare-data dapo-math --generate 2000 --out data/dapo-math    # offline: generated problems
    ta-opd prepare-data gsm8k --source ~/downloads/gsm8k --out ~/data/ta-opd/gsm8k-privileged \
        --teacher-prompt reference-solution --teacher-system-prompt "You are a careful math teacher."

``--source`` reads what a user downloaded: a ``.parquet`` or JSON Lines (``.jsonl``/``.json``) file, or a
folder holding them (a dataset snapshot: GSM8K's ``main/train-*.parquet`` and ``main/test-*.parquet``,
DAPO-Math's ``data/*.parquet``). ``--download`` fetches the dataset through the ``datasets`` library (a
dependency of verl, so wherever verl is installed). Both need the same columns as the published datasets:
DAPO-Math-17k rows already in verl's layout (``prompt``, ``reward_model.ground_truth``, ...), GSM8K rows
``question`` and ``answer`` (a worked solution ending in ``#### <number>``). ``--generate N`` writes N
generated problems in the dataset's published format under ``<out>/source/`` and prepares them as a
``--source`` (`ta_opd_verl.data.generate`: no network needed).

Output rows, in the columns verl's RL dataset reads (`ta_opd_verl.tiny.parquet` writes the same layout):
``data_source`` (``math_dapo`` or ``openai/gsm8k``: the names verl's default reward function dispatches
on), ``prompt`` (one user message), ``ability`` (``math``), ``reward_model`` (``{"style": "rule",
"ground_truth": str}``) and ``extra_info`` (``{"split", "index", "source_id"}``, the same keys for both
datasets, so their files can be mixed in one ``data.val_files`` list).

Scoring: our GPU config sets no custom reward function, so verl's reward loop (the ``naive`` reward
manager) calls ``verl.utils.reward_score.default_compute_score``, which scores ``math_dapo`` rows with
``math_dapo.compute_score`` (the last ``Answer: ...`` line, Minerva-normalised, then a ``\\boxed{}``
fallback; 1.0 or -1.0) and ``openai/gsm8k`` rows with ``gsm8k.compute_score`` (the last ``#### <number>``,
strict; 1.0 or 0.0). TA-OPD trains on the teacher alone, so these scores only feed validation metrics.
Every prepared row is checked with that same function on a reference answer (DAPO: ``Answer: <ground
truth>``; GSM8K: the dataset's own worked solution): a row with an empty ground truth, or one verl would
not score as correct, is dropped and counted.

DAPO-Math-17k's published file repeats its prompts; rows are de-duplicated by prompt text (first kept)
unless ``--keep-duplicates``. A seeded held-out slice of ``--val-size`` prompts becomes ``val.parquet``.

Teacher-side prompts (privileged context only the teacher sees: on-policy self-distillation, context
distillation). With ``--teacher-prompt reference-solution`` and/or ``--teacher-system-prompt TEXT`` every
written row (every split) gets one more column, ``teacher_prompt`` (``--teacher-prompt-column NAME`` names
it otherwise; it must match ``distillation.distillation_loss.ta_opd.teacher_prompt_column``): chat messages
for the teacher, a system message holding TEXT when given, then the row's user message. With
``reference-solution`` that message's content (the student's, unchanged) is followed by the row's reference
answer, the same one checked above (GSM8K: the dataset's worked solution, ending in ``#### <number>``;
DAPO-Math: ``Answer: <ground truth>``), in `REFERENCE_SOLUTION_BLOCK`::

    <the student's prompt>

    A reference solution follows; use it to check your reasoning, but do not mention it.
    <reference_solution>
    <the solution>
    </reference_solution>

The student's ``prompt`` column is unchanged. Train with
``distillation.distillation_loss.ta_opd.teacher_prompt=column`` (the teacher renders the column with its
own chat template; ``ta_opd_verl.teacher_prompts``). Without these options the files are as before.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ta_opd_verl.data.generate import write_source
from ta_opd_verl.tiny.parquet import COLUMNS

ABILITY = "math"
DATA_FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
# verl's own GSM8K preprocessing appends this instruction; its strict scorer reads the "#### " line.
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
DEFAULT_DAPO_VAL_SIZE = 512
# `ta_opd_verl.config.TAOPDConfig.teacher_prompt_column`'s default (not imported: the config loads verl).
DEFAULT_TEACHER_PROMPT_COLUMN = "teacher_prompt"
REFERENCE_SOLUTION = "reference-solution"
TEACHER_PROMPT_SOURCES = (REFERENCE_SOLUTION,)
REFERENCE_SOLUTION_BLOCK = (
    "\n\nA reference solution follows; use it to check your reasoning, but do not mention it.\n"
    "<reference_solution>\n{solution}\n</reference_solution>"
)


class DataPrepError(ValueError):
    """The source cannot be read or does not have the dataset's columns, or a teacher-prompt option is bad."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where `--download` fetches it, its verl data source, and its splits."""

    hub_id: str
    hub_config: str | None
    data_source: str
    # split name in the source -> output file stem
    splits: dict[str, str]


DATASETS: dict[str, DatasetSpec] = {
    "dapo-math": DatasetSpec(
        hub_id="BytedTsinghua-SIA/DAPO-Math-17k",
        hub_config=None,
        data_source="math_dapo",
        splits={"train": "train"},
    ),
    "gsm8k": DatasetSpec(
        hub_id="openai/gsm8k",
        hub_config="main",
        data_source="openai/gsm8k",
        splits={"train": "train", "test": "test"},
    ),
}


def data_files(source: Path, split: str | None = None) -> list[Path]:
    """The data files of ``source`` (a file, or a folder searched recursively), optionally only those
    whose name starts with ``split`` (GSM8K's ``train-00000-of-00001.parquet``, ``test.jsonl``)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataPrepError(f"{source}: no such file or folder")
    files = sorted(
        path
        for path in source.rglob("*")
        if path.is_file() and path.suffix in DATA_FILE_SUFFIXES and not path.name.startswith(".")
    )
    if split is not None:
        files = [path for path in files if path.name.startswith(split)]
    if not files:
        wanted = f"{split}*" if split else "*"
        raise DataPrepError(f"{source}: no {wanted} file ending in {', '.join(DATA_FILE_SUFFIXES)}")
    return files


def read_records(paths: Iterable[Path]) -> Iterator[dict]:
    """Rows of parquet and JSON Lines files as dicts, streamed (DAPO's file is large)."""
    for path in paths:
        if path.suffix == ".parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        else:
            with open(path) as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError as error:
                            raise DataPrepError(f"{path}:{number}: not a JSON line ({error})") from None


def download_records(spec: DatasetSpec, split: str) -> Iterator[dict]:
    """Rows of ``spec``'s ``split`` through the ``datasets`` library (network access needed)."""
    # Only --download needs `datasets`, which is verl's dependency, not ours.
    import datasets

    yield from datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)


@dataclass(frozen=True)
class TeacherPromptColumn:
    """The teacher-side chat messages written as column ``column`` beside the student's ``prompt``: a
    system message with ``system_prompt`` (when given), then the row's user message, followed with
    ``reference_solution`` by its reference answer in `REFERENCE_SOLUTION_BLOCK`."""

    column: str = DEFAULT_TEACHER_PROMPT_COLUMN
    system_prompt: str | None = None
    reference_solution: bool = False

    def __post_init__(self):
        if not self.column or self.column in COLUMNS:
            raise DataPrepError(
                f"--teacher-prompt-column {self.column!r}: a new column name is accepted, not empty nor one "
                f"of {', '.join(COLUMNS)} (default {DEFAULT_TEACHER_PROMPT_COLUMN})"
            )
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise DataPrepError("--teacher-system-prompt: an empty text; give the system message's text")
        if self.system_prompt is None and not self.reference_solution:
            raise DataPrepError(
                "the teacher prompt would be the student's: give --teacher-prompt reference-solution "
                "and/or --teacher-system-prompt TEXT"
            )

    def messages(self, row: dict, reference: str) -> list[dict]:
        """The teacher's chat messages for ``row`` (whose reference answer is ``reference``)."""
        (user,) = row["prompt"]
        content = user["content"]
        if self.reference_solution:
            content += REFERENCE_SOLUTION_BLOCK.format(solution=reference)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [*system, {"role": "user", "content": content}]

    def add_to(self, rows: list[dict], references: list[str]) -> None:
        """Give each row its teacher messages, built from its own reference answer."""
        for row, reference in zip(rows, references, strict=True):
            row[self.column] = self.messages(row, reference)


def _row(data_source: str, content: str, ground_truth: str, split: str, index: int, source_id: str) -> dict:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "source_id": source_id},
    }


def _field(record: dict, key: str, number: int):
    if key not in record:
        raise DataPrepError(f"row {number} has no {key!r} column (columns: {sorted(record)})")
    return record[key]


def dapo_rows(records: Iterable[dict], *, deduplicate: bool = True) -> tuple[list[dict], int]:
    """verl rows (split ``train``) from DAPO-Math-17k records; returns (rows, duplicates dropped)."""
    rows, seen, duplicates = [], set(), 0
    for number, record in enumerate(records):
        messages = _field(record, "prompt", number)
        if isinstance(messages, str) or not messages:
            raise DataPrepError(f"row {number}: 'prompt' must be a non-empty list of chat messages")
        content = "\n\n".join(str(message["content"]) for message in messages)
        if deduplicate and content in seen:
            duplicates += 1
            continue
        seen.add(content)
        ground_truth = _field(record, "reward_model", number)["ground_truth"]
        source_id = (record.get("extra_info") or {}).get("index", number)
        rows.append(_row("math_dapo", content, str(ground_truth), "train", len(rows), str(source_id)))
    return rows, duplicates


def gsm8k_rows(records: Iterable[dict], split: str) -> list[dict]:
    """verl rows from GSM8K records (``question``, ``answer``), as verl's own GSM8K example builds them.

    Raises `DataPrepError` when an answer has no ``#### <number>`` line."""
    rows = []
    for number, record in enumerate(records):
        question, answer = _field(record, "question", number), _field(record, "answer", number)
        match = GSM8K_ANSWER.search(answer)
        if match is None:
            raise DataPrepError(f"{split} row {number}: the answer has no '#### <number>' line")
        ground_truth = match.group(1).replace(",", "")
        content = f"{question} {GSM8K_INSTRUCTION}"
        rows.append(_row("openai/gsm8k", content, ground_truth, split, number, f"{split}-{number}"))
    return rows


def reference_answer(row: dict, record_answer: str | None = None) -> str:
    """A response verl must score as correct for ``row``: GSM8K's worked solution when given, else the
    DAPO answer line its prompt asks for."""
    if record_answer is not None:
        return record_answer
    return f"Answer: {row['reward_model']['ground_truth']}"


def scores_as_correct(row: dict, response: str) -> bool:
    """Does verl's default reward function (the one its naive reward manager calls) accept ``response``?"""
    # verl takes seconds to import (every verl plugin loads with it); --help and argument errors need none.
    from verl.utils.reward_score import default_compute_score

    result = default_compute_score(row["data_source"], response, row["reward_model"]["ground_truth"])
    return bool(result["acc"]) if isinstance(result, dict) else result == 1.0


def is_scorable(row: dict, reference: str) -> bool:
    """A non-empty ground truth that verl scores ``reference`` as matching. (An empty ground truth passes
    verl's DAPO check against an empty "Answer:" line, so it is refused here first.)"""
    return bool(row["reward_model"]["ground_truth"].strip()) and scores_as_correct(row, reference)


def keep_scorable(rows: list[dict], references: list[str]) -> tuple[list[dict], int]:
    """The rows `is_scorable` accepts with their reference answers (renumbered); and how many were dropped."""
    kept = [row for row, reference in zip(rows, references, strict=True) if is_scorable(row, reference)]
    for index, row in enumerate(kept):
        row["extra_info"]["index"] = index
    return kept, len(rows) - len(kept)


def hold_out(rows: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``rows`` into (train, val) with ``size`` rows drawn with ``seed`` for val; both renumbered."""
    if not 0 <= size < len(rows):
        raise DataPrepError(f"--val-size {size} must be in [0, {len(rows)}) for {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:size])
    train = [row for i, row in enumerate(rows) if i not in val_ids]
    val = [row for i, row in enumerate(rows) if i in val_ids]
    for split, part in (("train", train), ("val", val)):
        for index, row in enumerate(part):
            row["extra_info"].update(split=split, index=index)
    return train, val


def write_rows(path: str | os.PathLike, rows: list[dict], extra_columns: tuple[str, ...] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=[*COLUMNS, *extra_columns]).to_parquet(path, index=False)
    return path


def prepare(
    name: str,
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    val_size: int = DEFAULT_DAPO_VAL_SIZE,
    seed: int = 0,
    deduplicate: bool = True,
    teacher_prompt: TeacherPromptColumn | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Write ``name``'s verl parquet files into ``out_dir`` from ``source`` (None: download); returns
    {split: path}. DAPO-Math gives train (and val when ``val_size`` > 0), GSM8K train and test; with
    ``teacher_prompt`` every row also has the teacher's chat messages in its column."""
    spec = DATASETS[name]
    out_dir = Path(out_dir).expanduser()
    extra_columns = (teacher_prompt.column,) if teacher_prompt else ()

    def with_teacher_prompts(rows: list[dict], references: list[str]) -> list[dict]:
        if teacher_prompt:
            teacher_prompt.add_to(rows, references)
        return rows

    def records(split: str) -> Iterator[dict]:
        if source is None:
            return download_records(spec, split)
        paths = data_files(Path(source).expanduser(), None if name == "dapo-math" else split)
        return read_records(paths)

    written: dict[str, Path] = {}
    if name == "dapo-math":
        rows, duplicates = dapo_rows(records("train"), deduplicate=deduplicate)
        references = [reference_answer(row) for row in rows]
        rows, unscorable = keep_scorable(with_teacher_prompts(rows, references), references)
        log(f"dapo-math: {len(rows)} prompts ({duplicates} duplicates and {unscorable} unscorable dropped)")
        parts = dict(zip(("train", "val"), hold_out(rows, val_size, seed), strict=True))
        for split, part in parts.items():
            if part:
                written[split] = write_rows(out_dir / f"{split}.parquet", part, extra_columns)
    else:
        for split, stem in spec.splits.items():
            source_records = list(records(split))
            references = [record["answer"] for record in source_records]
            rows = with_teacher_prompts(gsm8k_rows(source_records, split), references)
            rows, unscorable = keep_scorable(rows, references)
            log(f"gsm8k {split}: {len(rows)} problems ({unscorable} unscorable dropped)")
            written[split] = write_rows(out_dir / f"{stem}.parquet", rows, extra_columns)
    for split, path in written.items():
        log(f"  {split}: {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, help="output folder for the parquet files")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", help="a downloaded .parquet/.jsonl file, or a folder of them")
    where.add_argument("--download", action="store_true", help="fetch through the `datasets` library")
    where.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="offline: N generated word problems in the dataset's published format (written to <out>/source)",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=DEFAULT_DAPO_VAL_SIZE,
        help=f"dapo-math: held-out prompts written to val.parquet (default {DEFAULT_DAPO_VAL_SIZE}; 0: none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="dapo-math: seed of the held-out draw; --generate: of the problems",
    )
    parser.add_argument("--keep-duplicates", action="store_true", help="dapo-math: keep repeated prompts")
    teacher = parser.add_argument_group(
        "teacher-side prompts",
        "a column of chat messages only the teacher sees (train with "
        "distillation.distillation_loss.ta_opd.teacher_prompt=column)",
    )
    teacher.add_argument(
        "--teacher-prompt",
        choices=TEACHER_PROMPT_SOURCES,
        help="append each row's reference solution (gsm8k: the worked solution; dapo-math: 'Answer: <ground "
        "truth>') to the teacher's copy of the user message",
    )
    teacher.add_argument("--teacher-system-prompt", metavar="TEXT", help="a system message for the teacher")
    teacher.add_argument(
        "--teacher-prompt-column",
        metavar="NAME",
        help=f"the column's name (default {DEFAULT_TEACHER_PROMPT_COLUMN}; "
        "= distillation.distillation_loss.ta_opd.teacher_prompt_column)",
    )
    args = parser.parse_args(argv)
    teacher_prompt, column = None, args.teacher_prompt_column
    if args.teacher_prompt or args.teacher_system_prompt is not None or column is not None:
        try:
            teacher_prompt = TeacherPromptColumn(
                column=DEFAULT_TEACHER_PROMPT_COLUMN if column is None else column,
                system_prompt=args.teacher_system_prompt,
                reference_solution=args.teacher_prompt == REFERENCE_SOLUTION,
            )
        except DataPrepError as error:
            parser.error(str(error))
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot create the output folder ({error.strerror})")
    source = args.source
    if args.generate is not None:
        minimum = 2 if args.dataset == "gsm8k" else 1
        if args.generate < minimum:
            parser.error(f"--generate {args.generate}: give at least {minimum} problems for {args.dataset}")
        source = write_source(args.dataset, Path(args.out) / "source", args.generate, args.seed)
    try:
        prepare(
            args.dataset,
            args.out,
            source=None if args.download else source,
            val_size=args.val_size,
            seed=args.seed,
            deduplicate=not args.keep_duplicates,
            teacher_prompt=teacher_prompt,
        )
    except DataPrepError as error:
        print(f"ta-opd prepare-data: {error}", file=sys.stderr)
        return 2
    return 0
