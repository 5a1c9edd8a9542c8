"""Token teachability: per-position statistics, batch normalisation and budgeted selection.

Pure tensor math for TA-OPD (arXiv 2605.26844), importing torch and the standard library only, so it is
testable and reusable without verl. Equation numbers are the paper's.

- `token_statistics` computes, per position, the local disagreement D (Eq. 9, a forward KL on the union
  of the student's and the teacher's top-k), the compatibility C (Eq. 10, or its lower bound Eq. 17) and
  the student entropy H (Eq. 14).
- `batch_normalize` is the batch-robust quantile normalisation of Eq. 11.
- `selector_scores` turns normalised statistics into the score a selector ranks by (Eq. 12, 14-16).
- `select_budget` keeps the top `ceil(ratio * N_valid)` positions of the whole batch (Eq. 13).
- `select_positions` chains the three for one selector name.

Nothing here needs gradients: every function runs under `torch.no_grad()` and returns detached tensors.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch

__all__ = [
    "ENTROPY_MODES",
    "SELECTORS",
    "STUDENT_PROBS",
    "TokenStatistics",
    "batch_normalize",
    "masked_quantiles",
    "select_budget",
    "select_positions",
    "selector_scores",
    "teacher_entries",
    "token_statistics",
]

STUDENT_PROBS = ("exact", "topk_only")
ENTROPY_MODES = ("full", "topk")
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

# Probability floor inside the log of D's student term (the authors' clamp).
_STUDENT_PROB_FLOOR = 1e-12
# Eq. 11's epsilon, and the spread below which a statistic counts as constant.
_NORM_EPS = 1e-12
_NO_SPREAD = 1e-6
# Rows per block when `chunk_size` is not given: about 256 MiB of float32 log-probs. A reused block buffer
# beats one [N, V] log-softmax on CPU (no page faults per call); much smaller blocks lose again to the
# per-operation thread synchronisation (measured on 2 cores, see docs/benchmarks.md).
_BLOCK_BYTES = 256 * 2**20
# Smaller temporaries (the entropy pass's probabilities, float32 copies of low-precision logits) are
# made sub-block by sub-block, about 32 MiB each.
_SUB_BLOCK_BYTES = 32 * 2**20


class TokenStatistics(NamedTuple):
    """Per-position statistics, each a float32 tensor of the inputs' leading shape.

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
    teacher_logprobs_at_student_topk: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
    entropy_mode: str = "full",
    chunk_size: int | None = None,
    student_topk_ids: torch.Tensor | None = None,
) -> TokenStatistics:
    """Disagreement D, compatibility C and entropy H at every position (Eq. 8-10, 14, 17).

    Args:
        student_logits: `[..., V]` logits of any float dtype; the math runs in float32.
        teacher_topk_ids: `[..., Kt]` token ids of the teacher's entries, in any order. Present ids are
            assumed distinct within a position.
        teacher_topk_logprobs: `[..., Kt]` the teacher's log-probabilities of those ids; `-inf` marks an
            absent entry (its id is ignored). `Kt` may be smaller or larger than `k`.
        k: support size. S = the student's top-k ids (`torch.topk(student_logits, k)`, so ties follow
            torch's order); T = the teacher's k highest present entries (all present ones when Kt <= k);
            U = S ∪ T, each id counted once.
        student_probs: `"exact"` (paper) uses the true student softmax on all of U; `"topk_only"` (the
            authors' training code) gives ids outside S probability 0, floored at 1e-12 inside D's log.
        teacher_logprobs_at_student_topk: optional `[..., k]` teacher log-probs at S, ordered like
            `torch.topk(student_logits, k)`. A student id that appears anywhere in the teacher list
            takes the list's value; the others take this tensor's value. Without it they get teacher
            probability 0, which makes C the lower bound of Eq. 17 and biases D wherever the teacher
            has mass on S outside its list (that mass is missing from p_T and from U's normaliser).
        student_entropy: optional `[...]` full-vocabulary entropy already computed (verl's forward does
            it); returned as given, in float32, which skips the entropy pass. Unused with
            `entropy_mode="topk"`.
        entropy_mode: `"full"` (paper) is the full-vocabulary entropy; `"topk"` (the authors' code) is
            the entropy of the student's top-k probabilities renormalised, divided by log k (0 for k=1).
        student_topk_ids: optional `[..., k]` S as `torch.topk(student_logits, k).indices` gives it, when
            the caller already has it (the fsdp teacher needs S before scoring); skips the top-k pass.
        chunk_size: rows (positions) per block. Results do not depend on it. The working memory is one
            `[chunk_size, V]` float32 log-prob buffer (never more than one `[N, V]`), plus a buffer of
            about 32 MiB for the entropy pass. Default: blocks of about 256 MiB.

    Returns:
        TokenStatistics of float32 tensors with the leading shape. With p̄ = p / Σ_U p,
        D = Σ_{v∈U, p̄_T(v)>0} p̄_T(v) (log p̄_T(v) - log max(p̄_S(v), 1e-12)) (0 when the teacher has no
        known mass on U), and C = Σ_{v∈S} p_T(v) clipped to [0, 1].
    """
    _check_choice("student_probs", student_probs, STUDENT_PROBS)
    _check_choice("entropy_mode", entropy_mode, ENTROPY_MODES)
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
    teacher_lp = teacher_topk_logprobs.detach().reshape(n_rows, n_teacher).float()
    exact_lp = None
    if teacher_logprobs_at_student_topk is not None:
        exact_lp = teacher_logprobs_at_student_topk.detach().reshape(n_rows, k).float()
    given_topk_ids = None if student_topk_ids is None else student_topk_ids.reshape(n_rows, k).long()
    full_entropy_pass = entropy_mode == "full" and student_entropy is None

    disagreement = torch.empty(n_rows, dtype=torch.float32, device=device)
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
            None if exact_lp is None else exact_lp[rows],
        )
        disagreement[rows] = d
        compatibility[rows] = c
        if entropy_mode == "topk":
            entropy[rows] = _topk_entropy(student_topk_lp, k)
        elif full_entropy_pass:
            entropy[rows] = _full_entropy(log_probs, probs_buffer)

    if student_entropy is not None and entropy_mode == "full":
        entropy = student_entropy.detach().reshape(n_rows).to(device=device, dtype=torch.float32)
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
    exact_lp: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D and C for one block from small `[n, k + k_T]` tensors; also the student's top-k log-probs."""
    neg_inf = float("-inf")
    teacher_present = teacher_lp > neg_inf
    # T: the teacher's k best entries; absent (-inf) ones that topk picks up stay masked out.
    if teacher_ids.shape[-1] > k:
        t_lp, t_pos = torch.topk(teacher_lp, k, dim=-1)
        t_ids = torch.gather(teacher_ids, -1, t_pos)
    else:
        t_lp, t_ids = teacher_lp, teacher_ids
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
        t_student_lp = torch.gather(log_probs, -1, t_ids.clamp(0, log_probs.shape[-1] - 1))
        t_student_lp = t_student_lp.masked_fill(~t_only, neg_inf)
    else:
        t_student_lp = torch.full_like(t_lp, neg_inf)
    u_teacher_lp = torch.cat([s_teacher_lp, t_lp.masked_fill(~t_only, neg_inf)], dim=-1)
    u_student_lp = torch.cat([s_student_lp, t_student_lp], dim=-1)

    teacher_known = u_teacher_lp > neg_inf
    norm_teacher_lp = u_teacher_lp - torch.logsumexp(u_teacher_lp, dim=-1, keepdim=True)
    norm_student_lp = u_student_lp - torch.logsumexp(u_student_lp, dim=-1, keepdim=True)
    floored_student_lp = norm_student_lp.clamp_min(math.log(_STUDENT_PROB_FLOOR))
    terms = norm_teacher_lp.exp() * (norm_teacher_lp - floored_student_lp)
    disagreement = torch.where(teacher_known, terms, 0.0).sum(dim=-1)
    compatibility = s_teacher_lp.exp().sum(dim=-1).clamp(0.0, 1.0)
    return disagreement, compatibility, s_student_lp


