"""`ta-opd demo`, shortened: the report's fields and the plot exist and the numbers are finite; the
comparison's figures come from the same report code."""

from __future__ import annotations

import json
import math

import pytest

from ta_opd_verl.demo import run_demo

REPORT_FIELDS = (
    "teacher_accuracy",
    "student_accuracy_before",
    "student_accuracy_after",
    "kept_fraction",
    "steps",
    "wall_seconds",
)


@pytest.mark.e2e
def test_shortened_demo_writes_a_finite_report_and_a_plot(tmp_path):
    report = run_demo(tmp_path, steps=3, lr=1e-4, seed=0, test_freq=3, extra=[])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["steps"] == 3
    for field in REPORT_FIELDS:
        assert field in saved, field
        assert isinstance(saved[field], (int, float)) and math.isfinite(saved[field]), field
    assert 0.0 < saved["kept_fraction"] < 0.2
    assert saved["teacher_accuracy"] > 0.9
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert report["validation_accuracy_by_step"]
