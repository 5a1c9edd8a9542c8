"""`ta-opd compare` without verl: the plan and its overrides, the aggregation and the table on fixed inputs,
and the reuse of completed runs (the runner is injected, so nothing here starts verl)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ta_opd_verl.compare.heldout import HELDOUT_PROMPTS, HELDOUT_RESPONSE_TOKENS, HeldoutReverseKL
from ta_opd_verl.compare.main import main
from ta_opd_verl.compare.plan import PlannedRun, comparison_plan, run_overrides
from ta_opd_verl.compare.results import RESULT_FILE, aggregate, mean_std, render_table, write_outputs
from ta_opd_verl.compare.runner import RunFailed, run_comparison
from ta_opd_verl.demo.run import demo_run_overrides
from ta_opd_verl.tiny.build import build_tiny_pair, planned_pair

TA_OPD = "distillation.distillation_loss.ta_opd"
SETTINGS = {"steps": 18, "lr": 3e-4, "prompts": 128, "extra": []}
# The pair's layout under a folder that need not exist: nothing here reads it.
PAIR = planned_pair("/pair")


def _result(selector, ratio, seed, *, before, after, kl_after, wall, kept, kl_before=0.5) -> dict:
    return {
        "name": PlannedRun(selector, ratio, seed).name,
        "selector": selector,
        "ratio": ratio,
        "seed": seed,
        "accuracy_before": before,
        "accuracy_after": after,
        "heldout_reverse_kl_before": kl_before,
        "heldout_reverse_kl_after": kl_after,
        "wall_seconds": wall,
        "kept_fraction": kept,
        "settings": SETTINGS,
    }


# Three seeds of teachability at 5%: gains 0.02, 0.04, 0.06 (mean 0.04, sample std 0.02), KL reductions
# 0.1, 0.2, 0.3 (mean 0.2, std 0.1), walls 170, 180, 190 (mean 180, std 10), kept 0.08-0.10 (mean 0.09);
# then one seed of teachability at 1%.
FIXED_RESULTS = [
    _result("teachability", 0.05, 0, before=0.04, after=0.06, kl_after=0.4, wall=170.0, kept=0.08),
    _result("teachability", 0.05, 1, before=0.04, after=0.08, kl_after=0.3, wall=180.0, kept=0.09),
    _result("teachability", 0.05, 2, before=0.04, after=0.10, kl_after=0.2, wall=190.0, kept=0.10),
    _result("teachability", 0.01, 0, before=0.04, after=0.03, kl_after=0.45, wall=175.0, kept=0.03),
]


def test_mean_std_is_the_mean_and_the_sample_standard_deviation():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+0.25+0.25+2.25 over n - 1 = 3
    assert mean_std([7.0]) == (7.0, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_aggregate_groups_by_selector_and_ratio_in_order_of_appearance():
    rows = aggregate(FIXED_RESULTS)
    assert [(row["selector"], row["ratio"], row["n"], row["seeds"]) for row in rows] == [
        ("teachability", 0.05, 3, [0, 1, 2]),
        ("teachability", 0.01, 1, [0]),
    ]
    main_row, budget_row = rows
    for field, mean, std in (
        ("gain", 0.04, 0.02),
        ("kl_reduction", 0.2, 0.1),
        ("wall_seconds", 180.0, 10.0),
        ("kept_fraction", 0.09, 0.01),
    ):
        assert main_row[field]["mean"] == pytest.approx(mean), field
        assert main_row[field]["std"] == pytest.approx(std), field
    assert budget_row["gain"] == {"mean": pytest.approx(-0.01), "std": None}
    assert budget_row["kl_reduction"] == {"mean": pytest.approx(0.05), "std": None}


def test_render_table_shows_mean_plus_minus_std_and_a_dash_for_one_seed():
    expected = (
        "| selector | loss | ρ | seeds | kept fraction | accuracy gain (points) | held-out reverse-KL "
        "reduction (nats) | wall (s) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
        "| teachability | reverse_kl_topk | 0.05 | 3 | 9.0% | +4.0 ± 2.0 | +0.2000 ± 0.1000 | 180 ± 10 |\n"
        "| teachability | reverse_kl_topk | 0.01 | 1 | 3.0% | -1.0 ± – | +0.0500 ± – | 175 ± – |\n"
    )
    assert render_table(aggregate(FIXED_RESULTS)) == expected


def test_the_plan_is_six_selectors_times_three_seeds_plus_four_budgets():
    plan = comparison_plan()
    assert len(plan) == 22
    assert len({run.name for run in plan}) == 22
    at_main = [run for run in plan if run.ratio == 0.05]
    assert sorted({run.selector for run in at_main}) == [
        "entropy",
        "full",
        "random",
        "raw_kl",
        "teachability",
        "tip",
    ]
    assert all(
        sorted(r.seed for r in at_main if r.selector == s) == [0, 1, 2] for s in {r.selector for r in at_main}
    )
    # Seed-major: the first ten runs are one of each configuration.
    assert len({(run.selector, run.ratio) for run in plan[:10]}) == 10
    budgets = [run for run in plan if run.ratio != 0.05]
    assert [(run.selector, run.ratio, run.seed) for run in budgets] == [
        ("teachability", ratio, 0) for ratio in (0.01, 0.03, 0.10, 0.20)
    ]


def test_run_overrides_set_the_run_once_and_save_a_hugging_face_model_at_the_last_step():
    overrides = run_overrides(
        PlannedRun("tip", 0.2, 2), steps=7, lr=1e-4, pair=PAIR, extra=["trainer.test_freq=3"]
    )
    keys = [item.split("=", 1)[0] for item in overrides]
    assert len(keys) == len(set(keys)), "a key given twice would hide which value verl used"
    for expected in (
        f"{TA_OPD}.selector=tip",
        f"{TA_OPD}.ratio=0.2",  # replaces the demo's ratio=0.05
        f"{TA_OPD}.seed=2",
        "data.seed=2",
        "actor_rollout_ref.rollout.seed=2",
        "actor_rollout_ref.actor.data_loader_seed=2",
        "trainer.total_training_steps=7",
        "trainer.save_freq=7",
        "trainer.test_freq=3",  # the extra override wins over the plan's test_freq=steps
        "trainer.val_before_train=true",
        "actor_rollout_ref.actor.optim.lr=0.0001",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
    ):
        assert expected in overrides, expected


def test_a_run_is_the_demo_shortened_with_its_own_selector_ratio_and_checkpoint():
    run = PlannedRun("entropy", 0.05, 1)
    demo = demo_run_overrides(PAIR, steps=7, lr=1e-4, seed=1, test_freq=7)
    compared = run_overrides(run, steps=7, lr=1e-4, pair=PAIR)
    # Every demo override (the colocated teacher and top-p 0.7 among them) reaches verl unchanged.
    assert set(demo) <= set(compared)
    assert sorted(set(compared) - set(demo)) == [
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        f"{TA_OPD}.selector=entropy",
        "trainer.save_freq=7",
    ]


LOSSES = ["pg_k1", "reverse_kl_topk", "reverse_kl_topk_tail", "reverse_kl_full"]


def test_the_loss_is_a_dimension_the_demos_loss_keeping_the_names_runs_had():
    plan = comparison_plan(selectors=["teachability", "full"], seeds=3, budgets=[], losses=LOSSES)
    assert len(plan) == 24 and len({run.name for run in plan}) == 24
    # Seed-major: one run of each (loss, selector) first.
    assert [(run.loss, run.selector) for run in plan[:8]] == [
        (loss, s) for loss in LOSSES for s in ("teachability", "full")
    ]
    assert {run.seed for run in plan[:8]} == {0}
    names = {(run.loss, run.selector, run.seed): run.name for run in plan}
    assert names["reverse_kl_topk", "teachability", 1] == "teachability-r0.05-s1"  # the demo's loss
    assert names["reverse_kl_full", "full", 2] == "full-reverse_kl_full-r0.05-s2"
    with_budgets = comparison_plan(selectors=["teachability"], seeds=1, budgets=[0.1], losses=LOSSES[:2])
    assert [run.name for run in with_budgets] == [
        "teachability-pg_k1-r0.05-s0",
        "teachability-r0.05-s0",
        "teachability-pg_k1-r0.1-s0",
        "teachability-r0.1-s0",
    ]


@pytest.mark.parametrize("loss", LOSSES)
def test_a_runs_loss_reaches_verl_with_the_policy_gradient_only_for_pg_k1(loss):
    overrides = run_overrides(PlannedRun("teachability", 0.05, 0, loss), steps=7, lr=1e-4, pair=PAIR)
    demo = run_overrides(PlannedRun("teachability", 0.05, 0), steps=7, lr=1e-4, pair=PAIR)
    assert f"{TA_OPD}.loss={loss}" in overrides
    added = sorted(set(overrides) - set(demo))
    if loss == "reverse_kl_topk":  # the demo's: nothing to add
        assert added == []
    else:
        assert added == sorted(
            [f"{TA_OPD}.loss={loss}", f"distillation.distillation_loss.use_policy_gradient={loss == 'pg_k1'}"]
        )


def test_results_are_grouped_by_loss_and_a_result_without_one_ran_the_demos(tmp_path):
    tail = {**FIXED_RESULTS[0], "loss": "reverse_kl_topk_tail", "accuracy_after": 0.2}
    rows = aggregate([*FIXED_RESULTS, tail])
    assert [(row["selector"], row["loss"], row["ratio"], row["n"]) for row in rows] == [
        ("teachability", "reverse_kl_topk", 0.05, 3),
        ("teachability", "reverse_kl_topk", 0.01, 1),
        ("teachability", "reverse_kl_topk_tail", 0.05, 1),
    ]
    assert rows[2]["gain"]["mean"] == pytest.approx(0.16)
    plan = comparison_plan(selectors=["teachability"], seeds=1, budgets=[], losses=LOSSES[1:3])
    write_outputs(tmp_path, plan, [*FIXED_RESULTS, tail], SETTINGS)
    assert "| teachability | reverse_kl_topk_tail | 0.05 | 1 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_dry_run_lists_the_22_runs_with_their_overrides_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["--dry-run", "--out", str(out), "--steps", "9"]) == 0
    printed = capsys.readouterr().out
    assert "trainer.total_training_steps=9" in printed
    assert "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]" in printed
    run_lines = [line for line in printed.splitlines() if line.startswith("run ")]
    assert len(run_lines) == 22
    for index, (line, run) in enumerate(zip(run_lines, comparison_plan(), strict=True), start=1):
        assert line.startswith(f"run {index}/22 {run.name}: "), line
        own = line.split(": ", 1)[1].split()
        assert f"{TA_OPD}.selector={run.selector}" in own
        assert f"{TA_OPD}.ratio={run.ratio:g}" in own
        assert f"data.seed={run.seed}" in own and f"{TA_OPD}.seed={run.seed}" in own
    assert not out.exists()


def _measured(run: PlannedRun) -> dict:
    return {
        "accuracy_before": 0.04,
        "accuracy_after": 0.05 + run.seed / 100,
        "kept_fraction": 0.08,
        "wall_seconds": 180.0,
        "heldout_reverse_kl_before": 0.5,
        "heldout_reverse_kl_after": 0.4,
    }


def test_completed_runs_are_reused_and_incomplete_or_outdated_ones_rerun_from_a_clean_folder(tmp_path):
    complete, interrupted, outdated = (
        PlannedRun("tip", 0.05, 0),
        PlannedRun("tip", 0.05, 1),
        PlannedRun("tip", 0.05, 2),
    )
    runs = tmp_path / "runs"
    stored = _result("tip", 0.05, 0, before=0.04, after=0.09, kl_after=0.1, wall=1.0, kept=0.07)
    (runs / complete.name).mkdir(parents=True)
    (runs / complete.name / RESULT_FILE).write_text(json.dumps(stored))
    # An interrupted run: verl's log and a checkpoint verl would resume from, but no result.json.
    (runs / interrupted.name / "checkpoints").mkdir(parents=True)
    (runs / interrupted.name / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("25")
    (runs / outdated.name).mkdir(parents=True)
    (runs / outdated.name / RESULT_FILE).write_text(
        json.dumps({**stored, "settings": {**SETTINGS, "steps": 5}})
    )

    executed = []

    def fake_execute(run, run_dir):
        executed.append(run.name)
        assert not any(run_dir.iterdir()), "a rerun must start from an empty folder"
        return _measured(run)

    plan = [complete, interrupted, outdated]
    results, failed = run_comparison(plan, tmp_path, SETTINGS, fake_execute)
    assert executed == [interrupted.name, outdated.name]
    assert failed == []
    assert results[0] == stored
    for run, result in zip(plan[1:], results[1:], strict=True):
        written = json.loads((runs / run.name / RESULT_FILE).read_text())
        assert written == result
        assert (written["name"], written["selector"], written["ratio"], written["seed"]) == (
            run.name,
            "tip",
            0.05,
            run.seed,
        )
        assert written["settings"] == SETTINGS
        assert written["accuracy_after"] == _measured(run)["accuracy_after"]

    executed.clear()
    run_comparison(plan, tmp_path, SETTINGS, fake_execute)
    assert executed == [], "a second call finds every run complete"


def test_a_failed_run_writes_no_result_and_the_comparison_goes_on(tmp_path):
    plan = [PlannedRun("random", 0.05, 0), PlannedRun("random", 0.05, 1)]

    def fail_first(run, run_dir):
        if run.seed == 0:
            raise RunFailed("verl exited with 1")
        return _measured(run)

    results, failed = run_comparison(plan, tmp_path, SETTINGS, fail_first)
    assert failed == [plan[0].name]
    assert [r["name"] for r in results] == [plan[1].name]
    assert not (tmp_path / "runs" / plan[0].name / RESULT_FILE).exists()


def test_outputs_hold_the_table_the_summary_the_plot_and_the_missing_runs(tmp_path):
    plan = comparison_plan(selectors=["teachability"], budgets=[0.01, 0.03])
    summary = write_outputs(tmp_path, plan, FIXED_RESULTS, SETTINGS)
    assert summary["missing_runs"] == ["teachability-r0.03-s0"]
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    table = (tmp_path / "table.md").read_text()
    assert table.endswith(render_table(aggregate(FIXED_RESULTS)))
    assert "Missing runs (1 of 5): teachability-r0.03-s0." in table
    assert "18 steps per run of 128 prompts, lr 0.0003" in table
    assert "top-p 0.7 rollouts, the teacher colocated in the actor's worker" in table
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_the_plot_draws_the_budget_curve_only_when_more_than_one_budget_ran(tmp_path):
    from PIL import Image

    from ta_opd_verl.compare.plot import plot_comparison

    widths = {}
    for name, results in (("curve", FIXED_RESULTS), ("main", FIXED_RESULTS[:3])):
        plot_comparison(aggregate(results), tmp_path / f"{name}.png")
        widths[name] = Image.open(tmp_path / f"{name}.png").size[0]
    # Three panels of the same size against two: the figure is 17 inches wide against 12.
    assert widths["curve"] / widths["main"] == pytest.approx(17 / 12, rel=0.01)


# ---- the held-out reverse KL on the tiny pair (plain torch, no verl) ----


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair(quiet=True)


def test_heldout_reverse_kl_is_zero_for_the_teacher_and_matches_a_per_position_reference(pair, tmp_path):
    path = tmp_path / "heldout.parquet"
    heldout = HeldoutReverseKL(pair, path)
    bank = heldout.bank
    assert bank.rollouts == HELDOUT_PROMPTS
    eos = heldout.tokenizer.eos_token_id
    for response in bank.response_ids:
        assert response[-1] == eos or len(response) == HELDOUT_RESPONSE_TOKENS
        assert eos not in response[:-1]
    assert heldout.measure(pair.teacher) == pytest.approx(0.0, abs=1e-6)
    initial = heldout.measure(pair.student)
    assert initial > 0.01

    # Reference: one sequence at a time, KL(p_s || p_t) position by position with torch's kl_div.
    student = AutoModelForCausalLM.from_pretrained(pair.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher).eval()
    per_position = []
    with torch.no_grad():
        for prompt, response in zip(bank.prompt_ids, bank.response_ids, strict=True):
            ids = torch.tensor([list(prompt) + list(response)])
            read = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
            s_lp = student(ids).logits[0, read].log_softmax(-1)
            t_lp = teacher(ids).logits[0, read].log_softmax(-1)
            kl = torch.nn.functional.kl_div(t_lp, s_lp, log_target=True, reduction="none").sum(-1)
            per_position.append(kl)
    assert initial == pytest.approx(float(torch.cat(per_position).mean()), rel=1e-4)

    # The set is fixed: a second measurement reads the cached file instead of generating again.
    written = path.stat().st_mtime_ns
    assert HeldoutReverseKL(pair, path).bank == bank
    assert path.stat().st_mtime_ns == written


def test_only_runs_one_planned_run_and_rejects_an_unknown_name(tmp_path, capsys):
    assert main(["--dry-run", "--only", "tip-r0.05-s1"]) == 0
    run_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert len(run_lines) == 1 and run_lines[0].startswith("run 1/1 tip-r0.05-s1: ")
    assert main(["--dry-run", "--only", "tip-r0.5-s1"]) == 2
    assert "not a planned run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budgets", "1.5"], "budget(s) [1.5] outside (0, 1]"),
        (["--budgets", "0.05,0"], "budget(s) [0.0] outside (0, 1]"),
        (["--budgets", "abc"], "comma-separated numbers in (0, 1] are accepted"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--seeds", "-1"], "argument --seeds: must be an integer >= 1, got -1"),
        (["--losses", "k3"], "unknown loss(es) ['k3']; choose from pg_k1, reverse_kl_topk"),
    ],
    ids=["budget-above-one", "budget-zero", "budget-not-a-number", "no-steps", "negative-seeds", "loss"],
)
def test_a_plan_that_cannot_run_is_refused_before_anything_is_planned(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--dry-run", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
