"""Global selection and aggregation through verl's real FSDP2 engine: 2 data-parallel ranks (gloo) x 2
micro-batches each.

The driver selects over the whole rollout batch from injected per-position scores; each rank gets its half
of the batch with the selection as ``loss_mask`` and trains through verl 0.9.1's actor ``TrainingWorker``
(``train_mini_batch`` -> ``FSDPEngine.forward_backward_batch``, which counts ``loss_mask`` over all ranks as
``batch_num_tokens``; FSDP2 averages gradients over ranks) with TA-OPD's loss. The loss verl reports and
the gradient it hands the optimizer must equal those of one unsharded copy of the model trained on the
mean over the selected positions of the whole batch (Eq. 7), for each loss and aggregation TA-OPD offers
without a colocated teacher (`reverse_kl_full` runs the teacher: tests/verl/test_teacher_colocated.py).
"""

from __future__ import annotations

import pytest
import torch
from fsdp_engine_worker import (
    CASES,
    PROMPT_LENGTHS,
    RESPONSE_LENGTHS,
    SAMPLES,
    TEACHER_TOPK,
    WORLD_SIZE,
    expected_budget,
    global_selection,
    make_rollout_batch,
    rank_main,
    write_student,
)
from verl_rank import run_ranks

RANK_TIMEOUT_S = 240


def _load_reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)


def _response_log_probs(model, batch: dict, sample: int) -> torch.Tensor:
    """Full-vocabulary log-probs at the response positions of one sample: row j predicts response token j."""
    prompt_length, response_length = PROMPT_LENGTHS[sample], RESPONSE_LENGTHS[sample]
    logits = model(input_ids=batch["sequences"][sample].unsqueeze(0)).logits[0].float()
    return torch.log_softmax(logits[prompt_length - 1 : prompt_length - 1 + response_length], dim=-1)


def _teacher_rows(batch: dict, key: str, sample: int) -> torch.Tensor:
    prompt_length, response_length = PROMPT_LENGTHS[sample], RESPONSE_LENGTHS[sample]
    return batch[key][sample][prompt_length - 1 : prompt_length - 1 + response_length]


def _per_token_losses(model, batch: dict, loss: str, old_log_probs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sample's per-response-token loss, written out from the definitions (no TA-OPD code)."""
    losses = []
    for sample in range(SAMPLES):
        student = _response_log_probs(model, batch, sample)
        teacher_ids = _teacher_rows(batch, "teacher_ids", sample)
        teacher_logprobs = _teacher_rows(batch, "teacher_logprobs", sample)
        if loss == "reverse_kl_topk":
            # KL(p̄_S || p̄_T), both renormalised on the teacher's top-K ids.
            support = teacher_ids[:, :TEACHER_TOPK]
            student_on_support = torch.log_softmax(student.gather(-1, support), dim=-1)
            teacher_on_support = torch.log_softmax(teacher_logprobs[:, :TEACHER_TOPK], dim=-1)
            losses.append((student_on_support.exp() * (student_on_support - teacher_on_support)).sum(-1))
        elif loss == "reverse_kl_topk_tail":
            # KL on the K+1 cells: the teacher's top-K ids, and every other id together.
            support = teacher_ids[:, :TEACHER_TOPK]
            student_top = student.gather(-1, support).exp()
            teacher_top = teacher_logprobs[:, :TEACHER_TOPK].exp()
            student_cells = torch.cat([student_top, 1 - student_top.sum(-1, keepdim=True)], -1)
            teacher_cells = torch.cat([teacher_top, 1 - teacher_top.sum(-1, keepdim=True)], -1)
            losses.append((student_cells * (student_cells / teacher_cells).log()).sum(-1))
        else:
            # Sampled-token OPD as a PPO policy gradient at ratio 1: advantage -(log p_θ(y) - log p_T(y)),
            # loss -A * exp(log p_θ(y) - log p_θold(y)).
            sampled = teacher_ids[:, TEACHER_TOPK]
            log_prob = student.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
            k1 = (log_prob - teacher_logprobs[:, TEACHER_TOPK]).detach()
            assert k1.abs().max() < 10.0, "inside loss_max_clamp, so the reference needs no clamp"
            losses.append(k1 * torch.exp(log_prob - old_log_probs[sample]))
    return losses


def _reference_objective(per_token: list[torch.Tensor], mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    selected = [mask[sample, : RESPONSE_LENGTHS[sample]] for sample in range(SAMPLES)]
    if aggregation == "token-mean":
        return torch.cat([values[keep] for values, keep in zip(per_token, selected, strict=True)]).mean()
    # Each sample's mean over its selected positions, averaged over all samples of the batch (a sample
    # with nothing selected adds 0, as in verl's agg_loss).
    sample_means = [
        values[keep].mean() if keep.any() else values.sum() * 0
        for values, keep in zip(per_token, selected, strict=True)
    ]
    return torch.stack(sample_means).sum() / SAMPLES


def _run_ranks(model_dir, batch, mask, old_log_probs, report_path) -> list[dict]:
    run_ranks(
        rank_main, WORLD_SIZE, (str(model_dir), batch, mask, old_log_probs, str(report_path)), RANK_TIMEOUT_S
    )
    return torch.load(report_path)


def test_fsdp2_engine_trains_two_ranks_on_the_mean_over_the_global_selection(tmp_path):
    model_dir = tmp_path / "student"
    write_student(model_dir)
    batch = make_rollout_batch()

    # (1) The driver's mask is the global top-n: the planted positions, spread unevenly over ranks and
    # micro-batches, and none of the (higher-scored) positions past a response's end.
    mask = global_selection(batch)
    assert int(batch["planted"].sum()) == expected_budget(batch)
    assert torch.equal(mask, batch["planted"])

    reference = _load_reference(model_dir)
    with torch.no_grad():
        old_log_probs = [
            _response_log_probs(reference, batch, sample)
            .gather(-1, batch["sequences"][sample][PROMPT_LENGTHS[sample] :].unsqueeze(-1))
            .squeeze(-1)
            for sample in range(SAMPLES)
        ]
    reports = _run_ranks(model_dir, batch, mask, old_log_probs, tmp_path / "reports.pt")

    # (2) Per case: the loss verl reports (its micro-batch losses summed, averaged over ranks) and the
    # gradient FSDP2 hands the optimizer equal the unsharded model's mean over the selected positions.
    assert [report["case"] for report in reports] == list(CASES)
    parameters = dict(reference.named_parameters())
    for report in reports:
        loss, aggregation = report["case"]
        objective = _reference_objective(
            _per_token_losses(reference, batch, loss, old_log_probs), mask, aggregation
        )
        gradients = torch.autograd.grad(objective, list(parameters.values()))
        expected = dict(zip(parameters, gradients, strict=True))

        assert report["loss"] == [pytest.approx(objective.item(), rel=1e-5)], report["case"]
        assert set(report["gradients"]) == set(expected)
        for name, gradient in report["gradients"].items():
            torch.testing.assert_close(
                gradient, expected[name], rtol=1e-4, atol=1e-6, msg=f"{report['case']} {name}"
            )
        expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
        assert report["grad_norm"] == [pytest.approx(expected_norm.item(), rel=1e-4)]
