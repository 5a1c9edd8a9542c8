"""`ta-opd demo` at its full length is also the learning test of TA-OPD through verl: one verl run of the
demo's settings (`DEMO_STEPS` steps of 128 prompts at ρ = 0.05) on the tiny pair, sized to take under 10
minutes on the 2-core machine. It checks the report's fields and plot, and that the student's validation
accuracy rose by at least 15 points, the demo's target, which leaves room for one validation's noise
below the gains measured so far.

The measured gains and how often they held: docs/benchmarks.md ("TA-OPD through verl's trainer on CPU")."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from verl_fixtures import compose_config

from ta_opd_verl.checks import check_ta_opd_config
from ta_opd_verl.demo.report import REVERSE_KL_WINDOW, plot_report, report_figure, trailing_mean
from ta_opd_verl.demo.run import (
    DEMO_LR,
    DEMO_PROMPTS,
    DEMO_SEED,
    DEMO_STEPS,
    DEMO_TOP_P,
    TEST_FREQ,
    demo_run_overrides,
    run_demo,
    selection_dump_folder,
)
from ta_opd_verl.tiny.build import planned_pair

REPORT_FIELDS = (
    "teacher_accuracy",
    "student_accuracy_before",
    "student_accuracy_after",
    "kept_fraction",
    "steps",
    "wall_seconds",
)
MIN_GAIN = 0.15


@pytest.mark.e2e
def test_the_demo_reports_and_ta_opd_raises_validation_accuracy_by_fifteen_points(tmp_path):
    report = run_demo(tmp_path, steps=DEMO_STEPS, lr=DEMO_LR, seed=DEMO_SEED, test_freq=TEST_FREQ, extra=[])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["steps"] == DEMO_STEPS
    for field in REPORT_FIELDS:
        assert field in saved, field
        assert isinstance(saved[field], (int, float)) and math.isfinite(saved[field]), field
    # 5% plus one position per sample (min_keep_per_sample=1) of about 20 response positions each.
    assert 0.05 <= saved["kept_fraction"] < 0.12
    assert saved["teacher_accuracy"] > 0.9
    assert (tmp_path / "report.png").stat().st_size > 10_000
    page = (tmp_path / "selection.html").read_text()
    assert f"<title>TA-OPD selection: step {DEMO_STEPS}</title>" in page
    curve = saved["validation_accuracy_by_step"]
    assert sorted(map(int, curve)) == list(range(0, DEMO_STEPS + 1, TEST_FREQ))
    gain = saved["student_accuracy_after"] - saved["student_accuracy_before"]
    print(f"demo: accuracy {saved['student_accuracy_before']:.3f} -> {saved['student_accuracy_after']:.3f}")
    assert gain >= MIN_GAIN, f"TA-OPD at 5% gained {gain:+.3f} in {DEMO_STEPS} steps; curve {curve}"


def test_the_demo_settings_build_into_verls_config_with_the_colocated_teacher():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    pair = planned_pair("/pair")
    overrides = demo_run_overrides(pair, steps=DEMO_STEPS, lr=DEMO_LR, seed=DEMO_SEED, test_freq=TEST_FREQ)
    config = compose_config("ta_opd_cpu", overrides)
    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    check_ta_opd_config(config)
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert (rollout.top_p, rollout.log_prob_micro_batch_size_per_gpu) == (DEMO_TOP_P, DEMO_PROMPTS)
    ta_opd = config.distillation.distillation_loss.ta_opd
    assert (ta_opd.teacher, ta_opd.teacher_path, ta_opd.compatibility) == ("fsdp", "/pair/teacher", "exact")


def test_trailing_mean_matches_a_slow_mean_of_each_window():
    generator = random.Random(0)
    for window in (1, 3, 10):
        values = [generator.uniform(-2, 2) for _ in range(25)]
        slow = [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        assert trailing_mean(values, window) == pytest.approx(slow, abs=1e-12)
    with pytest.raises(ValueError, match="window must be >= 1"):
        trailing_mean([1.0], 0)


def test_the_report_plot_draws_accuracy_and_the_reverse_kl_with_its_trailing_mean(tmp_path):
    reverse_kl = {step: 1.7 - 0.004 * step + 0.1 * (-1) ** step for step in range(1, 29)}
    report = {
        "teacher_accuracy": 0.97,
        "validation_accuracy_by_step": {0: 0.03, 14: 0.12, 28: 0.16},
        "sampled_reverse_kl_by_step": reverse_kl,
    }
    figure = report_figure(report)
    accuracy_axes, reverse_kl_axes = figure.axes
    student, teacher = accuracy_axes.get_lines()
    assert list(student.get_ydata()) == [0.03, 0.12, 0.16] and list(teacher.get_ydata()) == [0.97, 0.97]
    per_step, smoothed = reverse_kl_axes.get_lines()
    assert list(per_step.get_ydata()) == list(reverse_kl.values())
    assert list(smoothed.get_ydata()) == trailing_mean(list(reverse_kl.values()), REVERSE_KL_WINDOW)
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demos_selection_page_reads_the_dump_the_run_writes():
    demo = ["a=1", "distillation.distillation_loss.ta_opd.selection_dump_dir=/run/selection", "b=2"]
    assert selection_dump_folder(demo) == "/run/selection"
    # Hydra keeps the last value of a key: the caller's own folder, or none.
    assert (
        selection_dump_folder([*demo, "distillation.distillation_loss.ta_opd.selection_dump_dir=/mine"])
        == "/mine"
    )
    assert (
        selection_dump_folder([*demo, "distillation.distillation_loss.ta_opd.selection_dump_dir=null"])
        is None
    )
