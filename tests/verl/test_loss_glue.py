"""TA-OPD's loss callable against verl's own OPD loss and against direct computations."""

from __future__ import annotations

import pytest
import torch
from verl_fixtures import compose_config, synthetic_micro_batch, ta_opd_loss_function

from ta_opd_verl.loss import TAOPDLossFunction
from ta_opd_verl.opd_loss import masked_aggregate, reverse_kl_on_teacher_support
from ta_opd_verl.protocol import (
    SCORE_PHASE,
    TOPK_ENTROPY_FIELD,
    TRAIN_PHASE,
    TeacherLayoutError,
    split_teacher_entries,
)
from ta_opd_verl.teachers import ServerTeacher

TOPK = 4
VOCAB = 24
# DistillationConfig checks that a teacher is named; no model is loaded by these tests.
TEACHER = ["distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher"]


def _configs(loss: str = "pg_k1", aggregation: str = "token-mean"):
    from verl.utils.config import omega_conf_to_dataclass

    overrides = [
        f"distillation.distillation_loss.topk={TOPK}",
        "distillation.distillation_loss.ta_opd.k=4",
        f"distillation.distillation_loss.ta_opd.loss={loss}",
        f"distillation.distillation_loss.ta_opd.aggregation={aggregation}",
        f"distillation.distillation_loss.use_policy_gradient={loss == 'pg_k1'}",
        *TEACHER,
    ]
    config = compose_config("ta_opd_cpu", overrides)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    distillation = omega_conf_to_dataclass(config.distillation)
    return config, actor, distillation


def _with_phase(data, phase):
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, ta_opd_phase=phase)
    return data


def test_full_selection_reproduces_verls_k1_policy_gradient_loss():
    from verl.trainer.distillation.losses import distillation_ppo_loss
    from verl.utils.config import omega_conf_to_dataclass

    config, actor, distillation = _configs("pg_k1")
    data, model_output, _ = synthetic_micro_batch([3, 2, 4], [4, 5, 2], vocab=VOCAB, topk=TOPK)
    ours, _ = TAOPDLossFunction(actor, distillation, ServerTeacher())(
        data=_with_phase(data, TRAIN_PHASE), model_output=model_output
    )

    verl_config = compose_config(
        "opd_cpu",
        ["distillation.distillation_loss.topk=4", "distillation.distillation_loss.loss_mode=k1", *TEACHER],
    )
    verl_distillation = omega_conf_to_dataclass(verl_config.distillation)
    verl_actor = omega_conf_to_dataclass(verl_config.actor_rollout_ref.actor)
    verl_data = data.clone()
    verl_data["teacher_logprobs"] = torch.nested.as_nested_tensor(
        [row[:, TOPK:] for row in data["teacher_logprobs"].unbind()], layout=torch.jagged
    )
    # verl still evaluates its task-reward PPO loss (then multiplies it by 0): OPD's task advantages are 0.
    verl_data["advantages"] = torch.nested.as_nested_tensor(
        [torch.zeros(row.shape[0]) for row in data["response_mask"].unbind()], layout=torch.jagged
    )
    reference, _ = distillation_ppo_loss(
        config=verl_actor, distillation_config=verl_distillation, model_output=model_output, data=verl_data
    )
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_pg_k1_loss_is_the_mean_over_selected_positions():
    _, actor, distillation = _configs("pg_k1")
    selection = [[0, 2], [], [1]]
    data, model_output, raw = synthetic_micro_batch(
        [3, 2, 4], [4, 5, 2], vocab=VOCAB, topk=TOPK, selection=selection
    )
    loss, _ = TAOPDLossFunction(actor, distillation, ServerTeacher())(
        data=_with_phase(data, TRAIN_PHASE), model_output=model_output
    )
    # First PPO epoch (log_prob == old_log_prob is not assumed): ratio r = exp(lp - old), advantage
    # A = -(lp - lp_teacher(y)); clipped objective -min(rA, clip(r)A) with verl's dual clip, averaged over
    # the 3 selected positions.
    terms = []
    for sample, positions in enumerate(selection):
        prompt_len = data["prompts"][sample].shape[0]
        for t in positions:
            row = prompt_len - 1 + t
            lp = raw["log_probs"][sample][row]
            teacher = raw["teacher_logprobs"][sample][row, TOPK]
            old = data["old_log_probs"][sample][t]
            advantage = -(lp - teacher)
            ratio = torch.exp(lp - old)
            clipped = torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
            term = torch.maximum(-ratio * advantage, -clipped * advantage)
            if advantage < 0:  # verl's dual clip bounds the loss of negative advantages by -A * clip_ratio_c
                term = torch.minimum(
                    term, -advantage * distillation.distillation_loss.get("clip_ratio_c", 3.0)
                )
            terms.append(term)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_nothing_selected_gives_zero_loss_not_nan():
    _, actor, distillation = _configs("pg_k1")
    data, model_output, _ = synthetic_micro_batch([2, 2], [3, 3], vocab=VOCAB, topk=TOPK, selection=[[], []])
    loss, _ = TAOPDLossFunction(actor, distillation, ServerTeacher())(
        data=_with_phase(data, TRAIN_PHASE), model_output=model_output
    )
    assert loss.item() == 0.0


