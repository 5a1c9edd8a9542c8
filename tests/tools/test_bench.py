"""Smoke test of `python -m ta_opd_verl.bench scoring` at a tiny size (seconds, not minutes)."""

import json

import pytest
import torch

from ta_opd_verl.bench.__main__ import main
from ta_opd_verl.bench.scoring import FUNCTIONS, make_function, make_inputs


def test_scoring_benchmark_writes_json_table_and_plot(tmp_path, capsys):
    assert (
        main(["scoring", "--n", "32", "--v", "1000", "--k", "4", "--repeats", "2", "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "scoring.json").read_text())
    (case,) = result["cases"]
    assert (case["n"], case["v"], case["k"]) == (32, 1000, 4)
    for name in FUNCTIONS:
        assert len(case["times_s"][name]) == 2
        assert case["median_s"][name] > 0
        assert case["peak_extra_mib"][name] >= 0
    assert set(case["time_ratio"]) == {"paper", "paper_entropy", "authors_code"}
    assert result["machine"]["torch"] == torch.__version__
    assert (tmp_path / "scoring.png").stat().st_size > 0
    table = (tmp_path / "scoring.md").read_text()
    assert "| 32 | 1000 | 4 | authors_code preset (top-k entropy) |" in table
    out = capsys.readouterr().out
    assert "repeat 2/2" in out and table.strip() in out


@pytest.mark.parametrize("k", [4, 16])
def test_benchmarked_functions_see_the_same_teacher_mass(k):
    # Both functions read the same inputs: verl's teacher mass is the sum of the teacher's probabilities,
    # which bounds TA-OPD's compatibility (the part of that mass inside the student's top-k) from above.
    inputs = make_inputs(16, 200, k, seed=1)
    verl_out = make_function("verl", inputs, k)()
    stats = make_function("paper_entropy", inputs, k)()
    teacher_mass = verl_out["teacher_mass"].reshape(-1)
    assert (stats.compatibility <= teacher_mass + 1e-6).all()
    assert (stats.compatibility > 0).any()
    given = make_function("paper", inputs, k)()
    torch.testing.assert_close(given.entropy, inputs["entropy"].double())
    torch.testing.assert_close(given.disagreement, stats.disagreement)
    # The authors' scoring: the same lower-bound C from the same K teacher entries, their top-k entropy.
    authors = make_function("authors_code", inputs, k)()
    torch.testing.assert_close(authors.compatibility, stats.compatibility)
    assert (authors.entropy >= 0).all() and (authors.entropy <= 1 + 1e-12).all()
