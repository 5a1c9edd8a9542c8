"""Per-position quantities of the fixed-context diagnostic: pure tensor math, torch only.

For each context the diagnostic needs, from the student's and the teacher's full logits:
- the full-vocabulary forward KL(p_T || p_θ) (Eq. 1's gain is its drop), the reverse KL(p_θ || p_T),
  the student entropy H and the teacher entropy;
- for each support size K, through the plugin's own `token_statistics`: D on U = S ∪ T with the true
  student and teacher probabilities (the paper's diagnostic form), the exact C (Eq. 10) and its lower
  bound Ĉ from the teacher's top-K (Eq. 17);
- the teacher's entries the training losses need (top ids and log-probs, the sampled token's log-prob).
Bank-level normalisation and the selector scores come from `ta_opd_verl.teachability` unchanged.
"""

from __future__ import annotations

import torch

from ta_opd_verl.teachability import (
    SelectionRules,
    TokenStatistics,
    batch_normalize,
    selector_scores,
    token_statistics,
)

# Selectors whose score is a function of (D, C, H) alone: the ones a correlation can be computed for.
DETERMINISTIC_SELECTORS = ("teachability", "raw_kl", "entropy", "tip", "ta_entropy", "c_only", "d_incompat")


@torch.no_grad()
def divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-vocabulary forward KL(p_T||p_θ), reverse KL(p_θ||p_T), student and teacher entropy per position.

    Logits `[..., V]` of any float dtype, same V; the math runs in float32. Returns float32 `[...]`
    tensors under the keys `forward_kl`, `reverse_kl`, `entropy`, `teacher_entropy`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have one shape (slice both to the common vocabulary first)"
        )
    student_lp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_p, teacher_p = student_lp.exp(), teacher_lp.exp()
    # xlogy-style products: a zero probability contributes 0 even where its log-prob is -inf.
    log_ratio = teacher_lp - student_lp
    forward = torch.where(teacher_p > 0, teacher_p * log_ratio, 0.0).sum(-1)
    reverse = torch.where(student_p > 0, -student_p * log_ratio, 0.0).sum(-1)
    entropy = -torch.where(student_p > 0, student_p * student_lp, 0.0).sum(-1)
    teacher_entropy = -torch.where(teacher_p > 0, teacher_p * teacher_lp, 0.0).sum(-1)
    return {
        "forward_kl": forward,
        "reverse_kl": reverse,
        "entropy": entropy,
        "teacher_entropy": teacher_entropy,
    }


@torch.no_grad()
def support_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ks: tuple[int, ...],
    student_entropy: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """D, exact C and lower-bound Ĉ for each K, from `token_statistics`, as `[...]` float32 tensors.

    Keys `disagreement@K`, `compatibility@K` (exact, Eq. 10) and `compatibility_lower_bound@K` (Eq. 17,
    from the teacher's top-K only). D takes the teacher's exact probabilities on the student's top-K,
    so it is the paper's D on U = S ∪ T with true probabilities on both sides.
    """
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        top_lp, top_ids = torch.topk(teacher_lp, k, dim=-1)
        student_topk_ids = torch.topk(student_logits, k, dim=-1).indices
        exact = token_statistics(
            student_logits,
            top_ids,
            top_lp,
            k=k,
            teacher_logprobs_at_student_topk=teacher_lp.gather(-1, student_topk_ids),
            student_entropy=student_entropy,
        )
        lower = token_statistics(student_logits, top_ids, top_lp, k=k, student_entropy=student_entropy)
        out[f"disagreement@{k}"] = exact.disagreement
        out[f"compatibility@{k}"] = exact.compatibility
        out[f"compatibility_lower_bound@{k}"] = lower.compatibility
    return out


@torch.no_grad()
def teacher_topk_and_sampled_logprobs(
    teacher_logits: torch.Tensor, sampled_ids: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-`topk` ids and log-probs `[..., topk]` and its log-prob of the sampled token `[...]`:
    what a TA-OPD teacher server returns, and all the training losses read from the teacher."""
    teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    top_lp, top_ids = torch.topk(teacher_lp, topk, dim=-1)
    sampled_lp = teacher_lp.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    return top_ids, top_lp, sampled_lp


@torch.no_grad()
def bank_scores(
    grids: dict[str, torch.Tensor], valid: torch.Tensor, k: int, *, q_low: float = 0.05, q_high: float = 0.95
) -> dict[str, torch.Tensor]:
    """Bank-normalised statistics and every deterministic selector's score at support size K.

    `grids` holds `[R, L]` raw statistics (`entropy`, `disagreement@K`, `compatibility@K`); the bank is the
    batch of Eq. 11. Returns `[R, L]` tensors: `D_norm`, `C_norm`, `H_norm`, `D_L` (= s, teachability),
    `D_I` (= D̃(1 - C̃)), `in_q3`, and one entry per name in `DETERMINISTIC_SELECTORS`.
    """
    stats = statistics_at(grids, k)
    rules = SelectionRules(q_low=q_low, q_high=q_high)
    out = {
        "D_norm": batch_normalize(stats.disagreement, valid, q_low, q_high),
        "C_norm": batch_normalize(stats.compatibility, valid, q_low, q_high),
        "H_norm": batch_normalize(stats.entropy, valid, q_low, q_high),
    }
    out["D_L"] = out["D_norm"] * out["C_norm"]
    out["D_I"] = out["D_norm"] * (1.0 - out["C_norm"])
    # Q3 membership exactly as the selectors define it: `q3_high_c` scores 1 + C̃ on Q3 and 0 elsewhere.
    out["in_q3"] = selector_scores("q3_high_c", stats, valid, rules=rules) >= 1.0
    for name in DETERMINISTIC_SELECTORS:
        out[name] = selector_scores(name, stats, valid, rules=rules)
    return out


def statistics_at(grids: dict[str, torch.Tensor], k: int, compatibility: str = "exact") -> TokenStatistics:
    """The `TokenStatistics` of K from the bank's grids, with exact C or its lower bound."""
    key = f"compatibility@{k}" if compatibility == "exact" else f"compatibility_lower_bound@{k}"
    return TokenStatistics(grids[f"disagreement@{k}"], grids[key], grids["entropy"])
