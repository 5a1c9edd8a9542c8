"""`python -m ta_opd_verl.bench teacher` without verl: the aggregation, the selection comparison and the
report on fixed inputs (hand-written metrics and selection dumps), and the lower-bound D and C that the
fsdp teacher's scoring adds for the dump. Seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ta_opd_verl.batch_selection import selection_from_records
from ta_opd_verl.bench import teacher as bench
from ta_opd_verl.bench.__main__ import main
from ta_opd_verl.protocol import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    LOWER_BOUND_COMPATIBILITY_FIELD,
    LOWER_BOUND_DISAGREEMENT_FIELD,
)
from ta_opd_verl.teacher_head import logit_log_prob_blocks
from ta_opd_verl.teachers.colocated import dumps_lower_bound, score_with_teacher

SELECTION = {"selector": "teachability", "ratio": 0.25, "min_keep": 0, "seed": 0}


def _metrics(step_times: list[float], old_log_prob: list[float]) -> list[dict]:
    return [
        {"step": step, "data": {"timing_s/step": t, "timing_s/old_log_prob": o, "timing_s/gen": 0.5}}
        for step, (t, o) in enumerate(zip(step_times, old_log_prob, strict=True), start=1)
    ]


# ---- timings --------------------------------------------------------------------------------------------
def test_median_leaves_out_the_first_step_whatever_the_file_order():
    metrics = _metrics([30.0, 1.0, 3.0, 2.0, 10.0], [9.0, 0.1, 0.2, 0.3, 0.4])
    metrics.reverse()
    assert bench.median_after_first(metrics, "timing_s/step") == 2.5
    assert bench.median_after_first(metrics, "timing_s/old_log_prob") == 0.25
    assert bench.median_after_first(metrics, "timing_s/update_actor") is None
    assert bench.median_after_first(metrics[-1:], "timing_s/step") is None


def test_run_summary_and_ratios():
    info = {"returncode": 0, "wall_s": 120.0, "peak_memory_gib": 6.5}
    server = bench.run_summary(_metrics([20.0, 1.0, 1.0], [5.0, 0.2, 0.2]), info)
    fsdp = bench.run_summary(_metrics([20.0, 1.5, 1.5], [5.0, 0.6, 0.6]), info)
    assert server["steps"] == 3 and server["peak_memory_gib"] == 6.5
    validation_only = {"step": 0, "data": {"val-core/acc": 0.1}}
    assert bench.run_summary([validation_only, *_metrics([2.0, 1.0], [0.1, 0.1])], info)["steps"] == 2
    assert server["median_s"] == {"step": 1.0, "gen": 0.5, "old_log_prob": 0.2, "update_actor": None}
    assert server["step_s"] == {"1": 20.0, "2": 1.0, "3": 1.0}
    ratio = bench.ratios(fsdp, server)
    assert ratio["step"] == pytest.approx(1.5) and ratio["old_log_prob"] == pytest.approx(3.0)
    assert ratio["gen"] == pytest.approx(1.0) and ratio["update_actor"] is None


# ---- selections -----------------------------------------------------------------------------------------
def test_jaccard():
    assert bench.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert bench.jaccard({1}, {1}) == 1.0
    assert bench.jaccard(set(), set()) == 1.0
    assert bench.jaccard({1}, set()) == 0.0


def _records(selected: tuple[list[int], list[int]] = ([0, 1], [])) -> list[dict]:
    """Two samples, 8 positions. Exact C is 1 everywhere, so teachability ranks by D: with ρ = 0.25 it keeps
    sample 0's positions 0 and 1. The lower bound puts C = 0 at position 0 (the teacher's mass there sits
    outside its top-K) and D = 0 at position 2."""
    return [
        {
            "sample_id": "a",
            "selected": selected[0],
            "disagreement": [4.0, 3.0, 2.0, 1.0],
            "compatibility": [1.0, 1.0, 1.0, 1.0],
            "entropy": [1.0, 1.0, 1.0, 1.0],
            "lower_bound_disagreement": [4.0, 3.0, 0.0, 1.0],
            "lower_bound_compatibility": [0.0, 1.0, 1.0, 1.0],
        },
        {
            "sample_id": "b",
            "selected": selected[1],
            "disagreement": [0.5, 0.4, 0.3, 0.2],
            "compatibility": [1.0, 1.0, 1.0, 1.0],
            "entropy": [1.0, 1.0, 1.0, 1.0],
            "lower_bound_disagreement": [0.5, 0.4, 0.3, 0.2],
            "lower_bound_compatibility": [1.0, 1.0, 1.0, 1.0],
        },
    ]


def test_recomputed_selections_from_a_dump():
    records = _records()

    def select(scores):
        return selection_from_records(records, SELECTION["selector"], SELECTION["ratio"], scores=scores)

    assert SELECTION["min_keep"] == 0
    assert select(bench.EXACT) == [[0, 1], []]
    # Lower-bound D and C: C = 0 drops position 0; D = 0 drops position 2; position 3 is next.
    assert select(bench.LOWER_BOUND) == [[1, 3], []]
    assert select(bench.LOWER_BOUND_C_ONLY) == [[1, 2], []]


def test_selection_comparison_over_steps():
    same = [{**r, "lower_bound_disagreement": r["disagreement"]} for r in _records()]
    for record in same:
        record["lower_bound_compatibility"] = record["compatibility"]
    wrong_trainer = _records(selected=([0], [3]))
    result = bench.selection_comparison({2: _records(), 1: same, 3: wrong_trainer}, SELECTION)
    per_step = result["per_step"]
    assert [e["step"] for e in per_step] == [1, 2, 3]
    assert [e["matches_trainer"] for e in per_step] == [True, True, False]
    assert per_step[0]["lower_bound"] == {"jaccard": 1.0, "differs": False, "swapped": 0}
    assert per_step[1]["lower_bound"] == {"jaccard": pytest.approx(1 / 3), "differs": True, "swapped": 1}
    summary = result["summary"]
    assert summary["steps"] == 3 and summary["steps_matching_trainer"] == 2 and summary["mean_selected"] == 2
    assert summary["lower_bound"]["mean_jaccard"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert summary["lower_bound"]["fraction_of_steps_differing"] == pytest.approx(2 / 3)
    assert summary["lower_bound_c_only"]["mean_swapped"] == pytest.approx(2 / 3)


def test_a_dump_without_the_lower_bound_is_refused_with_the_reason():
    records = _records()
    for record in records:
        del record["lower_bound_compatibility"]
    with pytest.raises(ValueError, match=r"lower_bound_compatibility.*compatibility=exact"):
        bench.selection_comparison({1: records}, SELECTION)


# ---- the report from run folders ------------------------------------------------------------------------
def _write_run(folder, teacher: str, metrics: list[dict], dump: dict[int, list[dict]] | None) -> None:
    folder.mkdir(parents=True)
    info = {
        "teacher": teacher,
        "returncode": 0,
        "wall_s": 100.0,
        "peak_memory_gib": 7.0,
        "selection": SELECTION,
    }
    (folder / bench.RUN_FILE).write_text(json.dumps(info))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for step, records in (dump or {}).items():
        (folder / bench.SELECTION_DIR).mkdir(exist_ok=True)
        path = folder / bench.SELECTION_DIR / f"step_{step}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_only_writes_json_table_and_plot(tmp_path):
    _write_run(tmp_path / "server", "server", _metrics([20.0, 1.0, 1.2, 1.0], [3.0, 0.2, 0.2, 0.2]), None)
    dump = {1: _records(), 2: _records(), 3: _records()}
    _write_run(tmp_path / "fsdp", "fsdp", _metrics([20.0, 1.3, 1.3, 1.5], [3.0, 0.5, 0.5, 0.5]), dump)

    assert main(["teacher", "--report-only", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "teacher.json").read_text())
    assert report["ratio_fsdp_over_server"]["step"] == pytest.approx(1.3)
    assert report["ratio_fsdp_over_server"]["old_log_prob"] == pytest.approx(2.5)
    assert report["selection"]["settings"] == SELECTION
    assert report["selection"]["summary"]["lower_bound"]["fraction_of_steps_differing"] == 1.0
    assert {"command", "date", "machine", "runs"} <= set(report)
    table = (tmp_path / "teacher.md").read_text()
    assert "| fsdp / server | | 1.30 | 1.00 | 2.50 | - | | |" in table
    assert "| lower-bound D and C (what compatibility=lower_bound scores) | 0.333 | 100% | 1.00 |" in table
    assert "equals the trainer's at 3/3 steps" in table
    assert (tmp_path / "teacher.png").stat().st_size > 0


# ---- the lower-bound outputs of the fsdp scoring --------------------------------------------------------
def test_lower_bound_outputs_are_what_compatibility_lower_bound_scores():
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(1, 12, 40, generator=generator) * 3
    teacher_logits = torch.randn(12, 40, generator=generator) * 3
    sampled = torch.randint(0, 40, (12,), generator=generator)
    common = {"k": 4, "topk": 6, "student_probs": "exact", "entropy_mode": "full"}

    def scored(**options):
        blocks = logit_log_prob_blocks(teacher_logits, vocab=40, block_rows=5)
        return score_with_teacher(student_logits, blocks, sampled, **options, **common)

    exact = scored(exact_compatibility=True, lower_bound_outputs=True)
    lower = scored(exact_compatibility=False)
    assert LOWER_BOUND_COMPATIBILITY_FIELD not in lower and LOWER_BOUND_DISAGREEMENT_FIELD not in lower
    assert torch.equal(exact[LOWER_BOUND_COMPATIBILITY_FIELD], lower[COMPATIBILITY_FIELD])
    assert torch.equal(exact[LOWER_BOUND_DISAGREEMENT_FIELD], lower[DISAGREEMENT_FIELD])
    # Exact C counts the teacher's mass on the student's top-k outside its own top-6: never below the bound.
    assert (exact[COMPATIBILITY_FIELD] >= exact[LOWER_BOUND_COMPATIBILITY_FIELD] - 1e-6).all()
    assert (exact[COMPATIBILITY_FIELD] - exact[LOWER_BOUND_COMPATIBILITY_FIELD]).max() > 1e-3


@pytest.mark.parametrize(
    ("teacher", "compatibility", "dump_dir", "expected"),
    [
        ("fsdp", "exact", "/tmp/selection", True),
        ("fsdp", "exact", None, False),
        ("fsdp", "lower_bound", "/tmp/selection", False),
        ("server", "lower_bound", "/tmp/selection", False),
    ],
)
def test_lower_bound_is_scored_only_for_an_exact_run_that_dumps(teacher, compatibility, dump_dir, expected):
    settings = SimpleNamespace(teacher=teacher, compatibility=compatibility, selection_dump_dir=dump_dir)
    assert dumps_lower_bound(settings) is expected
