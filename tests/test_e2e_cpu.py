"""End to end through verl's real `python -m verl.trainer.main_ppo` on CPU, with the tiny pair.

Each test is one verl start-up (about 1.5 minutes on a quiet 2-core machine) plus a few steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from ta_opd_verl.launch import run_verl, tiny_pair_overrides
from ta_opd_verl.tiny.build import build_tiny_pair

pytestmark = pytest.mark.e2e

PEARSON = "training/rollout_actor_probs_pearson_corr"
VERL_TIMEOUT = 1500


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair()


def _train(config: str, pair, steps: int, overrides: list[str], out_dir) -> dict[int, dict]:
    """Run verl's trainer for ``steps`` steps without validation; the JSONL metrics by step."""
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
    assert sorted(data) == list(range(1, steps + 1))
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


def test_ta_opd_selects_five_percent_of_the_batch_and_trains_through_verl(pair, tmp_path):
    steps, ratio = 3, 0.05
    overrides = [
        f"distillation.distillation_loss.ta_opd.ratio={ratio}",
        "distillation.distillation_loss.ta_opd.min_keep_per_sample=0",
        "distillation.distillation_loss.ta_opd.loss=pg_k1",
        "distillation.distillation_loss.use_policy_gradient=true",
    ]
    data = _train("ta_opd_cpu", pair, steps, overrides, tmp_path)
    prefix = "actor/ta_opd/"
    for step, metrics in data.items():
        n_valid = metrics[prefix + "valid_positions"]
        assert metrics[prefix + "kept_positions"] == math.ceil(ratio * n_valid), step
        assert math.isfinite(metrics["actor/distillation/loss"]), step
        assert metrics[PEARSON] > 0.99, step
        # The teacher's log-prob of sampled tokens outside its top-16 reached the loss (none was dropped).
        assert metrics[prefix + "sampled_outside_teacher_topk"] > 0, step
        assert math.isfinite(metrics[prefix + "sampled_kl_selected_mean"]), step
        for name in ("disagreement", "compatibility", "entropy", "teachability"):
            assert math.isfinite(metrics[f"{prefix}{name}_selected_mean"]), (step, name)
        assert (
            metrics[prefix + "teachability_selected_mean"] >= metrics[prefix + "teachability_unselected_mean"]
        )
