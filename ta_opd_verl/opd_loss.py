"""The OPD losses on selected positions: pure tensor math, torch only (no verl).

`ta_opd_verl.loss` runs them inside verl's actor worker; the diagnostic and the on-policy benchmark run
them in plain PyTorch. Every function here is differentiable in the student's logits where it takes them.
"""

from __future__ import annotations

import torch


def reverse_kl_on_teacher_support(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-position reverse KL(p̄_S || p̄_T) with both distributions renormalised on the teacher's returned
    ids (exact when they cover the vocabulary). Differentiable in the student logits."""
    student_log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    student_on_support = torch.gather(student_log_probs, -1, teacher_ids.long())
    student_on_support = student_on_support - torch.logsumexp(student_on_support, dim=-1, keepdim=True)
    teacher_on_support = teacher_logprobs.float() - torch.logsumexp(
        teacher_logprobs.float(), dim=-1, keepdim=True
    )
    return (student_on_support.exp() * (student_on_support - teacher_on_support)).sum(-1)


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token PPO-clip loss max(-r·A, -clip(r, 1 - clip_low, 1 + clip_high)·A), r = exp(log_prob -
    old_log_prob), without verl's dual clip and log-ratio clamp (the objective of the paper and of the
    authors' ``compute_policy_loss``); also where the clipped term won (the clip fraction's numerator).
    Differentiable in ``log_prob``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return torch.maximum(unclipped, clipped), clipped > unclipped


def masked_aggregate(
    per_token: torch.Tensor,
    selected: torch.Tensor,
    mode: str,
    *,
    dp_size: int,
    batch_num_selected: float,
    global_batch_size: int,
) -> torch.Tensor:
    """Aggregate a ``[B, T]`` per-token loss over the selected positions of one micro-batch so that the
    gradient summed over micro-batches and averaged over data-parallel ranks equals:
    ``token-mean``: the sum over the mini-batch's selected positions divided by their number (Eq. 7);
    ``seq-mean-token-mean``: the mean over samples of each sample's mean over its selected positions.
    A mini-batch with nothing selected contributes exactly 0."""
    selected = selected.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * selected).sum() / max(batch_num_selected, 1.0) * dp_size
    counts = selected.sum(-1)
    sample_means = (per_token * selected).sum(-1) / counts.clamp_min(1.0)
    return sample_means.sum() / max(global_batch_size, 1) * dp_size


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` where ``mask`` holds; 0.0 when it holds nowhere (a metric, not a loss)."""
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0
