"""A paper recipe run for real on the CPU (`ta-opd recipe-cpu`): the Qwen3-4B -> Qwen3-1.7B recipe, its
server teacher, 3 steps, on the shrunken real models (151,936-row embeddings, the real Qwen3 tokenizer,
its chat template) with the recipe's own overrides: dynamic batch sizes, packed sequences, K = 16,
teacher top-32, ρ = 0.10."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "qwen3-4b-to-qwen3-1.7b.sh"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe-cpu")
    command = [sys.executable, "-m", "ta_opd_verl.cli.main", "recipe-cpu", str(RECIPE), "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    assert (out / "summary.json").is_file(), finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished, json.loads((out / "summary.json").read_text()), out


def test_the_recipe_runs_three_steps_at_the_real_vocabulary(recipe_run):
    finished, summary, _ = recipe_run
    assert finished.returncode == 0, summary.get("failure")
    assert (summary["returncode"], summary["steps"]) == (0, 3)
    assert (summary["vocab_size"], summary["tokenizer"]) == (151_936, "qwen3")
    assert (summary["student"], summary["teacher_model"], summary["teacher"]) == (
        "Qwen3-1.7B",
        "Qwen3-4B",
        "server",
    )
    # The recipe's overrides reached verl unchanged where the CPU does not need another value.
    command = " ".join(summary["command"])
    for override in (
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.rollout.n=4",
        "distillation.distillation_loss.ta_opd.ratio=0.10",
        "distillation.distillation_loss.topk=32",
    ):
        assert override in command, override


def test_the_mask_is_the_global_rule_and_the_teacher_rows_are_real(recipe_run):
    _, summary, _ = recipe_run
    assert summary["mask_equals_global_rule"] and summary["steps_checked"] == 3
    assert summary["teacher_sampled_logprob_real_at_selected"] and summary["selected_positions"] > 0
    for metric in (
        "kept_fraction",
        "valid_positions",
        "teachability_selected_mean",
        "sampled_kl_selected_mean",
    ):
        assert f"actor/ta_opd/{metric}" in summary["ta_opd_metrics"], metric