def _topk_entropy(topk_log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the top-k probabilities renormalised, over log k (the authors' code); 0 when k = 1."""
    if k == 1:
        return torch.zeros(topk_log_probs.shape[:-1], dtype=torch.float32, device=topk_log_probs.device)
    renormalised = torch.log_softmax(topk_log_probs, dim=-1)
    return -(renormalised.exp() * renormalised).sum(dim=-1) / math.log(k)


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
    teacher_logits: torch.Tensor,
    student_topk_ids: torch.Tensor,
    sampled_ids: torch.Tensor,
    teacher_topk: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything TA-OPD needs from a teacher that sees its full logits (the colocated-teacher design):
    from ``[N, V]`` teacher logits, the teacher's top-K ids and log-probs ``[N, K]`` (the entries a teacher
    server returns), its log-probs at the student's top-k ids ``[N, k]`` (exact C, Eq. 10, via
    `token_statistics(teacher_logprobs_at_student_topk=...)`) and at the sampled token ``[N]`` (the pg_k1
    advantage). float32 log-softmax, ``chunk_rows`` rows at a time, so the working memory stays one
    ``[chunk_rows, V]`` float32 block whatever N."""
    rows = teacher_logits.shape[0]
    device = teacher_logits.device
    top_ids = torch.empty(rows, teacher_topk, dtype=torch.long, device=device)
    top_logprobs = torch.empty(rows, teacher_topk, dtype=torch.float32, device=device)
    at_student_topk = torch.empty(student_topk_ids.shape, dtype=torch.float32, device=device)
    at_sampled = torch.empty(rows, dtype=torch.float32, device=device)
    for start in range(0, rows, chunk_rows):
        block = slice(start, start + chunk_rows)
        log_probs = torch.log_softmax(teacher_logits[block], dim=-1, dtype=torch.float32)
        top_logprobs[block], top_ids[block] = torch.topk(log_probs, teacher_topk, dim=-1)
        at_student_topk[block] = torch.gather(log_probs, -1, student_topk_ids[block])
        at_sampled[block] = torch.gather(log_probs, -1, sampled_ids[block].unsqueeze(-1)).squeeze(-1)
    return top_ids, top_logprobs, at_student_topk, at_sampled


def masked_quantiles(values: torch.Tensor, valid: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of `values[valid]` with linear interpolation (the `torch.quantile` definition).

    Works for any number of valid positions (`torch.quantile` refuses more than 2**24 elements): each
    quantile takes one `kthvalue` selection instead of a sort. Raises ValueError when nothing is valid.
    """
    selected = values.detach()[valid.bool()].float().reshape(-1)
    n = selected.numel()
    if n == 0:
        raise ValueError("masked_quantiles needs at least one valid position")
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile levels must be in [0, 1], got {q}")
        position = q * (n - 1)
        rank = min(int(math.floor(position)), n - 1)
        low, high = _kth_smallest_pair(selected, rank)
        out.append(low + (position - rank) * (high - low))
    return out


