"""Smoke test of `python -m ta_opd_verl.bench onpolicy`: 2 steps on the cached tiny pair (seconds)."""

import argparse
import json
import math
from fractions import Fraction

import pytest
import torch

from ta_opd_verl.bench.__main__ import main
from ta_opd_verl.bench.onpolicy import add_arguments, configurations, lr_factor
from ta_opd_verl.tiny.build import build_tiny_pair

RATIO, MIN_KEEP, BATCH = 0.05, 1, 8


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    build_tiny_pair(quiet=True)  # the cached pair (built once if missing; never forced)
    out = tmp_path_factory.mktemp("onpolicy")
    argv = ["onpolicy", "--selector", "teachability", "--ratio", str(RATIO)]
    argv += ["--min-keep", str(MIN_KEEP), "--lr", "0", "1e-3", "--steps", "2", "--batch", str(BATCH)]
    argv += ["--mini-batches", "2", "--eval-every", "2", "--val-size", "32", "--out", str(out)]
    assert main(argv) == 0
    return out, json.loads((out / "onpolicy.json").read_text())


def test_writes_json_table_and_plot(result):
    out, data = result
    assert {"command", "date", "args", "machine", "pair", "configurations"} <= set(data)
    assert data["args"]["steps"] == 2 and data["args"]["seeds"] == [0]
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["torch_threads"] == 1
    assert data["pair"]["val_problems"] == 32
    labels = [c["label"] for c in data["configurations"]]
    assert len(labels) == 2 and len(set(labels)) == 2  # lr 0 and lr 1e-3
    for config in data["configurations"]:
        (run,) = config["runs"]
        assert [p["step"] for p in run["curve"]] == [0, 2]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["curve"])
        assert [s["step"] for s in run["steps"]] == [1, 2]
        for record in run["steps"]:
            for key in ("loss", "grad_norm", "reverse_kl_all", "reverse_kl_selected", "seconds"):
                assert math.isfinite(record[key]), (config["label"], key, record[key])
            assert record["loss"] >= 0 and record["skipped_updates"] == 0
        assert config["summary"]["steps"] == [0, 2] and config["summary"]["std"] == [0.0, 0.0]
    assert (out / "onpolicy.png").stat().st_size > 0
    table = (out / "onpolicy.md").read_text()
    assert "| step 0 | step 2 | kept | s/step |" in table and all(label in table for label in labels)


def test_selected_fraction_obeys_the_budget_rule(result):
    _, data = result
    for config in data["configurations"]:
        for record in config["runs"][0]["steps"]:
            n_valid, n_selected, n_samples = record["n_valid"], record["n_selected"], record["n_samples"]
            assert n_samples == BATCH and n_valid >= n_samples
            # Eq. 13's global budget ceil(ρ N), then at most MIN_KEEP top-up positions per sample.
            budget = math.ceil(Fraction(str(RATIO)) * n_valid)
            assert budget <= n_selected <= budget + n_samples * MIN_KEEP
            assert n_selected < n_valid
            assert record["samples_below_min_keep"] == 0


def test_zero_learning_rate_leaves_accuracy_unchanged(result):
    _, data = result
    zero, trained = sorted(data["configurations"], key=lambda c: c["lr"])
    assert (zero["lr"], trained["lr"]) == (0.0, 1e-3)
    curve = zero["runs"][0]["curve"]
    assert curve[0]["accuracy"] == curve[-1]["accuracy"]
    assert curve[0]["per_task"] == curve[-1]["per_task"]
    # Same seed, same student at the first rollout: both runs see the same first batch and selection.
    first = [c["runs"][0]["steps"][0] for c in (zero, trained)]
    assert first[0]["n_valid"] == first[1]["n_valid"] and first[0]["n_selected"] == first[1]["n_selected"]
    assert first[0]["reverse_kl_all"] == pytest.approx(first[1]["reverse_kl_all"])


def test_epochs_and_top_p_are_grid_axes_named_in_the_labels():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--selector", "teachability", "full", "--epochs", "1", "2", "--top-p", "1", "0.9"]
    )
    configs = configurations(args)
    assert len(configs) == 8  # 2 selectors x 2 epochs x 2 top-p values
    labels = {c["label"]: c for c in configs}
    assert len(labels) == 8
    for label, config in labels.items():
        assert ("epochs=2" in label) == (config["epochs"] == 2), label
        assert ("top_p=0.9" in label) == (config["top_p"] == 0.9), label


@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_cosine_schedule_matches_verls_scheduler_step_for_step(min_lr_ratio):
    # verl takes seconds to import; only this test needs it.
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    verl_schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=0, num_training_steps=80, min_lr_ratio=min_lr_ratio
    )
    for step in range(81):
        assert lr_factor("cosine", step, 80, min_lr_ratio) == pytest.approx(verl_schedule.get_last_lr()[0])
        assert lr_factor("constant", step, 80, min_lr_ratio) == 1.0
        optimizer.step()
        verl_schedule.step()


def test_lr_schedule_is_a_grid_axis_named_in_the_labels():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configs = configurations(parser.parse_args(["--lr-schedule", "constant", "cosine"]))
    assert [c["lr_schedule"] for c in configs] == ["constant", "cosine"]
    assert ["cosine" in c["label"] for c in configs] == [False, True]
