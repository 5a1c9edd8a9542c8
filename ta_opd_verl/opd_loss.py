"""The OPD losses on selected positions: pure tensor math, torch only (no verl).

`ta_opd_verl.loss` runs them inside verl's actor worker; the diagnostic and the on-policy benchmark run
them in plain PyTorch. Every function here is differentiable in the student's logits where it takes them.
The per-position reverse KLs (``ta_opd.loss``, `docs/algorithm.md`, "The losses"):
- `reverse_kl_on_teacher_support` (``reverse_kl_topk``): both distributions renormalised on the teacher's
  returned ids;
- `reverse_kl_topk_tail` (``reverse_kl_topk_tail``): the teacher's returned ids plus one tail bucket with
  each distribution's remaining mass, a lower bound of the full KL;
- `reverse_kl_full` / `reverse_kl_full_from_blocks` (``reverse_kl_full``): the whole vocabulary, from the
  teacher's logits or from its output layer block by block (`ta_opd_verl.teacher_head`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ta_opd_verl.teacher_head import logit_log_prob_blocks, rows_per_block

# The teacher's tail mass 1 - Σ top-K is taken >= this: float rounding can bring the sum of its returned
# probabilities to 1 or above. Raising the teacher's tail only lowers the loss, so it stays a lower bound.
TAIL_MASS_FLOOR = 1e-12


def reverse_kl_on_teacher_support(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-position reverse KL(p̄_S || p̄_T) with both distributions renormalised on the teacher's returned
    ids (exact when they cover the vocabulary); an entry with log-prob -inf is no entry (its id, verl's
    filler 0, is not in the support). Differentiable in the student logits."""
    present = teacher_logprobs > -math.inf
    student_log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    student_on_support = torch.gather(student_log_probs, -1, teacher_ids.long()).masked_fill(
        ~present, -math.inf
    )
    student_on_support = student_on_support - torch.logsumexp(student_on_support, dim=-1, keepdim=True)
    teacher_on_support = teacher_logprobs.float() - torch.logsumexp(
        teacher_logprobs.float(), dim=-1, keepdim=True
    )
    # 0 (not 0·nan) at an absent entry, in the value and in the gradient.
    log_ratio = (student_on_support - teacher_on_support).masked_fill(~present, 0.0)
    return (student_on_support.exp() * log_ratio).sum(-1)