@torch.no_grad()
def batch_normalize(
    values: torch.Tensor, valid: torch.Tensor, q_low: float = 0.05, q_high: float = 0.95
) -> torch.Tensor:
    """Batch-robust normalisation (Eq. 11) over the valid positions of the whole batch.

    Returns float32 `clip((z - Q_low) / (Q_high - Q_low + 1e-12), 0, 1)` at valid positions and 0 at the
    others, with quantiles over the valid positions only (linear interpolation, see `masked_quantiles`).
    When `Q_high - Q_low <= 1e-6` (one valid position, a constant statistic) every valid position gets
    0.5; with no valid position the result is all zeros.
    """
    if values.shape != valid.shape:
        raise ValueError(f"values {tuple(values.shape)} and valid {tuple(valid.shape)} must have one shape")
    if not 0.0 <= q_low < q_high <= 1.0:
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={q_low}, q_high={q_high}")
    valid = valid.bool()
    out = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    if not bool(valid.any()):
        return out
    low, high = masked_quantiles(values, valid, (q_low, q_high))
    spread = high - low
    if spread <= _NO_SPREAD:
        return out.masked_fill_(valid, 0.5)
    # float64 keeps narrow spreads exact to float32 output precision; the quantiles are float64 already.
    normalised = ((values.detach().double() - low) / (spread + _NORM_EPS)).clamp_(0.0, 1.0)
    return torch.where(valid, normalised.float(), out)


