"""TA-OPD's loss callable against verl's own OPD loss and against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from golden import golden_case, golden_vectors
from tensordict import TensorDict
from verl_fixtures import (
    compose_config,
    nested,
    run_update,
    selected_packed_rows,
    synthetic_micro_batch,
    ta_opd_loss_function,
)

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


def _with_normalised_teacher_rows(data, vocab: int, seed: int):
    """Replace the fixture's teacher rows by a real teacher's: top-K of a softmax, then the sampled token."""
    generator = torch.Generator().manual_seed(seed)
    ids, logprobs = [], []
    for row_ids in data["teacher_ids"].unbind():
        log_probs = torch.log_softmax(torch.randn(row_ids.shape[0], vocab, generator=generator) * 2, -1)
        top = torch.topk(log_probs, TOPK, dim=-1)
        sampled = row_ids[:, TOPK:]
        ids.append(torch.cat([top.indices, sampled], -1))
        logprobs.append(torch.cat([top.values, log_probs.gather(-1, sampled)], -1))
    data["teacher_ids"], data["teacher_logprobs"] = nested(ids), nested(logprobs)
    return data


@pytest.mark.parametrize("loss_name", ["reverse_kl_topk", "reverse_kl_topk_tail"])
def test_top_k_losses_are_the_mean_of_their_reverse_kl_over_the_selected_positions(loss_name):
    """``loss=reverse_kl_topk`` / ``reverse_kl_topk_tail``: the update's processor computes the KL at the
    selected rows of the packed logits only (0 elsewhere), and the loss averages it over the selection; its
    gradient in the student's logits is the direct computation's, and reaches no other row."""
    from ta_opd_verl.opd_loss import reverse_kl_topk_tail

    direct_loss = {
        "reverse_kl_topk": reverse_kl_on_teacher_support,
        "reverse_kl_topk_tail": reverse_kl_topk_tail,
    }[loss_name]
    _, actor, distillation = _configs(loss_name)
    prompt_lengths, response_lengths, selection = [3, 2, 4], [4, 5, 2], [[0, 3], [], [1]]
    data, _, _ = synthetic_micro_batch(
        prompt_lengths, response_lengths, vocab=VOCAB, topk=TOPK, selection=selection
    )
    data = _with_phase(_with_normalised_teacher_rows(data, VOCAB, seed=3), TRAIN_PHASE)
    offsets = data["input_ids"].offsets()
    logits = (
        torch.randn(1, int(offsets[-1]), VOCAB, generator=torch.Generator().manual_seed(4)) * 2
    ).requires_grad_()
    loss_fn = TAOPDLossFunction(actor, distillation, ServerTeacher())
    per_token, loss, metrics = run_update(loss_fn, logits, data, offsets)
    assert per_token.shape == (1, int(offsets[-1]))
    loss.backward()

    rows = selected_packed_rows(offsets, prompt_lengths, selection)
    teacher_ids = data["teacher_ids"].values()[rows, :TOPK]
    teacher_logprobs = data["teacher_logprobs"].values()[rows, :TOPK]
    reference_logits = logits.detach().clone().requires_grad_()
    direct = direct_loss(reference_logits[0, rows], teacher_ids, teacher_logprobs)
    direct.mean().backward()
    assert loss.item() == pytest.approx(direct.mean().item(), rel=1e-6)
    assert metrics["ta_opd/reverse_kl_selected"] == pytest.approx(direct.mean().item(), rel=1e-6)
    unselected = torch.ones(int(offsets[-1]), dtype=torch.bool)
    unselected[rows] = False
    assert torch.equal(per_token[0, unselected].detach(), torch.zeros(int(unselected.sum())))
    torch.testing.assert_close(logits.grad, reference_logits.grad)
    assert logits.grad[0, unselected].abs().max() == 0 and logits.grad[0, rows].abs().min() > 0


def test_tail_loss_takes_the_teachers_ids_outside_the_students_vocabulary_as_probability_zero():
    """A server teacher whose vocabulary is larger than the student's returns ids past the student's logits:
    the student has probability 0 there, and the loss is still the direct computation's."""
    from ta_opd_verl.opd_loss import reverse_kl_topk_tail
    from ta_opd_verl.protocol import REVERSE_KL_FIELD

    _, actor, distillation = _configs("reverse_kl_topk_tail")
    data, _, _ = synthetic_micro_batch([2], [3], vocab=VOCAB, topk=TOPK, selection=[[0, 1, 2]])
    data = _with_phase(_with_normalised_teacher_rows(data, VOCAB + 6, seed=5), TRAIN_PHASE)
    logits = torch.randn(1, 5, VOCAB)
    per_token = TAOPDLossFunction(actor, distillation, ServerTeacher())(student_logits=logits, data=data)
    rows = torch.arange(1, 4)
    teacher_ids = data["teacher_ids"].values()[rows, :TOPK]
    assert (teacher_ids >= VOCAB).any()
    direct = reverse_kl_topk_tail(
        logits[0, rows], teacher_ids, data["teacher_logprobs"].values()[rows, :TOPK]
    )
    torch.testing.assert_close(per_token[REVERSE_KL_FIELD][0, rows], direct)


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
    top = torch.log_softmax(torch.log_softmax(logits, dim=-1).topk(4, dim=-1).values.double(), dim=-1)
    expected = -(top.exp() * top).sum(-1) / math.log(4.0)
    torch.testing.assert_close(outputs[TOPK_ENTROPY_FIELD], expected)


# ---- the authors' loss (golden vectors of their code, `../shared/reference`) ----

GOLDEN_LOSS_CASES = (4, 6, 11, 14, 18, 21)
PROMPT_LENGTH = 3  # the generator's dummy prompt


