"""End to end through verl's real `python -m verl.trainer.main_ppo` on CPU with the colocated teacher
(``ta_opd.teacher=fsdp``) and the tiny pair, once per loss that reads the teacher's distribution in the
update: one verl start-up (about 1.5 minutes on a quiet 2-core machine) plus 3 steps each.

Ray is given ONE logical GPU: the actor/rollout pool takes it, so verl's teacher pool (one more GPU with
``distillation.n_gpus_per_node=1``) could not even be placed (``RayResourcePool._check_resource_available``
raises); the run finishing shows the teacher pool was never requested.
"""

from __future__ import annotations

import math

import pytest
import torch
from dump_checks import (
    assert_the_update_trained_on_the_dumped_selection,
    teacher_prompts_by_student_prompt,
    teacher_sampled_logprobs,
    with_teacher_prompt_column,
)
from transformers import AutoModelForCausalLM

from ta_opd_verl.batch_selection import load_selection_dump, selection_from_records
from ta_opd_verl.cli.train import run_verl, tiny_pair_overrides
from ta_opd_verl.tiny.build import build_tiny_pair

pytestmark = pytest.mark.e2e

VERL_TIMEOUT = 1500
STEPS, RATIO = 3, 0.05


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair()


# reverse_kl_topk reads the rows the scoring stored; reverse_kl_full runs the teacher again in the update,
# here after each sample's own teacher prompt (``teacher_prompt=column``), which the driver renders and
# the workers put before the student's response (right-padded: verl's only layout on CPU).
@pytest.mark.parametrize(
    "loss, teacher_prompt", [("reverse_kl_topk", "student"), ("reverse_kl_full", "column")]
)
def test_ta_opd_with_the_colocated_fsdp_teacher_trains_on_one_logical_gpu(
    pair, tmp_path, loss, teacher_prompt
):
    dump = tmp_path / "selection"
    train = with_teacher_prompt_column(pair.train_parquet, tmp_path / "train_with_teacher_prompt.parquet")
    result = run_verl(
        "ta_opd_cpu",
        [
            *tiny_pair_overrides(pair),
            f"data.train_files={train}",
            f"distillation.distillation_loss.ta_opd.teacher_prompt={teacher_prompt}",
            f"distillation.distillation_loss.ta_opd.loss={loss}",
            "distillation.distillation_loss.ta_opd.teacher=fsdp",
            f"distillation.distillation_loss.ta_opd.teacher_path={pair.teacher}",
            "distillation.distillation_loss.ta_opd.compatibility=exact",
            f"distillation.distillation_loss.ta_opd.ratio={RATIO}",
            f"distillation.distillation_loss.ta_opd.selection_dump_dir={dump}",
            "ray_kwargs.ray_init.num_gpus=1",
            f"trainer.total_training_steps={STEPS}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
        ],
        tmp_path,
        timeout=VERL_TIMEOUT,
    )
    assert result.returncode == 0, result.log_path.read_text()[-4000:]
    # TransferQueue is asked for the machine's cores: none of its per-call thread-count warnings.
    assert "should not exceed total physical CPU cores" not in result.log_path.read_text()
    memory = result.peak_memory_gib
    print(f"fsdp teacher, {loss}: {STEPS} steps, {result.wall_seconds:.0f}s, peak memory +{memory:.1f} GiB")
    data = {entry["step"]: entry["data"] for entry in result.metrics()}
    assert sorted(data) == list(range(1, STEPS + 1))
    prefix = "actor/ta_opd/"
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32).eval()
    teacher_prompts = teacher_prompts_by_student_prompt(train, pair.student, pair.teacher)
    for step, metrics in data.items():
        # The run says which teacher and which C it used.
        assert metrics[prefix + "teacher_is_fsdp"] == 1.0, step
        assert metrics[prefix + "compatibility_is_lower_bound"] == 0.0, step
        n_valid = metrics[prefix + "valid_positions"]
        assert metrics[prefix + "kept_positions"] == math.ceil(RATIO * n_valid), step
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        assert math.isfinite(metrics[prefix + "reverse_kl_selected"]), step
        assert 0.0 < metrics[prefix + "sampled_outside_teacher_topk"] < 1.0, step
        for quantile in ("q05", "q50", "q95"):
            assert 0.0 <= metrics[f"{prefix}compatibility_{quantile}"] <= 1.0 + 1e-6, (step, quantile)
        records = load_selection_dump(dump)[step]
        assert sum(len(r["disagreement"]) for r in records) == n_valid
        assert [r["selected"] for r in records] == selection_from_records(records, "teachability", RATIO), (
            step
        )
        assert_the_update_trained_on_the_dumped_selection(dump, step, records)
        # The rows the colocated teacher stored are its own: the sampled token's log-prob equals a plain
        # forward of the teacher here (after the sample's teacher prompt with teacher_prompt=column), at
        # every response position.
        if teacher_prompt == "column":
            assert (
                metrics[prefix + "teacher_prompt_length_mean"]
                > metrics[prefix + "student_prompt_length_mean"]
            )
        for record in records:
            own_prompt = teacher_prompts[tuple(record["prompt_ids"])] if teacher_prompt == "column" else None
            torch.testing.assert_close(
                torch.tensor(record["teacher_sampled_logprob"]),
                teacher_sampled_logprobs(teacher, record, own_prompt),
                rtol=1e-4,
                atol=1e-4,
            )
