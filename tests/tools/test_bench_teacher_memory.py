"""`python -m ta_opd_verl.bench teacher-memory` at a tiny size: what it writes, which functions it skips,
and that its blocked and unblocked functions compute the same thing."""

import argparse
import json

import torch

from ta_opd_verl.bench import teacher_memory
from ta_opd_verl.bench.__main__ import main
from ta_opd_verl.bench.peak_memory import run_child


def _settings(**changes) -> dict:
    parser = argparse.ArgumentParser()
    teacher_memory.add_arguments(parser)
    args = parser.parse_args(["--v", "1000", "--hidden", "8", "--k", "4", "--topk", "6", "--repeats", "1"])
    return {key: value for key, value in vars(args).items() if key != "out"} | changes


def test_benchmark_times_every_function_and_skips_the_unblocked_ones_that_do_not_fit(tmp_path, capsys):
    # 64 x 1000 float32 logits are 0.24 MiB: over a 0.1 MiB limit, 16 x 1000 are not.
    argv = ["teacher-memory", "--n", "16", "64", "--v", "1000", "--hidden", "8", "--k", "4", "--topk", "6"]
    argv += [
        "--repeats",
        "2",
        "--unblocked-max-gib",
        str(0.1 / 1024),
        "--skip-memory",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "teacher_memory.json").read_text())
    small, large = result["cases"]
    assert (small["n"], small["selected_rows"], large["n"], large["selected_rows"]) == (16, 1, 64, 4)
    assert set(small["median_s"]) == set(teacher_memory.FUNCTIONS)
    assert set(large["median_s"]) == set(teacher_memory.FUNCTIONS) - set(teacher_memory.UNBLOCKED)
    assert all(len(times) == 2 for times in small["times_s"].values())
    assert set(small["time_ratio"]) == {"scoring", "reverse_kl_full"} and large["time_ratio"] == {}
    table = (tmp_path / "teacher_memory.md").read_text()
    assert "| 64 | 4 | loss reverse_kl_topk_tail |" in table and table.strip() in capsys.readouterr().out


def test_a_memory_child_reports_the_peak_of_one_call():
    measured = run_child(teacher_memory.__name__, "memory_child", "scoring_unblocked", 256, _settings())
    assert measured["method"] in ("VmHWM", "ru_maxrss")
    assert measured["peak_extra_mib"] >= 0


def test_the_blocked_and_unblocked_functions_compute_the_same_values_and_gradients():
    inputs = teacher_memory.make_inputs(40, 300, 8, k=4, topk=6, ratio=0.25, seed=1)
    scoring = teacher_memory.make_function("scoring", inputs, 6)()
    unblocked = teacher_memory.make_function("scoring_unblocked", inputs, 6)()
    assert torch.equal(scoring[0], unblocked[0])
    for ours, theirs in zip(scoring[1:], unblocked[1:], strict=True):
        torch.testing.assert_close(ours, theirs)
    gradients = {}
    for name in ("reverse_kl_full", "reverse_kl_full_unblocked"):
        teacher_memory.make_function(name, inputs, 6)()
        gradients[name] = inputs["student_rows"].grad.clone()
    assert gradients["reverse_kl_full"].abs().max() > 0
    torch.testing.assert_close(gradients["reverse_kl_full"], gradients["reverse_kl_full_unblocked"])
