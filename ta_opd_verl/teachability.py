"""Token teachability: per-position statistics, batch normalisation and budgeted selection.

Pure tensor math for TA-OPD (arXiv 2605.26844), importing torch and the standard library only, so it is
testable and reusable without verl. Equation numbers are the paper's.

- `token_statistics` computes, per position, the local disagreement D (Eq. 9, a forward KL on the union
  of the student's and the teacher's top-k), the compatibility C (Eq. 10, or its lower bound Eq. 17) and
  the student entropy H (Eq. 14).
- `batch_normalize` is the batch-robust quantile normalisation of Eq. 11.
- `selector_scores` turns normalised statistics into the score a selector ranks by (Eq. 12, 14-16).
- `select_budget` keeps the top `ceil(ratio * N_valid)` positions of the whole batch (Eq. 13).
- `select_positions` chains the three for one selector name, under the `SelectionRules` of a run.

Everything from the float32 log-probs on runs in float64, as the authors' selection code does: the budget
boundary is then decided by differences the inputs carry, not by the rounding of float32 scores
(`docs/algorithm.md`, "Presets").

Nothing here needs gradients: every function runs under `torch.no_grad()` and returns detached tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch

__all__ = [
    "BUDGET_ROUNDINGS",
    "DEFAULT_PROB_FLOOR",
    "DEFAULT_RULES",
    "ENTROPY_MODES",
    "MIN_KEEP_SCORES",
    "NO_SPREAD_RULES",
    "Q3_RULES",
    "SELECTORS",
    "STUDENT_PROBS",
    "TA_ENTROPY_SCORES",
    "TEACHER_LISTS",
    "SelectionRules",
    "TokenStatistics",
    "batch_normalize",
    "budget_size",
    "masked_quantiles",
    "select_budget",
    "select_from_scores",
    "select_positions",
    "selector_scores",
    "teacher_entries",
    "token_statistics",
]

STUDENT_PROBS = ("exact", "topk_only")
ENTROPY_MODES = ("full", "topk")
TEACHER_LISTS = ("all", "top_k")
NO_SPREAD_RULES = ("half", "zero")
TA_ENTROPY_SCORES = ("eq16", "normalized_product")
Q3_RULES = ("fill", "quadrant_only")
MIN_KEEP_SCORES = ("selector", "ta_entropy")
BUDGET_ROUNDINGS = ("decimal", "float")
SELECTORS = (
    "teachability",
    "raw_kl",
    "entropy",
    "tip",
    "ta_entropy",
    "c_only",
    "d_incompat",
    "random",
    "q3",
    "q3_high_c",
    "full",
)

# Probability floor inside D's logs (the authors' clamp, on both distributions).
DEFAULT_PROB_FLOOR = 1e-12
# no_spread=half: Eq. 11's epsilon, and the spread up to which a statistic counts as constant.
_NORM_EPS = 1e-12
_NO_SPREAD = 1e-6
# no_spread=zero (the authors' `_normalize`): no epsilon; below this spread every value becomes 0.
_AUTHORS_NO_SPREAD = 1e-12
# The entropy's log floor of the authors' `_entropy`.
_ENTROPY_LOG_FLOOR = 1e-12
# Rows per block when `chunk_size` is not given: about 256 MiB of float32 log-probs. A reused block buffer
# beats one [N, V] log-softmax on CPU (no page faults per call); much smaller blocks lose again to the
# per-operation thread synchronisation (measured on 2 cores, see docs/benchmarks.md).
_BLOCK_BYTES = 256 * 2**20
# Smaller temporaries (the entropy pass's probabilities, float32 copies of low-precision logits) are
# made sub-block by sub-block, about 32 MiB each.
_SUB_BLOCK_BYTES = 32 * 2**20


class TokenStatistics(NamedTuple):
    """Per-position statistics, each a float64 tensor of the inputs' leading shape.

    disagreement: D, the forward KL of the renormalised teacher from the renormalised student on U.
    compatibility: C, the teacher's probability mass on the student's top-k (or its lower bound).
    entropy: H, the student's entropy (full vocabulary, or top-k renormalised over log k).
    """

    disagreement: torch.Tensor
    compatibility: torch.Tensor
    entropy: torch.Tensor


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@torch.no_grad()
def token_statistics(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    k: int = 16,
    student_probs: str = "exact",
    student_prob_floor: float = DEFAULT_PROB_FLOOR,
    teacher_list: str = "all",
    teacher_logprobs_at_student_topk: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
    entropy_mode: str = "full",
    chunk_size: int | None = None,
    student_topk_ids: torch.Tensor | None = None,
) -> TokenStatistics:
    """Disagreement D, compatibility C and entropy H at every position (Eq. 8-10, 14, 17).

    Args:
        student_logits: `[..., V]` logits of any float dtype; the log-softmax runs in float32, everything
            after it in float64.
        teacher_topk_ids: `[..., Kt]` token ids of the teacher's entries, in any order. Present ids are
            assumed distinct within a position.
        teacher_topk_logprobs: `[..., Kt]` the teacher's log-probabilities of those ids; `-inf` marks an
            absent entry (its id is ignored). `Kt` may be smaller or larger than `k`.
        k: support size. S = the student's top-k ids (`torch.topk(student_logits, k)`, so ties follow
            torch's order); T = the teacher's k highest present entries (all present ones when Kt <= k);
            U = S ∪ T, each id counted once.
        student_probs: `"exact"` (paper) uses the true student softmax on all of U; `"topk_only"` (the
            authors' training code) gives ids outside S probability 0 (so it needs a floor).
        student_prob_floor: f >= 0. With f > 0 both renormalised distributions are floored at f inside
            D, over all of U, as the authors' code does (their 1e-12); f = 0 is Eq. 9 as written, in log
            space from the true log-probabilities, with no cap on D.
        teacher_list: `"all"` looks the teacher's log-prob of a student id up anywhere in the teacher
            list (C and D's teacher side); `"top_k"` uses only the teacher's k best entries, like the
            authors' code, whose list holds exactly k.
        teacher_logprobs_at_student_topk: optional `[..., k]` teacher log-probs at S, ordered like
            `torch.topk(student_logits, k)`. A student id that appears anywhere in the teacher list
            takes the list's value; the others take this tensor's value. Without it they get teacher
            probability 0, which makes C the lower bound of Eq. 17 and biases D wherever the teacher
            has mass on S outside its list (that mass is missing from p_T and from U's normaliser).
        student_entropy: optional `[...]` full-vocabulary entropy already computed (verl's forward does
            it); returned as given, in float64, which skips the entropy pass. Unused with
            `entropy_mode="topk"`.
        entropy_mode: `"full"` (paper) is the full-vocabulary entropy; `"topk"` (the authors' code) is
            the entropy of the student's top-k probabilities renormalised, -Σ q log max(q, 1e-12), divided
            by log max(n, 2) with n the number of positive probabilities (0 for k=1).
        student_topk_ids: optional `[..., k]` S as `torch.topk(student_logits, k).indices` gives it, when
            the caller already has it (the fsdp teacher needs S before scoring); skips the top-k pass.
        chunk_size: rows (positions) per block. Results do not depend on it. The working memory is one
            `[chunk_size, V]` float32 log-prob buffer (never more than one `[N, V]`), plus a buffer of
            about 32 MiB for the entropy pass. Default: blocks of about 256 MiB.

    Returns:
        TokenStatistics of float64 tensors with the leading shape. With p̄ = p / Σ_U p and f the floor,
        D = Σ_{v∈U} max(p̄_T(v), f) (log max(p̄_T(v), f) - log max(p̄_S(v), f)) (terms with p̄_T(v) = 0
        left out when f = 0; D = 0 when the teacher has no known mass on U), and C = Σ_{v∈S} p_T(v)
        clipped to [0, 1].
    """
    _check_choice("student_probs", student_probs, STUDENT_PROBS)
    _check_choice("entropy_mode", entropy_mode, ENTROPY_MODES)
    _check_choice("teacher_list", teacher_list, TEACHER_LISTS)
    if not student_prob_floor >= 0:
        raise ValueError(f"student_prob_floor must be >= 0, got {student_prob_floor}")
    if student_probs == "topk_only" and student_prob_floor == 0:
        raise ValueError(
            "student_probs='topk_only' needs student_prob_floor > 0: the student has probability 0 on the "
            "teacher's ids outside S, where D would be infinite"
        )
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocabulary size {vocab}], got {k}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher ids {tuple(teacher_topk_ids.shape)} and log-probs {tuple(teacher_topk_logprobs.shape)}"
            f" must both be [..., Kt] with the logits' leading shape {tuple(lead)}"
        )
    if teacher_logprobs_at_student_topk is not None and teacher_logprobs_at_student_topk.shape != (*lead, k):
        raise ValueError(
            f"teacher_logprobs_at_student_topk must have shape {(*lead, k)}, "
            f"got {tuple(teacher_logprobs_at_student_topk.shape)}"
        )
    if student_topk_ids is not None and student_topk_ids.shape != (*lead, k):
        raise ValueError(
            f"student_topk_ids must have shape {(*lead, k)}, got {tuple(student_topk_ids.shape)}"
        )
    if student_entropy is not None and student_entropy.shape != lead:
        raise ValueError(f"student_entropy must have shape {tuple(lead)}, got {tuple(student_entropy.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")

    n_rows = math.prod(lead)
    n_teacher = teacher_topk_ids.shape[-1]
    device = student_logits.device
    logits = student_logits.detach().reshape(n_rows, vocab)
    teacher_ids = teacher_topk_ids.detach().reshape(n_rows, n_teacher).long()
    teacher_lp = teacher_topk_logprobs.detach().reshape(n_rows, n_teacher).double()
    exact_lp = None
    if teacher_logprobs_at_student_topk is not None:
        exact_lp = teacher_logprobs_at_student_topk.detach().reshape(n_rows, k).double()
    given_topk_ids = None if student_topk_ids is None else student_topk_ids.reshape(n_rows, k).long()
    full_entropy_pass = entropy_mode == "full" and student_entropy is None

    disagreement = torch.empty(n_rows, dtype=torch.float64, device=device)
    compatibility = torch.empty_like(disagreement)
    entropy = torch.empty_like(disagreement)
    block = chunk_size or max(1, _BLOCK_BYTES // (4 * vocab))
    block = max(1, min(block, n_rows))
    log_probs_buffer = torch.empty(block, vocab, dtype=torch.float32, device=device)
    sub_block = max(1, min(block, _SUB_BLOCK_BYTES // (4 * vocab)))
    probs_buffer = None
    if full_entropy_pass:
        probs_buffer = torch.empty(sub_block, vocab, dtype=torch.float32, device=device)

    for start in range(0, n_rows, block):
        rows = slice(start, min(start + block, n_rows))
        x = logits[rows]
        log_probs = log_probs_buffer[: x.shape[0]]
        _log_softmax_into(x, log_probs, sub_block)
        topk_ids = torch.topk(x, k, dim=-1).indices if given_topk_ids is None else given_topk_ids[rows]
        d, c, student_topk_lp = _union_statistics(
            log_probs,
            topk_ids,
            teacher_ids[rows],
            teacher_lp[rows],
            k,
            student_probs,
            student_prob_floor,
            teacher_list,
            None if exact_lp is None else exact_lp[rows],
        )
        disagreement[rows] = d
        compatibility[rows] = c
        if entropy_mode == "topk":
            entropy[rows] = _topk_entropy(student_topk_lp)
        elif full_entropy_pass:
            entropy[rows] = _full_entropy(log_probs, probs_buffer)

    if student_entropy is not None and entropy_mode == "full":
        entropy = student_entropy.detach().reshape(n_rows).to(device=device, dtype=torch.float64)
    return TokenStatistics(disagreement.reshape(lead), compatibility.reshape(lead), entropy.reshape(lead))


def _log_softmax_into(logits: torch.Tensor, out: torch.Tensor, sub_block: int) -> None:
    """float32 log-softmax of a block into `out`; low-precision logits are upcast sub-block by sub-block."""
    if logits.dtype == torch.float32:
        torch.log_softmax(logits, dim=-1, out=out)
        return
    for start in range(0, logits.shape[0], sub_block):
        rows = slice(start, start + sub_block)
        torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32, out=out[rows])


def _union_statistics(
    log_probs: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_lp: torch.Tensor,
    k: int,
    student_probs: str,
    prob_floor: float,
    teacher_list: str,
    exact_lp: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D and C for one block from small `[n, k + k_T]` tensors, in float64; also the student's top-k
    log-probs."""
    neg_inf = float("-inf")
    # T: the teacher's k best entries; absent (-inf) ones that topk picks up stay masked out.
    if teacher_ids.shape[-1] > k:
        t_lp, t_pos = torch.topk(teacher_lp, k, dim=-1)
        t_ids = torch.gather(teacher_ids, -1, t_pos)
    else:
        t_lp, t_ids = teacher_lp, teacher_ids
    if teacher_list == "top_k":
        teacher_ids, teacher_lp = t_ids, t_lp
    teacher_present = teacher_lp > neg_inf
    t_present = t_lp > neg_inf

    # Teacher log-prob at each student id: the list's value wherever the id sits in the list, at any rank.
    matches = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)) & teacher_present.unsqueeze(-2)
    s_teacher_lp = torch.where(matches, teacher_lp.unsqueeze(-2), neg_inf).amax(dim=-1)
    if exact_lp is not None:
        s_teacher_lp = torch.where(matches.any(dim=-1), s_teacher_lp, exact_lp)

    # U = S followed by the entries of T that are not already in S.
    t_only = t_present & ~(t_ids.unsqueeze(-1) == student_ids.unsqueeze(-2)).any(dim=-1)
    s_student_lp = torch.gather(log_probs, -1, student_ids)
    if student_probs == "exact":
        t_student_lp = torch.gather(log_probs, -1, t_ids.clamp(0, log_probs.shape[-1] - 1)).double()
        t_student_lp = t_student_lp.masked_fill(~t_only, neg_inf)
    else:
        t_student_lp = torch.full_like(t_lp, neg_inf)
    in_union = torch.cat([torch.ones_like(student_ids, dtype=torch.bool), t_only], dim=-1)
    u_teacher_lp = torch.cat([s_teacher_lp, t_lp.masked_fill(~t_only, neg_inf)], dim=-1)
    u_student_lp = torch.cat([s_student_lp.double(), t_student_lp], dim=-1)

    teacher_has_mass = u_teacher_lp.amax(dim=-1) > neg_inf
    norm_teacher_lp = u_teacher_lp - torch.logsumexp(u_teacher_lp, dim=-1, keepdim=True)
    norm_student_lp = u_student_lp - torch.logsumexp(u_student_lp, dim=-1, keepdim=True)
    if prob_floor > 0:
        log_floor = math.log(prob_floor)
        counted = in_union
        norm_teacher_lp = norm_teacher_lp.clamp_min(log_floor)
        norm_student_lp = norm_student_lp.clamp_min(log_floor)
    else:
        counted = u_teacher_lp > neg_inf
    terms = norm_teacher_lp.exp() * (norm_teacher_lp - norm_student_lp)
    disagreement = torch.where(counted, terms, 0.0).sum(dim=-1)
    disagreement = torch.where(teacher_has_mass, disagreement, 0.0)
    compatibility = s_teacher_lp.exp().sum(dim=-1).clamp(0.0, 1.0)
    return disagreement, compatibility, s_student_lp


def _topk_entropy(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """The authors' `_entropy` of the student's top-k list in float64: its positive probabilities q
    renormalised, -Σ q log max(q, 1e-12), over log max(n, 2) for n positive entries (0 when k = 1)."""
    probs = topk_log_probs.double().exp()
    positive = probs > 0
    mass = probs.sum(dim=-1, keepdim=True)
    q = probs / mass
    entropy = -torch.where(positive, q * q.clamp_min(_ENTROPY_LOG_FLOOR).log(), 0.0).sum(dim=-1)
    count = positive.sum(dim=-1).clamp_min(2).double()
    return torch.where(mass.squeeze(-1) > 0, entropy / count.log(), 0.0)


def _full_entropy(log_probs: torch.Tensor, probs_buffer: torch.Tensor) -> torch.Tensor:
    """-Σ p log p over the vocabulary, sub-block by sub-block through the small `probs_buffer`.

    Overwrites the block's log-probs (they are spent by then).
    """
    entropy = torch.empty(log_probs.shape[0], dtype=torch.float32, device=log_probs.device)
    step = probs_buffer.shape[0]
    for start in range(0, log_probs.shape[0], step):
        rows = log_probs[start : start + step]
        probs = probs_buffer[: rows.shape[0]]
        torch.exp(rows, out=probs)
        entropy[start : start + step] = -probs.mul_(rows).sum(dim=-1)
    # A -inf logit gives 0 * -inf = NaN; redo only those rows with log-probs clamped so 0 * log 0 = 0.
    bad = torch.isnan(entropy)
    if bool(bad.any()):
        rows = log_probs[bad].clamp_(min=torch.finfo(torch.float32).min)
        entropy[bad] = -(rows.exp() * rows).sum(dim=-1)
    return entropy


def _kth_smallest_pair(values: torch.Tensor, rank: int) -> tuple[float, float]:
    """The rank-th and (rank+1)-th smallest of a 1-D tensor (0-based ranks), in O(n) without sorting."""
    n = values.numel()
    low = values.kthvalue(rank + 1).values
    if rank + 1 >= n:
        return low.item(), low.item()
    # The next order statistic is `low` again if it repeats, else the smallest value above it.
    if int((values <= low).sum()) >= rank + 2:
        return low.item(), low.item()
    return low.item(), values[values > low].min().item()


@torch.no_grad()
def teacher_entries(
    teacher_log_probs: Iterable[tuple[slice, torch.Tensor]],
    student_topk_ids: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything TA-OPD needs from a teacher whose whole distribution is at hand (the colocated teacher):
    the teacher's top-K ids and log-probs ``[N, K]`` (the entries a teacher server returns), its log-probs
    at the student's top-k ids ``[N, k]`` (exact C, Eq. 10, via
    `token_statistics(teacher_logprobs_at_student_topk=...)`) and at the sampled token ``[N]`` (the pg_k1
    advantage).

    ``teacher_log_probs`` gives the teacher's float32 log-probs block by block, ``(rows, [len(rows), V_C])``
    over the ids it shares with the student (`ta_opd_verl.teacher_head`: from its hidden states and output
    layer, or from logits), covering ``[0, N)``; the working memory is one block whatever N. A student id
    the block does not have (the teacher's vocabulary is smaller) gets log-prob -inf."""
    rows = student_topk_ids.shape[0]
    device = student_topk_ids.device
    top_ids = torch.empty(rows, teacher_topk, dtype=torch.long, device=device)
    top_logprobs = torch.empty(rows, teacher_topk, dtype=torch.float32, device=device)
    at_student_topk = torch.empty(student_topk_ids.shape, dtype=torch.float32, device=device)
    at_sampled = torch.empty(rows, dtype=torch.float32, device=device)
    for block, log_probs in teacher_log_probs:
        top_logprobs[block], top_ids[block] = torch.topk(log_probs, teacher_topk, dim=-1)
        at_student_topk[block] = _gather_known(log_probs, student_topk_ids[block])
        at_sampled[block] = _gather_known(log_probs, sampled_ids[block].unsqueeze(-1)).squeeze(-1)
    return top_ids, top_logprobs, at_student_topk, at_sampled


def _gather_known(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_probs`` at ``ids``; -inf (probability 0) for the ids past its last column."""
    known = ids < log_probs.shape[-1]
    gathered = torch.gather(log_probs, -1, ids.clamp(max=log_probs.shape[-1] - 1))
    return gathered.masked_fill(~known, float("-inf"))


def masked_quantiles(values: torch.Tensor, valid: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of `values[valid]` in float64, interpolated linearly between the order statistics around
    q·(n - 1) as x_lo·(1 - f) + x_hi·f (the `torch.quantile` definition, written as the authors'
    `_quantile` writes it, so that both give the same bits).

    Works for any number of valid positions (`torch.quantile` refuses more than 2**24 elements): each
    quantile takes one `kthvalue` selection instead of a sort. Raises ValueError when nothing is valid.
    """
    selected = values.detach()[valid.bool()].double().reshape(-1)
    n = selected.numel()
    if n == 0:
        raise ValueError("masked_quantiles needs at least one valid position")
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile levels must be in [0, 1], got {q}")
        position = q * (n - 1)
        rank = min(int(math.floor(position)), n - 1)
        fraction = position - rank
        low, high = _kth_smallest_pair(selected, rank)
        out.append(low if fraction == 0 else low * (1.0 - fraction) + high * fraction)
    return out


@torch.no_grad()
def batch_normalize(
    values: torch.Tensor,
    valid: torch.Tensor,
    q_low: float = 0.05,
    q_high: float = 0.95,
    *,
    no_spread: str = "half",
) -> torch.Tensor:
    """Batch-robust normalisation (Eq. 11) over the valid positions of the whole batch.

    Returns float64 `clip((z - Q_low) / (Q_high - Q_low + ε), 0, 1)` at valid positions and 0 at the
    others, with quantiles over the valid positions only (linear interpolation, see `masked_quantiles`).
    The spread `Q_high - Q_low` decides the degenerate cases (one valid position, a constant statistic):
    `no_spread="half"` (ours): ε = 1e-12, and at a spread <= 1e-6 every valid position gets 0.5;
    `no_spread="zero"` (the authors' `_normalize`): ε = 0, and below a spread of 1e-12 every position
    gets 0. With no valid position the result is all zeros.
    """
    _check_choice("no_spread", no_spread, NO_SPREAD_RULES)
    if values.shape != valid.shape:
        raise ValueError(f"values {tuple(values.shape)} and valid {tuple(valid.shape)} must have one shape")
    if not 0.0 <= q_low < q_high <= 1.0:
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={q_low}, q_high={q_high}")
    valid = valid.bool()
    out = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    if not bool(valid.any()):
        return out
    low, high = masked_quantiles(values, valid, (q_low, q_high))
    spread = high - low
    if no_spread == "half":
        if spread <= _NO_SPREAD:
            return out.masked_fill_(valid, 0.5)
        denominator = spread + _NORM_EPS
    else:
        if abs(spread) < _AUTHORS_NO_SPREAD:
            return out
        denominator = spread
    normalised = ((values.detach().double() - low) / denominator).clamp_(0.0, 1.0)
    return torch.where(valid, normalised, out)


@dataclass(frozen=True)
class SelectionRules:
    """How a run turns D, C, H into a selection, beyond the selector and the budget ρ.

    The defaults are ours (and the paper's where it says); `ta_opd_verl.config.TAOPDConfig.selection_rules`
    builds them from a run's `ta_opd` block, its preset included.

    min_keep_per_sample: m. After the global budget, each sample with fewer than min(m, its valid
        positions) selected gets its best unselected valid positions (0 in the paper, 1 in the authors'
        code).
    q_low, q_high: quantile levels of the normalisation (Eq. 11), 0 <= q_low < q_high <= 1.
    no_spread: the degenerate-spread rule of `batch_normalize`: `half` (ours) or `zero` (the authors').
    ta_entropy_score: `eq16`: H̃ + s - H̃s with s = D̃·C̃ (the paper's Eq. 16); `normalized_product` (the
        authors' code): H̃ + N - H̃N with N = Norm(D·C), the raw product normalised.
    q3_rule: `fill` (ours): `q3` picks at random inside Q3 and `q3_high_c` by C̃ inside Q3, and both
        fill the rest of the budget from outside Q3; `quadrant_only` (the authors' code): `q3` ranks by
        (1 - H̃)·Norm(D·C) and `q3_high_c` by C̃, inside Q3 only, so at most |Q3 ∩ valid| are kept.
    min_keep_score: what the min-keep top-up ranks by: `selector` (the selector's own score) or
        `ta_entropy` (the `ta_entropy` score, whatever the selector: the authors' code).
    budget_rounding: n from ρ and N_valid: `decimal`: ceil(ρ·N) with ρ the decimal as written, so 0.05
        of 100 positions is exactly 5; `float`: max(1, ceil(N·ρ)) in float64 (the authors' code).
    """

    min_keep_per_sample: int = 0
    q_low: float = 0.05
    q_high: float = 0.95
    no_spread: str = "half"
    ta_entropy_score: str = "eq16"
    q3_rule: str = "fill"
    min_keep_score: str = "selector"
    budget_rounding: str = "decimal"

    def __post_init__(self):
        for name, choices in (
            ("no_spread", NO_SPREAD_RULES),
            ("ta_entropy_score", TA_ENTROPY_SCORES),
            ("q3_rule", Q3_RULES),
            ("min_keep_score", MIN_KEEP_SCORES),
            ("budget_rounding", BUDGET_ROUNDINGS),
        ):
            _check_choice(name, getattr(self, name), choices)
        if self.min_keep_per_sample < 0:
            raise ValueError(f"min_keep_per_sample must be >= 0, got {self.min_keep_per_sample}")
        if not 0.0 <= self.q_low < self.q_high <= 1.0:
            raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={self.q_low}, q_high={self.q_high}")


# Our rules, which the paper preset keeps: `SelectionRules()`.
DEFAULT_RULES = SelectionRules()


def budget_size(ratio: float, n_valid: int, rounding: str = "decimal") -> int:
    """The budget n of Eq. 13 for `n_valid` positions (`SelectionRules.budget_rounding`)."""
    _check_choice("budget_rounding", rounding, BUDGET_ROUNDINGS)
    if rounding == "decimal":
        return math.ceil(Fraction(str(ratio)) * n_valid)
    return max(1, math.ceil(n_valid * float(ratio)))


def _ranked_positions(scores: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Flat t-major indices (t·B + b) of the `pool` positions, best first: higher score (float64), then
    earlier position t, then lower sample index b. NaN ranks like -inf."""
    # Positions enumerated t-major are already in tie-break order, so one stable sort by descending score
    # yields the full (-score, t, b) order.
    flat_index = torch.nonzero(pool.t().reshape(-1)).squeeze(-1)
    flat_scores = scores.detach().double().t().reshape(-1)[flat_index].nan_to_num(nan=float("-inf"))
    return flat_index[torch.sort(flat_scores, descending=True, stable=True).indices]


def _rank_within_sample(sample: torch.Tensor, batch: int) -> torch.Tensor:
    """For a sequence of sample indices, each entry's rank among the earlier entries of its sample."""
    by_sample = torch.sort(sample, stable=True).indices
    counts = torch.bincount(sample, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_sample)
    rank[by_sample] = torch.arange(sample.numel(), device=sample.device) - starts[sample[by_sample]]
    return rank


@torch.no_grad()
def select_budget(
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    *,
    min_keep_per_sample: int = 0,
    candidates: torch.Tensor | None = None,
    top_up_scores: torch.Tensor | None = None,
    budget_rounding: str = "decimal",
) -> torch.Tensor:
    """Keep the top `n` positions of the whole batch (Eq. 13), n from ρ and the valid positions' count.

    Args:
        scores: `[B, T]` scores, higher is kept first (compared in float64); NaN ranks like -inf.
        valid: `[B, T]` mask of the positions that count in the budget and may be selected.
        ratio: the budget ρ in [0, 1].
        min_keep_per_sample: m. After the global budget, each sample with fewer than
            min(m, its valid count) selected positions gets its best unselected valid positions until it
            has that many (0 in the paper, 1 in the authors' code).
        candidates: optional `[B, T]`: only these valid positions compete for the budget, and at most
            all of them are kept (n stays the share of all valid positions). Default: every valid one.
        top_up_scores: optional `[B, T]`: what the min-keep top-up ranks by (default `scores`).
        budget_rounding: `budget_size`'s rule: `decimal` (ρ as written, so 0.05 of 100 is exactly 5) or
            `float` (max(1, ceil(N·ρ)) in float64, the authors' code).

    Ranking order, for the budget and the top-up alike: higher score, then earlier position t, then lower
    sample index b.

    Returns:
        bool `[B, T]` mask; invalid positions are never selected.
    """
    if scores.dim() != 2 or scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    for name, other in (("candidates", candidates), ("top_up_scores", top_up_scores)):
        if other is not None and other.shape != scores.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must have the scores' shape {tuple(scores.shape)}")
    if not 0 <= Fraction(str(ratio)) <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if min_keep_per_sample < 0:
        raise ValueError(f"min_keep_per_sample must be >= 0, got {min_keep_per_sample}")
    batch, length = scores.shape
    valid = valid.bool()
    selected = torch.zeros(batch, length, dtype=torch.bool, device=scores.device)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return selected
    pool = valid if candidates is None else valid & candidates.bool()
    kept = _ranked_positions(scores, pool)[: budget_size(ratio, n_valid, budget_rounding)]
    selected[kept % batch, kept // batch] = True
    if min_keep_per_sample > 0:
        order = _ranked_positions(scores if top_up_scores is None else top_up_scores, valid & ~selected)
        sample = order % batch
        missing = (min_keep_per_sample - selected.sum(dim=1)).clamp_min(0)
        added = order[_rank_within_sample(sample, batch) < missing[sample]]
        selected[added % batch, added // batch] = True
    return selected


def _uniform(valid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else valid.device
    return torch.rand(valid.shape, generator=generator, device=device).to(valid.device)


_Q3_SELECTORS = ("q3", "q3_high_c")


class _Normalised:
    """D̃, C̃, H̃ and Norm(D·C) of one batch over the normalisation population, each computed once."""

    def __init__(self, stats: TokenStatistics, population: torch.Tensor, rules: SelectionRules):
        self.stats, self.population, self.rules = stats, population, rules
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        """`disagreement`, `compatibility`, `entropy`, or `product` (D·C, normalised as one statistic)."""
        if name not in self._cache:
            if name == "product":
                raw = self.stats.disagreement.double() * self.stats.compatibility.double()
            else:
                raw = getattr(self.stats, name)
            rules = self.rules
            self._cache[name] = batch_normalize(
                raw, self.population, rules.q_low, rules.q_high, no_spread=rules.no_spread
            )
        return self._cache[name]

    def in_q3(self) -> torch.Tensor:
        """H̃ < median(H̃) and D̃ >= median(D̃), medians over the population (TIP's Q3)."""
        if not bool(self.population.any()):
            return self.population.clone()
        (h_median,) = masked_quantiles(self["entropy"], self.population, (0.5,))
        (d_median,) = masked_quantiles(self["disagreement"], self.population, (0.5,))
        return self.population & (self["entropy"] < h_median) & (self["disagreement"] >= d_median)


def _score(
    name: str,
    norm: _Normalised,
    valid: torch.Tensor,
    rules: SelectionRules,
    generator: torch.Generator | None,
) -> torch.Tensor:
    h, d, c = norm["entropy"], norm["disagreement"], norm["compatibility"]
    if name == "teachability":
        score = d * c
    elif name == "raw_kl":
        score = d
    elif name == "entropy":
        score = h
    elif name == "tip":
        score = h + d - h * d
    elif name == "ta_entropy":
        s = norm["product"] if rules.ta_entropy_score == "normalized_product" else d * c
        score = h + s - h * s
    elif name == "c_only":
        score = c
    elif name == "d_incompat":
        score = d * (1.0 - c)
    elif name == "random":
        score = _uniform(valid, generator).double()
    elif name == "q3":
        if rules.q3_rule == "quadrant_only":
            score = (1.0 - h) * norm["product"]
        else:
            score = _uniform(valid, generator).double() + norm.in_q3().double()
    elif name == "q3_high_c":
        score = c if rules.q3_rule == "quadrant_only" else torch.where(norm.in_q3(), 1.0 + c, 0.0)
    else:  # full
        score = torch.ones(valid.shape, dtype=torch.float64, device=valid.device)
    return torch.where(valid, score, 0.0)


@torch.no_grad()
def selector_scores(
    name: str,
    stats: TokenStatistics,
    valid: torch.Tensor,
    *,
    rules: SelectionRules = DEFAULT_RULES,
    generator: torch.Generator | None = None,
    population: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float64 score a selector ranks by, from batch-normalised statistics (0 at invalid positions).

    With D̃, C̃, H̃ = `batch_normalize` of D, C, H over `population` (default: `valid`; the authors' code
    normalises over every response position, loss-masked ones included), s = D̃·C̃, N = Norm(D·C):
    `teachability` s (Eq. 12); `raw_kl` D̃; `entropy` H̃; `tip` H̃ + D̃ - H̃D̃; `ta_entropy` H̃ + s - H̃s
    (Eq. 16; with `rules.ta_entropy_score="normalized_product"` N in place of s); `c_only` C̃;
    `d_incompat` D̃(1 - C̃); `random` u; `full` 1 (every position ties: `select_positions` keeps them all).
    `q3` and `q3_high_c` with `rules.q3_rule="fill"`: 1 + u on Q3 and u elsewhere (Q3 fills first in
    random order), 1 + C̃ on Q3 and 0 elsewhere; with `"quadrant_only"`: (1 - H̃)·N and C̃, which
    `select_positions` ranks inside Q3 only. u is uniform in [0, 1) drawn from `generator`. Q3 is
    H̃ < median(H̃) and D̃ >= median(D̃), medians over the population (`masked_quantiles` at 0.5).
    """
    _check_choice("selector", name, SELECTORS)
    valid = valid.bool()
    if valid.shape != stats.disagreement.shape:
        raise ValueError(
            f"valid {tuple(valid.shape)} must match the statistics {tuple(stats.disagreement.shape)}"
        )
    norm = _Normalised(stats, valid if population is None else population.bool(), rules)
    return _score(name, norm, valid, rules, generator)


@torch.no_grad()
def select_from_scores(
    name: str,
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    *,
    rules: SelectionRules = DEFAULT_RULES,
    in_q3: torch.Tensor | None = None,
    ta_entropy_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool `[B, T]` mask of the positions selector `name` keeps at budget `ratio`, from its `scores`
    (`selector_scores`) under `rules`: `full`, or a ratio of 1, keeps every valid position; with
    `rules.q3_rule="quadrant_only"` the Q3 selectors choose among `in_q3` only; with
    `rules.min_keep_score="ta_entropy"` the min-keep top-up ranks by `ta_entropy_scores`. Either is
    needed only when its rule applies."""
    _check_choice("selector", name, SELECTORS)
    valid = valid.bool()
    if name == "full" or ratio >= 1:
        return valid.clone()
    candidates = None
    if rules.q3_rule == "quadrant_only" and name in _Q3_SELECTORS:
        if in_q3 is None:
            raise ValueError(f"selector {name!r} with q3_rule='quadrant_only' needs in_q3")
        candidates = in_q3
    top_up = None
    if rules.min_keep_per_sample > 0 and rules.min_keep_score == "ta_entropy":
        if ta_entropy_scores is None:
            raise ValueError(
                "min_keep_score='ta_entropy' with min_keep_per_sample > 0 needs ta_entropy_scores"
            )
        top_up = ta_entropy_scores
    return select_budget(
        scores,
        valid,
        ratio,
        min_keep_per_sample=rules.min_keep_per_sample,
        candidates=candidates,
        top_up_scores=top_up,
        budget_rounding=rules.budget_rounding,
    )


@torch.no_grad()
def select_positions(
    name: str,
    stats: TokenStatistics,
    valid: torch.Tensor,
    ratio: float,
    *,
    rules: SelectionRules = DEFAULT_RULES,
    generator: torch.Generator | None = None,
    population: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool `[B, T]` mask of the positions selector `name` keeps at budget `ratio` under `rules`.

    Normalises over `population` (Eq. 11; default `valid`, which it must contain), scores
    (`selector_scores`) and selects (`select_from_scores`, Eq. 13). `full` keeps every valid position
    whatever the ratio.
    """
    _check_choice("selector", name, SELECTORS)
    valid = valid.bool()
    if name == "full" or ratio >= 1:
        return valid.clone()
    norm = _Normalised(stats, valid if population is None else population.bool(), rules)
    scores = _score(name, norm, valid, rules, generator)
    in_q3 = norm.in_q3() if name in _Q3_SELECTORS and rules.q3_rule == "quadrant_only" else None
    top_up = None
    if rules.min_keep_per_sample > 0 and rules.min_keep_score == "ta_entropy":
        top_up = _score("ta_entropy", norm, valid, rules, None)
    return select_from_scores(name, scores, valid, ratio, rules=rules, in_q3=in_q3, ta_entropy_scores=top_up)