def reverse_kl_topk_tail(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    tail_floor: float = TAIL_MASS_FLOOR,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Per-position reverse KL on the K+1-way partition {teacher's returned ids} + {every other id}.

    With q = the student's softmax over its whole vocabulary and t_k = exp(teacher_logprobs_k):
    Σ_k q_k (log q_k - log t_k) + q_tail (log q_tail - log t_tail), where q_tail = Σ_{v ∉ ids} q_v (a
    log-sum-exp over those ids, not 1 - Σ q_k) and t_tail = max(1 - Σ_k t_k, ``tail_floor``). A lower bound
    of KL(p_θ || p_T) over the whole vocabulary (merging ids never raises a KL), equal to it exactly where
    p_θ / p_T is constant over the tail: in particular when the ids cover every id either model gives
    mass. Gradient in the logits z: ∂/∂z_v = p_θ(v) (log(q_c / t_c) - KL_tail), c the cell of v.

    Computed ``block_rows`` positions at a time, each block's gradient with its value (kept in the logits'
    dtype, the size of the gradient the backward returns anyway): the working memory is one float32 block
    of the vocabulary whatever the number of positions. Backward may run once.

    Args:
        student_logits: ``[..., V_S]`` logits of any float dtype (float32 arithmetic, float64 kept).
        teacher_ids: ``[..., K]`` distinct ids of the teacher's entries; ids >= V_S (the teacher's vocabulary
            can be larger) have student probability 0.
        teacher_logprobs: ``[..., K]`` the teacher's log-probs of those ids (its full softmax); -inf marks no
            entry (its id, verl's filler 0, stays in the tail).
        tail_floor: lower bound of the teacher's tail mass (`TAIL_MASS_FLOOR`).
        block_rows: positions per block; results do not depend on it. Default: about 256 MiB of float32.

    Returns:
        ``[...]`` per-position values in float32 (float64 for float64 logits), differentiable in
        ``student_logits``; the K+1 cells' arithmetic runs in float64.
    """
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs {tuple(teacher_logprobs.shape)} must both "
            f"be [..., K] with the logits' leading shape {tuple(student_logits.shape[:-1])}"
        )
    lead, (vocab, k) = student_logits.shape[:-1], (student_logits.shape[-1], teacher_ids.shape[-1])
    teacher_top = teacher_logprobs.detach().reshape(-1, k).double()
    teacher_tail = (1.0 - teacher_top.exp().sum(-1, keepdim=True)).clamp_min(tail_floor).log()
    values = _TailReverseKL.apply(
        student_logits.reshape(-1, vocab),
        teacher_ids.reshape(-1, k).long(),
        torch.cat([teacher_top, teacher_tail], dim=-1),
        block_rows or rows_per_block(vocab),
    )
    return values.reshape(lead)


class _TailReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_ids, teacher_cells, block_rows):
        n_rows, vocab = student_logits.shape
        k = teacher_ids.shape[-1]
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        # An absent entry (-inf) is treated like an id past the vocabulary: an empty cell.
        in_vocabulary = (teacher_ids < vocab) & (teacher_cells[:, :k] > -math.inf)
        ids = teacher_ids.clamp(max=vocab - 1)
        values = torch.empty(n_rows, dtype=dtype, device=student_logits.device)
        gradient = torch.zeros_like(student_logits) if ctx.needs_input_grad[0] else None
        for start in range(0, n_rows, block_rows):
            rows = slice(start, min(start + block_rows, n_rows))
            known, block_ids = in_vocabulary[rows], ids[rows]
            # The block's log-probs become the tail's: the teacher's ids set to -inf after their gather.
            log_p = torch.log_softmax(student_logits[rows], dim=-1, dtype=dtype)
            at_ids = torch.gather(log_p, -1, block_ids).masked_fill_(~known, -math.inf)
            block_rows_of = (
                torch.arange(log_p.shape[0], device=log_p.device).unsqueeze(-1).expand_as(block_ids)
            )
            log_p[block_rows_of[known], block_ids[known]] = -math.inf
            log_tail = torch.logsumexp(log_p, dim=-1, keepdim=True)
            student_cells = torch.cat([at_ids, log_tail], dim=-1).double()
            values[rows] = kl = _kl_terms(student_cells, teacher_cells[rows]).sum(-1)
            if gradient is None:
                continue
            # ∂/∂z_v = p(v) (log(q_c / t_c) - KL); a cell without student mass has p(v) = 0 at all its ids.
            coefficient = student_cells - teacher_cells[rows] - kl.unsqueeze(-1)
            coefficient = torch.where(student_cells > -math.inf, coefficient, 0.0)
            block_gradient = log_p.exp_().mul_(coefficient[:, k:].to(dtype))
            at_ids_gradient = (student_cells[:, :k].exp() * coefficient[:, :k]).to(dtype)
            block_gradient[block_rows_of[known], block_ids[known]] = at_ids_gradient[known]
            gradient[rows] = block_gradient
            del log_p, block_gradient  # before the next block is made
        ctx.gradient = gradient
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        return _saved_gradient(ctx, grad_values), None, None, None


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise, 0 where p = 0 (whatever q), +inf where p > 0 = q."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0)


def _saved_gradient(ctx, grad_values: torch.Tensor) -> torch.Tensor:
    """The gradient the forward kept, scaled by the incoming one, per position (once: it is scaled in
    place)."""
    if ctx.gradient is None:
        raise RuntimeError("the blocked reverse KLs' backward may run only once")
    gradient, ctx.gradient = ctx.gradient, None
    return gradient.mul_(grad_values.unsqueeze(-1).to(gradient.dtype))


def reverse_kl_full(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, block_rows: int | None = None
) -> torch.Tensor:
    """Per-position KL(p_θ || p_T) = Σ_v p_θ(v) (log p_θ(v) - log p_T(v)) over the whole vocabulary.

    Vocabularies of different sizes (V_S student logits, V_T teacher logits) are compared on the ids
    ``[0, min(V_S, V_T))`` both have: each distribution is restricted to them and renormalised there. The
    teacher's mass on ids the student lacks leaves its normaliser (the colocated teacher's rule,
    `ta_opd_verl.teacher_head`); the student's mass on ids the teacher lacks is left out of the loss, so
    those logits get no gradient (counted against a teacher probability of 0 they would make the KL
    infinite). Gradient: ∂/∂z_v = p̄_θ(v) (log p̄_θ(v) - log p̄_T(v) - KL) on the common ids, 0 elsewhere.

    Args:
        student_logits: ``[..., V_S]``, any float dtype (float32 arithmetic, float64 kept).
        teacher_logits: ``[..., V_T]`` with the same leading shape; no gradient flows into them.
        block_rows: positions per block (`reverse_kl_full_from_blocks`); results do not depend on it.
            Default: about 256 MiB of float32 log-probs.

    Returns:
        ``[...]`` per-position values, differentiable in ``student_logits``; +inf where the teacher has
        probability 0 at an id where the student has mass.
    """
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} must have the student logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    blocks = logit_log_prob_blocks(
        teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]),
        vocab=vocab,
        block_rows=block_rows or rows_per_block(vocab),
    )
    return reverse_kl_full_from_blocks(student_logits.reshape(-1, vocab), blocks).reshape(lead)


def reverse_kl_full_from_blocks(
    student_logits: torch.Tensor,
    teacher_log_probs: Iterable[tuple[slice, torch.Tensor]],
    left_out_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reverse_kl_full` of ``[N, V_S]`` student logits against the teacher's log-probs given block by block
    (`ta_opd_verl.teacher_head`: ``(rows, [len(rows), V_C])`` over the common ids, covering ``[0, N)``).

    ``left_out_ids``: student ids the teacher has no counterpart for (probability 0 in its blocks: a
    special-token map's, `ta_opd_verl.special_tokens`); like the ids past the teacher's vocabulary they
    leave the student's distribution (renormalised without them, no gradient) instead of making the KL
    infinite.

    The gradient of each block is computed with its value and kept (``[N, V_S]`` in the logits' dtype, the
    size of the gradient the backward returns anyway), so no teacher block outlives its turn: the working
    memory is a few blocks whatever N. Backward may run once."""
    return _FullReverseKL.apply(student_logits, teacher_log_probs, left_out_ids)


