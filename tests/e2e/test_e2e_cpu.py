"""End to end through verl's real `python -m verl.trainer.main_ppo` on CPU, with the tiny pair.

Each test is one verl start-up (about 1.5 minutes on a quiet 2-core machine) plus a few steps.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from dump_checks import (
    assert_the_update_trained_on_the_dumped_selection,
    teacher_prompts_by_student_prompt,
    teacher_sampled_logprobs,
    with_teacher_prompt_column,
)

from ta_opd_verl.batch_selection import load_selection_dump, selection_from_records
from ta_opd_verl.cli.train import run_verl, tiny_pair_overrides
from ta_opd_verl.tiny.build import build_tiny_pair

pytestmark = pytest.mark.e2e

PEARSON = "training/rollout_actor_probs_pearson_corr"
VERL_TIMEOUT = 1500


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair()


def _train(
    config: str, pair, steps: int, overrides: list[str], out_dir, first_step: int = 1
) -> dict[int, dict]:
    """Run verl's trainer up to step ``steps`` without validation; the JSONL metrics by step."""
    result = run_verl(
        config,
        [
            *tiny_pair_overrides(pair),
            f"trainer.total_training_steps={steps}",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            *overrides,
        ],
        out_dir,
        timeout=VERL_TIMEOUT,
    )
    assert result.returncode == 0, result.log_path.read_text()[-4000:]
    print(
        f"{config}: {steps} steps, {result.wall_seconds:.0f}s, peak memory +{result.peak_memory_gib:.1f} GiB"
    )
    data = {entry["step"]: entry["data"] for entry in result.metrics()}
    assert sorted(data) == list(range(first_step, steps + 1))
    return data


def _fixed_batch_log_probs(model_path, pair) -> torch.Tensor:
    """Mean response-token log-prob of the teacher's greedy answers to 16 validation prompts."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair.teacher)
    prompts = pd.read_parquet(pair.val_parquet)["prompt"].head(16).tolist()
    texts = [
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        for messages in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher)
    with torch.no_grad():
        sequences = teacher.generate(**batch, max_new_tokens=24, do_sample=False)
        model = AutoModelForCausalLM.from_pretrained(model_path)
        logits = model(sequences, attention_mask=(sequences != tokenizer.pad_token_id).long()).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    response = torch.zeros_like(log_probs, dtype=torch.bool)
    response[:, batch["input_ids"].shape[1] - 1 :] = True
    response &= sequences[:, 1:] != tokenizer.pad_token_id
    return log_probs[response]


def test_verls_own_opd_runs_on_cpu_and_rollout_weights_follow_the_trainer(pair, tmp_path):
    steps = 4
    overrides = [
        f"trainer.save_freq={steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        # Large on purpose: the policy must move measurably for the refit check to mean something.
        "actor_rollout_ref.actor.optim.lr=3e-3",
    ]
    data = _train("opd_cpu", pair, steps, overrides, tmp_path)
    for step, metrics in data.items():
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        assert math.isfinite(metrics["actor/distillation/abs_loss"]), step
        # vLLM's sampling log-probs agree with the trainer's on the same tokens: the refit reached vLLM.
        assert metrics[PEARSON] > 0.99, (step, metrics[PEARSON])

    trained = tmp_path / "checkpoints" / f"global_step_{steps}" / "actor" / "huggingface"
    before = _fixed_batch_log_probs(pair.student, pair)
    after = _fixed_batch_log_probs(trained, pair)
    assert (after - before).abs().mean() > 0.05, "the policy did not change: the check above would be vacuous"


def test_verls_supervised_top_k_opd_runs_on_cpu(pair, tmp_path):
    overrides = [
        "distillation.distillation_loss.loss_mode=forward_kl_topk",
        "distillation.distillation_loss.use_policy_gradient=false",
        "distillation.distillation_loss.topk=16",
    ]
    data = _train("opd_cpu", pair, 2, overrides, tmp_path)
    for step, metrics in data.items():
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        # verl's top-k processor ran: the teacher's top-16 mass and the student's mass on those ids.
        assert 0.5 < metrics["actor/distillation/teacher_mass"] <= 1.0 + 1e-5, step
        assert 0.0 < metrics["actor/distillation/student_mass"] <= 1.0 + 1e-5, step


TA_OPD_STEPS, TA_OPD_RATIO = 3, 0.05


def _ta_opd_overrides(out_dir, pair) -> list[str]:
    """The shared run's settings; its teacher scores each response after the sample's own teacher prompt
    (``teacher_prompt=column``: the conversation after a system message only the teacher reads)."""
    train = with_teacher_prompt_column(pair.train_parquet, out_dir / "train_with_teacher_prompt.parquet")
    return [
        f"data.train_files={train}",
        "distillation.distillation_loss.ta_opd.teacher_prompt=column",
        f"distillation.distillation_loss.ta_opd.ratio={TA_OPD_RATIO}",
        "distillation.distillation_loss.ta_opd.min_keep_per_sample=0",
        "distillation.distillation_loss.ta_opd.loss=pg_k1",
        "distillation.distillation_loss.use_policy_gradient=true",
        f"distillation.distillation_loss.ta_opd.selection_dump_dir={out_dir / 'selection'}",
    ]


# The resume test compares two runs' step 3, so their rollouts should follow from the weights: one sample
# per prompt, drawn with top-k = 1. (verl's `rollout.full_determinism` cannot be used: in the v1 trainer
# every request gets the vLLM request id "det-0", and the colliding requests fail.)
REPRODUCIBLE_ROLLOUTS = ["actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.top_k=1"]


def _selection(out_dir, step: int) -> list[dict]:
    return load_selection_dump(out_dir / "selection")[step]


@pytest.fixture(scope="module")
def ta_opd_run(pair, tmp_path_factory):
    """One uninterrupted TA-OPD run of 3 steps, checkpointed at steps 2 and 3 (the last step is always
    saved), shared by the two tests below: one verl start-up fewer."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    overrides = [*_ta_opd_overrides(out_dir, pair), *REPRODUCIBLE_ROLLOUTS, "trainer.save_freq=2"]
    return out_dir, _train("ta_opd_cpu", pair, TA_OPD_STEPS, overrides, out_dir)


