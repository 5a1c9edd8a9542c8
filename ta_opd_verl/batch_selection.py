"""Batch-level selection on the driver: the whole rollout batch's D, C, H in, the training mask and the
step's metrics out. Torch only (no verl), so the rule is testable without Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from ta_opd_verl.teachability import (
    DEFAULT_RULES,
    SelectionRules,
    TokenStatistics,
    batch_normalize,
    masked_quantiles,
    select_positions,
    selector_scores,
)

METRIC_PREFIX = "actor/ta_opd/"


def step_generator(seed: int, global_step: int) -> torch.Generator:
    """Seeded per step, so a resumed run draws the same random scores at the same step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + global_step)


def stable_sample_ids(rollout_ids: list[str], prompt_ids: list[list[int]]) -> list[str]:
    """Per-sample ids that depend only on the data: a digest of the prompt's token ids plus the rollout's
    id within its prompt (its session and output index; `ta_opd_verl.verl_fence.trainer.rollout_ids`). verl
    names a sample with a ``uid`` drawn afresh in every run, so that name alone would reorder ties after a
    resume."""
    ids = []
    for rollout, prompt in zip(rollout_ids, prompt_ids, strict=True):
        digest = hashlib.sha1(",".join(map(str, prompt)).encode()).hexdigest()[:16]
        ids.append(f"{digest}_{rollout}")
    return ids


def stable_sample_order(sample_ids: list[str]) -> list[int]:
    """Row indices sorted by the samples' stable ids (`stable_sample_ids`), so the tie rule "lower sample
    index first" depends neither on batch balancing's reordering nor on verl's per-run uids."""
    return sorted(range(len(sample_ids)), key=lambda row: sample_ids[row])