class _FullReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_log_probs, left_out_ids) -> torch.Tensor:
        n_rows = student_logits.shape[0]
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        values = torch.empty(n_rows, dtype=dtype, device=student_logits.device)
        gradient = torch.zeros_like(student_logits) if ctx.needs_input_grad[0] else None
        covered = 0
        for rows, teacher in teacher_log_probs:
            common = teacher.shape[-1]
            logits = student_logits[rows, :common]
            if left_out_ids is not None:
                logits = logits.index_fill(-1, left_out_ids[left_out_ids < common], -math.inf)
            log_p = torch.log_softmax(logits, dim=-1, dtype=dtype)
            del logits
            p = log_p.exp()
            log_ratio = log_p.sub_(teacher.to(dtype))
            del teacher
            # 0·log 0 = 0: NaN only where p = 0 and the log-ratio is infinite; +inf is a true infinite KL.
            terms = torch.mul(p, log_ratio).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            values[rows] = kl = terms.sum(-1)
            if gradient is not None:
                torch.sub(log_ratio, kl.unsqueeze(-1), out=terms).mul_(p)
                gradient[rows, :common] = terms.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
            covered += terms.shape[0]
            del log_p, p, log_ratio, terms  # before the next block is made
        if covered != n_rows:
            raise ValueError(f"the teacher's blocks cover {covered} rows, the student logits have {n_rows}")
        ctx.gradient = gradient
        return values

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        return _saved_gradient(ctx, grad_values), None, None


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