def test_ta_opd_selects_five_percent_of_the_batch_and_trains_through_verl(pair, ta_opd_run):
    # (The rollout-vs-actor Pearson check of the first test does not apply here: at top-k = 1 vLLM
    # reports the truncated distribution's log-probs.)
    from transformers import AutoModelForCausalLM

    out_dir, data = ta_opd_run
    prefix = "actor/ta_opd/"
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32).eval()
    teacher_prompts = teacher_prompts_by_student_prompt(
        out_dir / "train_with_teacher_prompt.parquet", pair.student, pair.teacher
    )
    for step, metrics in data.items():
        # The teacher read its own prompts, longer by the system message.
        assert (
            metrics[prefix + "teacher_prompt_length_mean"]
            > metrics[prefix + "student_prompt_length_mean"] + 5
        )
        n_valid = metrics[prefix + "valid_positions"]
        assert metrics[prefix + "kept_positions"] == math.ceil(TA_OPD_RATIO * n_valid), step
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        # The teacher's log-prob of sampled tokens outside its top-16 reached the loss (none was dropped).
        assert metrics[prefix + "sampled_outside_teacher_topk"] > 0, step
        assert math.isfinite(metrics[prefix + "sampled_kl_selected_mean"]), step
        for name in ("disagreement", "compatibility", "entropy", "teachability"):
            assert math.isfinite(metrics[f"{prefix}{name}_selected_mean"]), (step, name)
        assert (
            metrics[prefix + "teachability_selected_mean"] >= metrics[prefix + "teachability_unselected_mean"]
        )
        # The mask the actor trained on is the global top-n of the whole batch, recomputed here from the
        # dumped scores (rows in stable-id order, the order of the tie rule).
        records = _selection(out_dir, step)
        assert sum(len(r["disagreement"]) for r in records) == n_valid
        assert [r["selected"] for r in records] == selection_from_records(
            records, "teachability", TA_OPD_RATIO
        ), step
        # ... and the update's loss was taken over exactly that mask, as the workers recorded it.
        assert_the_update_trained_on_the_dumped_selection(out_dir / "selection", step, records)
        # The teacher server's log-prob of every sampled token is real (the stock server would drop it
        # outside the teacher's top-K): a log-probability, and not a placeholder.
        sampled = torch.tensor([value for r in records for value in r["teacher_sampled_logprob"]])
        assert torch.isfinite(sampled).all() and (sampled <= 0).all() and (sampled < -1e-3).any(), step
        # ... and it is the teacher's after the sample's own teacher prompt: verl's agent loop sent the
        # server that prompt and the student's response, and the rows came back at the response positions.
        # The server runs the teacher in bfloat16 (the rollout's dtype), the forward here in float32
        # (measured: median |difference| 3e-3 to 6e-3, largest 0.37; the bfloat16 study of
        # tests/e2e/test_fsdp_teacher_vs_vllm.py: largest 0.45). After the student's prompt some tokens
        # score nats away (measured: largest 7 to 10): what an unsent or misaligned prompt would give.
        own, students = [], []
        for record in records:
            got = torch.tensor(record["teacher_sampled_logprob"])
            own_prompt = teacher_prompts[tuple(record["prompt_ids"])]
            own.append(got - teacher_sampled_logprobs(teacher, record, own_prompt))
            students.append(got - teacher_sampled_logprobs(teacher, record))
        own, students = torch.cat(own).abs(), torch.cat(students).abs()
        assert own.median() <= 3e-2 and own.max() <= 1.0, (step, own.median(), own.max())
        assert students.max() > 3.0, (step, students.max())