def select_rollout_batch(
    stats: TokenStatistics,
    valid: torch.Tensor,
    sample_ids: list[str],
    *,
    selector: str,
    ratio: float,
    rules: SelectionRules,
    seed: int,
    global_step: int,
    population: torch.Tensor | None = None,
    sampled_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The bool ``[B, T]`` selection over the whole batch (rows in the caller's order) and its metrics.
    ``population`` (optional, ``[B, T]``, containing ``valid``): the positions the normalisation runs over
    (``ta_opd.normalize_over``; default ``valid``). ``sampled_kl`` (optional, ``[B, T]``): the sampled-token
    k1, reported on selected vs unselected."""
    population = valid if population is None else population
    order = torch.tensor(stable_sample_order(sample_ids), dtype=torch.long)
    ordered = TokenStatistics(*(field[order] for field in stats))
    mask_ordered = select_positions(
        selector,
        ordered,
        valid[order],
        ratio,
        rules=rules,
        generator=step_generator(seed, global_step),
        population=population[order],
    )
    mask = torch.empty_like(mask_ordered)
    mask[order] = mask_ordered
    metrics = selection_metrics(stats, valid, mask, rules=rules, population=population, sampled_kl=sampled_kl)
    return mask, metrics


def selection_metrics(
    stats: TokenStatistics,
    valid: torch.Tensor,
    mask: torch.Tensor,
    *,
    rules: SelectionRules,
    population: torch.Tensor,
    sampled_kl: torch.Tensor | None = None,
) -> dict[str, float]:
    valid = valid.bool()
    selected = mask.bool() & valid
    unselected = valid & ~selected
    n_valid = int(valid.sum())
    metrics = {
        "kept_fraction": float(selected.sum()) / max(n_valid, 1),
        "kept_positions": float(selected.sum()),
        "valid_positions": float(n_valid),
    }

    def normalised(values: torch.Tensor) -> torch.Tensor:
        return batch_normalize(values, population, rules.q_low, rules.q_high, no_spread=rules.no_spread)

    teachability = normalised(stats.disagreement) * normalised(stats.compatibility)
    named = {
        "disagreement": stats.disagreement,
        "compatibility": stats.compatibility,
        "entropy": stats.entropy,
        "teachability": teachability,
    }
    if sampled_kl is not None:
        named["sampled_kl"] = sampled_kl
    for name, values in named.items():
        for subset_name, subset in (("selected", selected), ("unselected", unselected)):
            count = int(subset.sum())
            metrics[f"{name}_{subset_name}_mean"] = float(values[subset].mean()) if count else 0.0
    if n_valid:
        for name in ("disagreement", "compatibility", "teachability"):
            q05, q50, q95 = masked_quantiles(named[name], valid, (0.05, 0.5, 0.95))
            metrics[f"{name}_q05"], metrics[f"{name}_q50"], metrics[f"{name}_q95"] = q05, q50, q95
    return {METRIC_PREFIX + key: value for key, value in metrics.items()}


def selection_records(
    sample_ids: list[str],
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    stats: TokenStatistics,
    valid: torch.Tensor,
    mask: torch.Tensor,
    extra: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """One JSON-ready record per sample (in stable-id order): its prompt and response token ids, the
    selected positions, and D, C, H at every valid position (float64 values, exact in JSON), for
    `ta_opd.selection_dump_dir`. ``extra``: more ``[B, T]`` per-position values, each written under its
    name like D, C, H."""
    named = dict(zip(("disagreement", "compatibility", "entropy"), stats, strict=True)) | (extra or {})
    records = []
    for row in stable_sample_order(sample_ids):
        length = int(valid[row].sum())
        if not length:  # a padding row added by verl's batch balancing
            continue
        records.append(
            {
                "sample_id": sample_ids[row],
                "prompt_ids": prompt_ids[row],
                "response_ids": response_ids[row][:length],
                "selected": torch.nonzero(mask[row] & valid[row]).flatten().tolist(),
                **{name: values[row, :length].tolist() for name, values in named.items()},
            }
        )
    return records


def selection_from_records(
    records: list[dict],
    selector: str,
    ratio: float,
    *,
    rules: SelectionRules = DEFAULT_RULES,
    scores: tuple[str, str] = ("disagreement", "compatibility"),
) -> list[list[int]]:
    """The selection recomputed from one step's `selection_records` (a dump read back): `select_positions`
    under ``rules`` over all their valid positions, in their stable-id order, with D and C from the fields
    named in ``scores`` and H from ``entropy``. Per record, its selected positions (compare with
    ``selected``). The dump holds the valid positions only: a run that normalised over every response
    position (``normalize_over=response``) with loss-masked ones among them is not recomputed exactly."""
    length = max((len(record["entropy"]) for record in records), default=0)
    valid = torch.zeros(len(records), length, dtype=torch.bool)
    columns = {name: torch.zeros(len(records), length, dtype=torch.float64) for name in (*scores, "entropy")}
    for row, record in enumerate(records):
        n = len(record["entropy"])
        valid[row, :n] = True
        for name, values in columns.items():
            values[row, :n] = torch.tensor(record[name], dtype=torch.float64)
    stats = TokenStatistics(columns[scores[0]], columns[scores[1]], columns["entropy"])
    mask = select_positions(selector, stats, valid, ratio, rules=rules)
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def load_selection_dump(folder: Path) -> dict[int, list[dict]]:
    """The ``step_<N>.jsonl`` files `ta_opd.selection_dump_dir` holds, as records by step."""
    steps = {}
    for path in Path(folder).glob("step_*.jsonl"):
        lines = path.read_text().splitlines()
        steps[int(path.stem.removeprefix("step_"))] = [json.loads(line) for line in lines if line.strip()]
    return steps


# What a step's dump holds besides its `selection_records`, for `ta-opd show-selection`: per position the
# normalised statistics and the selector's score (`normalised_scores`), and per step a header file.
NORMALISED_SUFFIX = "_norm"
SCORE_FIELD = "score"
HEADER_FILE = "step_{}.header.json"


def normalised_scores(
    stats: TokenStatistics,
    valid: torch.Tensor,
    sample_ids: list[str],
    *,
    selector: str,
    rules: SelectionRules,
    seed: int,
    global_step: int,
    population: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per position (float64 ``[B, T]``, rows in the caller's order), as `selection_records` extras: D̃,
    C̃, H̃ (Eq. 11 over ``population``, default ``valid``) as ``disagreement_norm`` etc., and under
    ``score`` what ``selector`` ranked by (`selector_scores`, with the random draws of
    `select_rollout_batch` at the same seed and step)."""
    population = valid if population is None else population
    order = torch.tensor(stable_sample_order(sample_ids), dtype=torch.long)
    ordered = TokenStatistics(*(field[order] for field in stats))
    score = torch.empty_like(valid, dtype=torch.float64)
    score[order] = selector_scores(
        selector,
        ordered,
        valid[order],
        rules=rules,
        generator=step_generator(seed, global_step),
        population=population[order],
    )
    normalised = {
        name + NORMALISED_SUFFIX: batch_normalize(
            values, population, rules.q_low, rules.q_high, no_spread=rules.no_spread
        )
        for name, values in stats._asdict().items()
    }
    return normalised | {SCORE_FIELD: score}


def selection_header(
    stats: TokenStatistics,
    valid: torch.Tensor,
    mask: torch.Tensor,
    *,
    selector: str,
    ratio: float,
    rules: SelectionRules,
    seed: int,
    global_step: int,
    population: torch.Tensor | None = None,
) -> dict:
    """A step's settings and batch figures, JSON-ready: the selector, ρ, the rules, the kept and valid
    position counts, and D, C, H at the quantile levels q_low, 0.5 and q_high over the normalisation
    population (the bounds of Eq. 11 and the median)."""
    population = valid if population is None else population
    valid = valid.bool()
    levels = (rules.q_low, 0.5, rules.q_high)
    quantiles = {}
    if bool(population.any()):
        quantiles = {
            name: masked_quantiles(values, population, levels) for name, values in stats._asdict().items()
        }
    kept, n_valid = int((mask.bool() & valid).sum()), int(valid.sum())
    return {
        "step": global_step,
        "selector": selector,
        "ratio": ratio,
        "seed": seed,
        "rules": dataclasses.asdict(rules),
        "kept_positions": kept,
        "valid_positions": n_valid,
        "kept_fraction": kept / max(n_valid, 1),
        "population_positions": int(population.sum()),
        "quantile_levels": list(levels),
        "quantiles": quantiles,
    }


def selection_dump(
    sample_ids: list[str],
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    stats: TokenStatistics,
    valid: torch.Tensor,
    mask: torch.Tensor,
    extra: dict[str, torch.Tensor] | None = None,
    *,
    selector: str,
    ratio: float,
    rules: SelectionRules,
    seed: int,
    global_step: int,
    population: torch.Tensor | None = None,
) -> tuple[list[dict], dict]:
    """One step of `ta_opd.selection_dump_dir`: the `selection_records` with ``extra`` and the
    `normalised_scores` per position, and the `selection_header`. The keywords are `select_rollout_batch`'s
    for the selection ``mask`` it made."""
    scores = normalised_scores(
        stats,
        valid,
        sample_ids,
        selector=selector,
        rules=rules,
        seed=seed,
        global_step=global_step,
        population=population,
    )
    records = selection_records(
        sample_ids, prompt_ids, response_ids, stats, valid, mask, (extra or {}) | scores
    )
    header = selection_header(
        stats,
        valid,
        mask,
        selector=selector,
        ratio=ratio,
        rules=rules,
        seed=seed,
        global_step=global_step,
        population=population,
    )
    return records, header


def write_selection_dump(folder: Path, step: int, records: list[dict], header: dict) -> None:
    """One step's `selection_records` as ``folder/step_<N>.jsonl`` and its `selection_header` (plus what
    the caller adds, such as the student's model path) as ``folder/step_<N>.header.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"step_{step}.jsonl", "w") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)
    (folder / HEADER_FILE.format(step)).write_text(json.dumps(header, indent=1) + "\n")


def load_selection_header(folder: Path, step: int) -> dict | None:
    """The ``step_<N>.header.json`` of a dump; None for a dump written before headers were."""
    path = Path(folder) / HEADER_FILE.format(step)
    return json.loads(path.read_text()) if path.is_file() else None


# The actor workers' side of a selection dump: what each update micro-batch trained on.
TRAINED_FOLDER = "trained_step_{}"


def trained_position_records(
    response_ids: torch.Tensor, trained: torch.Tensor, valid: torch.Tensor
) -> list[dict]:
    """Per sample of an update micro-batch (``[B, T]`` padded tensors): its response ids and the positions
    the loss was taken over."""
    return [
        {
            "response_ids": ids[: int(row_valid.sum())].tolist(),
            "trained": torch.nonzero(row_trained & row_valid).flatten().tolist(),
        }
        for ids, row_trained, row_valid in zip(response_ids, trained.bool(), valid.bool(), strict=True)
    ]


def write_trained_positions(folder: Path, step: int, records: list[dict]) -> None:
    """Append one micro-batch's `trained_position_records` under ``folder/trained_step_<N>/`` (a file per
    worker process, so data-parallel ranks never share one)."""
    target = Path(folder) / TRAINED_FOLDER.format(step)
    target.mkdir(parents=True, exist_ok=True)
    with open(target / f"worker_{os.getpid()}.jsonl", "a") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)


def load_trained_positions(folder: Path, step: int) -> list[dict]:
    """Every worker's `trained_position_records` of one step (the update's side of the dump)."""
    records = []
    for path in sorted((Path(folder) / TRAINED_FOLDER.format(step)).glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records