@torch.no_grad()
def select_budget(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, *, min_keep_per_sample: int = 0
) -> torch.Tensor:
    """Keep the top `n = ceil(ratio * N_valid)` valid positions of the whole batch (Eq. 13).

    Args:
        scores: `[B, T]` scores, higher is kept first; NaN ranks like -inf.
        valid: `[B, T]` mask of the positions that may be selected (response tokens).
        ratio: the budget ρ in [0, 1], taken as the decimal it was written (`Fraction(str(ratio))`),
            so 0.05 of 100 positions is exactly 5.
        min_keep_per_sample: m. After the global budget, each sample with fewer than
            min(m, its valid count) selected positions gets its best unselected valid positions until it
            has that many (0 in the paper, 1 in the authors' code).

    Ranking order: higher score, then earlier position t, then lower sample index b.

    Returns:
        bool `[B, T]` mask; invalid positions are never selected.
    """
    if scores.dim() != 2 or scores.shape != valid.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    budget_fraction = Fraction(str(ratio))
    if not 0 <= budget_fraction <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if min_keep_per_sample < 0:
        raise ValueError(f"min_keep_per_sample must be >= 0, got {min_keep_per_sample}")
    batch, length = scores.shape
    valid = valid.bool()
    # Positions enumerated t-major (t, then b) are already in tie-break order, so one stable sort by
    # descending score yields the full (-score, t, b) order.
    flat_valid = valid.t().reshape(-1)
    flat_index = torch.nonzero(flat_valid).squeeze(-1)
    n_valid = flat_index.numel()
    selected = torch.zeros(batch, length, dtype=torch.bool, device=scores.device)
    if n_valid == 0:
        return selected
    flat_scores = scores.detach().float().t().reshape(-1)[flat_index].nan_to_num(nan=float("-inf"))
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    ranked = flat_index[order]
    n_keep = math.ceil(budget_fraction * n_valid)
    keep = torch.arange(n_valid, device=scores.device) < n_keep
    if min_keep_per_sample > 0:
        # A sample's selected positions are a prefix of its own ranking, so the top-up keeps
        # exactly its first max(selected, m) positions: those ranking < m within the sample.
        sample = ranked % batch
        by_sample = torch.sort(sample, stable=True).indices
        counts = torch.bincount(sample, minlength=batch)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_sample = torch.empty_like(by_sample)
        rank_in_sample[by_sample] = torch.arange(n_valid, device=scores.device) - starts[sample[by_sample]]
        keep |= rank_in_sample < min_keep_per_sample
    kept = ranked[keep]
    selected[kept % batch, kept // batch] = True
    return selected


def _uniform(valid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else valid.device
    return torch.rand(valid.shape, generator=generator, device=device).to(valid.device)


@torch.no_grad()
def selector_scores(
    name: str,
    stats: TokenStatistics,
    valid: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    q_low: float = 0.05,
    q_high: float = 0.95,
) -> torch.Tensor:
    """The float32 score a selector ranks by, from batch-normalised statistics (0 at invalid positions).

    With D̃, C̃, H̃ = `batch_normalize` of D, C, H over `valid`, and s = D̃·C̃:
    `teachability` s (Eq. 12); `raw_kl` D̃; `entropy` H̃; `tip` H̃ + D̃ - H̃D̃; `ta_entropy` H̃ + s - H̃s;
    `c_only` C̃; `d_incompat` D̃(1 - C̃); `random` u; `q3` 1 + u on Q3 and u elsewhere, so Q3 fills
    first in random order; `q3_high_c` 1 + C̃ on Q3 and 0 elsewhere; `full` 1 (every position ties:
    `select_positions` keeps them all). u is uniform in [0, 1) drawn from `generator`. Q3 is
    H̃ < median(H̃) and D̃ >= median(D̃), medians over the valid positions (`masked_quantiles` at 0.5).
    """
    _check_choice("selector", name, SELECTORS)
    valid = valid.bool()
    if valid.shape != stats.disagreement.shape:
        raise ValueError(
            f"valid {tuple(valid.shape)} must match the statistics {tuple(stats.disagreement.shape)}"
        )
    cache: dict[str, torch.Tensor] = {}

    def norm(field: str) -> torch.Tensor:
        if field not in cache:
            cache[field] = batch_normalize(getattr(stats, field), valid, q_low, q_high)
        return cache[field]

    def in_q3() -> torch.Tensor:
        if not bool(valid.any()):
            return valid.clone()
        (h_median,) = masked_quantiles(norm("entropy"), valid, (0.5,))
        (d_median,) = masked_quantiles(norm("disagreement"), valid, (0.5,))
        return valid & (norm("entropy") < h_median) & (norm("disagreement") >= d_median)

    if name == "teachability":
        score = norm("disagreement") * norm("compatibility")
    elif name == "raw_kl":
        score = norm("disagreement")
    elif name == "entropy":
        score = norm("entropy")
    elif name == "tip":
        h, d = norm("entropy"), norm("disagreement")
        score = h + d - h * d
    elif name == "ta_entropy":
        h, s = norm("entropy"), norm("disagreement") * norm("compatibility")
        score = h + s - h * s
    elif name == "c_only":
        score = norm("compatibility")
    elif name == "d_incompat":
        score = norm("disagreement") * (1.0 - norm("compatibility"))
    elif name == "random":
        score = _uniform(valid, generator)
    elif name == "q3":
        score = _uniform(valid, generator) + in_q3().float()
    elif name == "q3_high_c":
        score = torch.where(in_q3(), 1.0 + norm("compatibility"), 0.0)
    else:  # full
        score = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, score.float(), 0.0)


@torch.no_grad()
def select_positions(
    name: str,
    stats: TokenStatistics,
    valid: torch.Tensor,
    ratio: float,
    *,
    min_keep_per_sample: int = 0,
    generator: torch.Generator | None = None,
    q_low: float = 0.05,
    q_high: float = 0.95,
) -> torch.Tensor:
    """Bool `[B, T]` mask of the positions selector `name` keeps at budget `ratio`.

    Normalises (Eq. 11), scores (`selector_scores`) and selects (`select_budget`, Eq. 13). `full` keeps
    every valid position whatever the ratio.
    """
    _check_choice("selector", name, SELECTORS)
    if name == "full":
        return valid.bool().clone()
    scores = selector_scores(name, stats, valid, generator=generator, q_low=q_low, q_high=q_high)
    return select_budget(scores, valid, ratio, min_keep_per_sample=min_keep_per_sample)