def test_score_phase_processor_returns_one_value_per_position_and_zero_loss():
    _, actor, distillation = _configs("pg_k1")
    data, model_output, _ = synthetic_micro_batch([3, 2], [4, 5], vocab=VOCAB, topk=TOPK)
    data = _with_phase(data, SCORE_PHASE)
    loss_fn = TAOPDLossFunction(actor, distillation, ServerTeacher())
    total = sum(row.shape[0] for row in data["teacher_ids"].unbind())
    outputs = loss_fn(student_logits=torch.randn(1, total, VOCAB), data=data)
    assert set(outputs) == {"ta_opd_disagreement", "ta_opd_compatibility"}
    for value in outputs.values():
        assert value.shape == (1, total) and torch.isfinite(value).all()
    loss, metrics = loss_fn(data=data, model_output=model_output)
    assert loss.item() == 0.0 and metrics == {}


def test_reverse_kl_on_teacher_support_is_exact_when_support_is_the_vocabulary():
    logits = torch.randn(5, 6)
    teacher_log_probs = torch.log_softmax(torch.randn(5, 6), dim=-1)
    ids = torch.arange(6).expand(5, 6)
    ours = reverse_kl_on_teacher_support(logits, ids, teacher_log_probs)
    student = torch.log_softmax(logits, dim=-1)
    reference = (student.exp() * (student - teacher_log_probs)).sum(-1)
    torch.testing.assert_close(ours, reference)
    assert reverse_kl_on_teacher_support(logits, ids, torch.log_softmax(logits, -1)).abs().max() < 1e-6


def test_teacher_rows_without_the_sampled_column_are_refused():
    with pytest.raises(TeacherLayoutError, match="sampled token"):
        split_teacher_entries(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), topk=4)


def test_loss_outside_ta_opd_trainer_is_refused():
    _, actor, distillation = _configs("pg_k1")
    data, model_output, _ = synthetic_micro_batch([2], [3], vocab=VOCAB, topk=TOPK)
    with pytest.raises(RuntimeError, match="trainer_mode=ta_opd"):
        TAOPDLossFunction(actor, distillation, ServerTeacher())(data=data, model_output=model_output)


def test_seq_mean_token_mean_averages_each_samples_selected_mean():
    per_token = torch.tensor([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]])
    selected = torch.tensor([[True, True, False], [False, False, True]])
    loss = masked_aggregate(
        per_token, selected, "seq-mean-token-mean", dp_size=1, batch_num_selected=3, global_batch_size=2
    )
    assert loss.item() == pytest.approx((2.0 + 6.0) / 2)
    token_mean = masked_aggregate(
        per_token, selected, "token-mean", dp_size=1, batch_num_selected=3, global_batch_size=2
    )
    assert token_mean.item() == pytest.approx((1.0 + 3.0 + 6.0) / 3)


def test_topk_entropy_mode_returns_the_students_top_k_entropy_from_the_processor():

    config = compose_config(
        "ta_opd_cpu",
        [
            f"distillation.distillation_loss.topk={TOPK}",
            "distillation.distillation_loss.ta_opd.k=4",
            "distillation.distillation_loss.ta_opd.entropy_mode=topk",
            *TEACHER,
        ],
    )
    loss_fn = ta_opd_loss_function(config)
    data, _, _ = synthetic_micro_batch([2], [3], vocab=VOCAB, topk=TOPK)
    logits = torch.randn(1, 5, VOCAB)
    outputs = loss_fn(student_logits=logits, data=_with_phase(data, SCORE_PHASE))
    top = torch.log_softmax(logits.topk(4, dim=-1).values, dim=-1)
    expected = -(top.exp() * top).sum(-1) / torch.log(torch.tensor(4.0))
    torch.testing.assert_close(outputs[TOPK_ENTROPY_FIELD], expected)