def test_a_run_resumed_after_step_2_trains_step_3_like_the_uninterrupted_run(pair, ta_opd_run, tmp_path):
    full_dir, _ = ta_opd_run
    # "Stop after step 2": a fresh run folder holding only the step-2 checkpoint of that run; verl's
    # default trainer.resume_mode=auto resumes from it.
    resumed_dir = tmp_path / "resumed"
    checkpoints = resumed_dir / "checkpoints"
    shutil.copytree(full_dir / "checkpoints" / "global_step_2", checkpoints / "global_step_2")
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("2")
    overrides = [*_ta_opd_overrides(resumed_dir, pair), *REPRODUCIBLE_ROLLOUTS, "trainer.save_freq=2"]
    resumed = _train("ta_opd_cpu", pair, TA_OPD_STEPS, overrides, resumed_dir, first_step=3)
    assert resumed[3]["actor/ta_opd/kept_positions"] == math.ceil(
        TA_OPD_RATIO * resumed[3]["actor/ta_opd/valid_positions"]
    )
    expected, got = _selection(full_dir, 3), _selection(resumed_dir, 3)
    # Data position: the step-3 prompts (the stable ids digest them) in the same rollout slots.
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in expected]
    # Weights: wherever the restored student sampled the same response, it scored it the same way. (vLLM-
    # CPU is not bit-reproducible across runs even at top-k = 1: about half the responses differ by a
    # token or two, so the batches are compared sample by sample.)
    same = [(a, b) for a, b in zip(expected, got, strict=True) if a["response_ids"] == b["response_ids"]]
    assert same, "no step-3 response was reproduced: the resumed rollout did not get the restored weights"
    for name in ("disagreement", "compatibility", "entropy"):
        for a, b in same:
            torch.testing.assert_close(torch.tensor(b[name]), torch.tensor(a[name]), rtol=1e-5, atol=1e-6)
    # Selection: the rule depends only on the stable ids and the scores, so on the same batch both runs
    # select the same positions; the resumed run's mask is that rule applied to its batch.
    assert [r["selected"] for r in got] == selection_from_records(got, "teachability", TA_OPD_RATIO)
    # Optimizer and scheduler: restored, so after step 3 both runs have taken the same number of steps.
    actor = Path("checkpoints/global_step_3/actor")
    for run_dir in (full_dir, resumed_dir):
        optim = torch.load(run_dir / actor / "optim_world_size_1_rank_0.pt", weights_only=False)
        extra = torch.load(run_dir / actor / "extra_state_world_size_1_rank_0.pt", weights_only=False)
        assert {float(state["step"]) for state in optim["state"].values()} == {float(TA_OPD_STEPS)}
        assert extra["lr_scheduler"]["last_epoch"] == TA_OPD_STEPS