@pytest.fixture(scope="module")
def golden():
    return golden_vectors()


def _golden_micro_batch(case: dict, old: torch.Tensor):
    """A golden loss case as verl's engine hands it to the loss: full-sequence log-probs (a leaf, for the
    gradient) and teacher rows whose sampled-token column is the teacher's log-prob of each response
    token; the selection in ``loss_mask``."""
    from verl.utils import tensordict_utils as tu

    lengths = case["response_lengths"].tolist()
    selection = case["loss/loss_mask"]
    rows = [PROMPT_LENGTH + length for length in lengths]
    offsets = torch.tensor([0, *rows]).cumsum(0)
    log_probs = torch.zeros(offsets[-1].item(), dtype=torch.float32)
    teacher_logprobs = torch.zeros(offsets[-1].item(), TOPK + 1)
    response_rows = []
    for sample, (start, length) in enumerate(zip(offsets[:-1].tolist(), lengths, strict=True)):
        at = torch.arange(length) + start + PROMPT_LENGTH - 1  # row P - 1 + t scores response token t
        log_probs[at] = case["loss/current_logprobs"][sample, :length]
        teacher_logprobs[at, TOPK] = case["teacher_sampled_logprobs"][sample, :length]
        response_rows.append(at)
    log_probs.requires_grad_(True)
    data = TensorDict(
        {
            "prompts": nested([torch.zeros(PROMPT_LENGTH, dtype=torch.long) for _ in lengths]),
            "responses": nested([case["sampled_ids"][b, :n].long() for b, n in enumerate(lengths)]),
            "teacher_ids": nested([torch.zeros(n, TOPK + 1, dtype=torch.long) for n in rows]),
            "teacher_logprobs": nested(list(teacher_logprobs.split(rows))),
            "old_log_probs": nested([old[b, :n] for b, n in enumerate(lengths)]),
            "response_mask": nested([torch.ones(n, dtype=torch.int64) for n in lengths]),
            "loss_mask": nested([selection[b, :n].long() for b, n in enumerate(lengths)]),
        },
        batch_size=len(lengths),
    )
    tu.assign_non_tensor(
        data, dp_size=1, batch_num_tokens=int(selection.sum()), global_batch_size=len(lengths)
    )
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, offsets)}
    return _with_phase(data, TRAIN_PHASE), model_output, log_probs, response_rows


def _golden_loss(case: dict, policy: str, overrides: list[str]):
    old = case["loss/current_logprobs"] if policy == "onpolicy" else case["loss/old_logprobs_offpolicy"]
    config = compose_config(
        "ta_opd_cpu",
        [
            f"distillation.distillation_loss.topk={TOPK}",
            "distillation.distillation_loss.ta_opd.k=4",
            "distillation.distillation_loss.ta_opd.loss=pg_k1",
            "distillation.distillation_loss.use_policy_gradient=True",
            *TEACHER,
            *overrides,
        ],
    )
    data, model_output, log_probs, response_rows = _golden_micro_batch(case, old)
    loss, _ = ta_opd_loss_function(config)(data=data, model_output=model_output)
    loss.backward()
    gradient = torch.zeros_like(case["loss/current_logprobs"])
    for sample, rows in enumerate(response_rows):
        gradient[sample, : rows.numel()] = log_probs.grad[rows]
    return loss.detach(), gradient


# The authors_code recipe's verl key: their loss has no clamp (a preset sets ta_opd keys only).
AUTHORS_LOSS = [
    "distillation.distillation_loss.ta_opd.preset=authors_code",
    "distillation.distillation_loss.loss_max_clamp=null",
]


@pytest.mark.parametrize("policy", ["onpolicy", "offpolicy"])
@pytest.mark.parametrize("index", GOLDEN_LOSS_CASES)
def test_authors_code_preset_reproduces_the_authors_loss_and_gradient(golden, index, policy):
    """Advantage from the OLD log-prob, the plain PPO clip 0.2 / 0.28, no clamp, the mean over samples of
    each sample's token mean (rule 13): their float32 loss and its gradient in the current log-probs."""
    case = golden_case(golden, index)
    loss, gradient = _golden_loss(case, policy, AUTHORS_LOSS)
    torch.testing.assert_close(loss, case[f"loss/{policy}/loss"], rtol=1.2e-7, atol=1.2e-7)
    torch.testing.assert_close(
        gradient, case[f"loss/{policy}/grad_current_logprobs"], rtol=1.2e-7, atol=1.2e-7
    )


def test_verls_conventions_give_another_loss_off_policy_only(golden):
    """Without the preset (advantage from the current log-prob, verl's dual clip): the same loss on-policy,
    another one as soon as the old policy differs."""
    case = golden_case(golden, 6)  # a position whose ratio passes 3 with a negative advantage
    seq_mean = ["distillation.distillation_loss.ta_opd.aggregation=seq-mean-token-mean"]
    verl_like = seq_mean + ["distillation.distillation_loss.loss_max_clamp=null"]
    on_policy, _ = _golden_loss(case, "onpolicy", verl_like)
    torch.testing.assert_close(on_policy, case["loss/onpolicy/loss"], rtol=1e-6, atol=1e-6)
    off_policy, _ = _golden_loss(case, "offpolicy", verl_like)
    assert abs(off_policy.item() - case["loss/offpolicy/loss"].item()) > 1e-3
    for key in ("advantage_logprob=old", "dual_clip=false"):  # each one alone is not enough
        alone, _ = _golden_loss(
            case, "offpolicy", verl_like + [f"distillation.distillation_loss.ta_opd.{key}"]
        )
        assert abs(alone.item() - case["loss/offpolicy/loss"].item()) > 1e-3, key
