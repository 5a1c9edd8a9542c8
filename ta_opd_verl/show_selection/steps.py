"""A selection dump's steps read back and checked, as the JSON-ready data `page` embeds: per step a summary
(the header's settings and quantiles, the kept fraction counted from the records) and per sample the
prompt's text, each response token's text and its values."""

from __future__ import annotations

import math
from pathlib import Path

from ta_opd_verl.batch_selection import (
    NORMALISED_SUFFIX,
    SCORE_FIELD,
    load_selection_dump,
    load_selection_header,
)
from ta_opd_verl.show_selection.tokens import decode, token_texts

STATISTICS = {"disagreement": "D", "compatibility": "C", "entropy": "H"}
# Per-position values the page shows: the dump's field -> the page's short name (Dn: D̃, ...).
POSITION_VALUES = {
    **STATISTICS,
    **{name + NORMALISED_SUFFIX: short + "n" for name, short in STATISTICS.items()},
    SCORE_FIELD: "score",
}
RECORD_FIELDS = ("sample_id", "prompt_ids", "response_ids", "selected", *POSITION_VALUES)
HEADER_FIELDS = ("selector", "ratio", "quantile_levels", "quantiles", "rules")
# Significant digits of the values the page embeds (what hovering shows).
SIGNIFICANT_DIGITS = 4


class DumpError(ValueError):
    """A dump the page cannot be built from; the message names the file and what is missing."""


def choose_steps(available: list[int], spec: str) -> list[int]:
    """The steps ``spec`` names among ``available``: ``last``, ``all`` or a comma-separated list."""
    if not available:
        raise DumpError("no step_<N>.jsonl files")
    if spec == "last":
        return [max(available)]
    if spec == "all":
        return sorted(available)
    try:
        wanted = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise DumpError(f"--steps {spec!r}: expected 'last', 'all' or step numbers like '5,10'") from None
    missing = [step for step in wanted if step not in available]
    if missing:
        raise DumpError(
            f"--steps {spec!r}: no step {missing} in the dump; it holds steps {sorted(available)}"
        )
    return wanted


def read_steps(folder: Path, spec: str = "last") -> dict[int, tuple[dict, list[dict]]]:
    """Header and records of the chosen steps of a dump, checked for what the page needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DumpError(f"selection dump {folder} does not exist (a run's ta_opd.selection_dump_dir)")
    dump = load_selection_dump(folder)
    try:
        steps = choose_steps(list(dump), spec)
    except DumpError as error:
        raise DumpError(f"selection dump {folder}: {error}") from None
    chosen = {}
    for step in steps:
        header = load_selection_header(folder, step)
        if header is None:
            raise DumpError(
                f"{folder}/step_{step}.header.json is missing: the dump was written before "
                "`ta-opd show-selection` existed; rerun to dump the selector, ratio and normalised scores"
            )
        _require(header, HEADER_FIELDS, f"{folder}/step_{step}.header.json")
        for index, record in enumerate(dump[step]):
            _require(record, RECORD_FIELDS, f"{folder}/step_{step}.jsonl line {index + 1}")
        chosen[step] = (header, dump[step])
    return chosen


def _require(entry: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [field for field in fields if field not in entry]
    if missing:
        raise DumpError(f"{where} lacks {missing}: it needs {list(fields)}")


def step_summary(header: dict, records: list[dict]) -> dict:
    """What the page's table shows for one step: the settings and quantiles of the header, the kept and
    valid positions counted from the records."""
    kept = sum(len(record["selected"]) for record in records)
    valid = sum(len(record["response_ids"]) for record in records)
    return {
        "step": header["step"],
        "selector": header["selector"],
        "ratio": header["ratio"],
        "samples": len(records),
        "kept_positions": kept,
        "valid_positions": valid,
        "kept_fraction": kept / valid if valid else 0.0,
        "quantile_levels": header["quantile_levels"],
        "quantiles": {name: _rounded(values) for name, values in header["quantiles"].items()},
        "rules": header["rules"],
        "student_path": header.get("student_path"),
    }


def _rounded(values: list[float]) -> list[float | None]:
    """``SIGNIFICANT_DIGITS`` digits; None for a value JSON cannot hold (NaN, infinities)."""
    return [float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None for value in values]


def sample_view(tokenizer, record: dict) -> dict:
    """One sample as the page embeds it."""
    view = {
        "id": record["sample_id"],
        "prompt": decode(tokenizer, record["prompt_ids"]),
        "prompt_tokens": len(record["prompt_ids"]),
        "ids": record["response_ids"],
        "tokens": token_texts(tokenizer, record["response_ids"]),
        "selected": record["selected"],
    }
    return view | {short: _rounded(record[field]) for field, short in POSITION_VALUES.items()}


def page_data(
    steps: dict[int, tuple[dict, list[dict]]], tokenizer, *, source: str, tokenizer_path: str
) -> dict:
    """Everything the page shows, JSON-ready: per step its summary and samples (in the dump's order)."""
    return {
        "source": source,
        "tokenizer": tokenizer_path,
        "steps": [
            {
                "summary": step_summary(header, records),
                "samples": [sample_view(tokenizer, record) for record in records],
            }
            for _, (header, records) in sorted(steps.items())
        ],
    }
