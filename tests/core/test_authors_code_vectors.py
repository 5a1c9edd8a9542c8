"""The presets against the golden vectors of the authors' code (``../shared/reference``, rules 1-14 of its
README): ``authors_code`` reproduces their statistics, normalisations, scores and all 1,296 selection
masks; ``paper`` matches the paper's equations, written here in float64, on the same inputs.

The masks are checked twice, as the README advises. From the stored float64 scores, our selection must give
every mask bit for bit (the rules: budget, ties, Q3, min-keep). From our own statistics, a mask may differ
only where the selection on a 1e-9 grid agrees: our float64 scores equal theirs far below that grid, and
near-ties at the budget boundary (a clipped score that is 1.0 in one summation order and 1 - 2^-53 in
another) are decided by bits that torch's exp/log and summation order do not reproduce."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from golden import golden_case, golden_vectors

from ta_opd_verl.batch_selection import select_rollout_batch
from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.teachability import (
    TokenStatistics,
    batch_normalize,
    budget_size,
    masked_quantiles,
    select_from_scores,
    selector_scores,
    token_statistics,
)

CASES = range(24)
RATIOS = ("0.05", "0.1", "0.3")
# The authors' `--opd-budget-mask` names -> ours (the README's "Selectors"); `random` is not in the vectors.
SELECTORS = {
    "teachability": "teachability",
    "divergence": "raw_kl",
    "entropy": "entropy",
    "tip": "tip",
    "compatibility": "c_only",
    "dincompat_high": "d_incompat",
    "ca_softor": "ta_entropy",
    "q3": "q3",
    "q3_highc": "q3_high_c",
}
# Statistics: float64 from the same float32 lists, equal up to rounding. Scores: the normalisation divides
# by the quantile spread, which magnifies that rounding on flat cases; still far inside the 1e-6.
STATISTICS_TOLERANCE = 1e-11
SCORE_TOLERANCE = 1e-9
GRID = 1e-9


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    return golden_vectors()


def _authors(case, min_keep: int | None = None) -> TAOPDConfig:
    extra = {} if min_keep is None else {"min_keep_per_sample": min_keep}
    return TAOPDConfig(preset="authors_code", k=int(case["K"]), **extra)


def _statistics(case, settings: TAOPDConfig, **extra) -> TokenStatistics:
    """Our scoring from the case's inputs: the student's logits and the two top-K lists the authors got."""
    return token_statistics(
        case["student_logits"],
        case["teacher_topk_ids"].long(),
        case["teacher_topk_logprobs"],
        **settings.scoring_options(),
        student_topk_ids=case["student_topk_ids"].long(),
        **extra,
    )


def _population(case, settings: TAOPDConfig) -> torch.Tensor:
    assert settings.normalize_over == "response"
    return case["response_mask"]


@pytest.mark.parametrize("index", CASES)
def test_statistics_match_the_authors(vectors, index):
    case = golden_case(vectors, index)
    stats = _statistics(case, _authors(case))
    response = case["response_mask"]
    for got, name in zip(stats, ("D", "C", "H"), strict=True):
        want = case[f"out/{name}"]
        torch.testing.assert_close(got[response], want[response], atol=STATISTICS_TOLERANCE, rtol=0, msg=name)


@pytest.mark.parametrize("index", CASES)
def test_normalisations_quadrant_and_budget_match_the_authors(vectors, index):
    case = golden_case(vectors, index)
    settings = _authors(case)
    rules = settings.selection_rules()
    stats = _statistics(case, settings)
    valid, population = case["loss_mask"], _population(case, settings)
    product = stats.disagreement * stats.compatibility
    for raw, name in (
        (stats.disagreement, "D"),
        (stats.compatibility, "C"),
        (stats.entropy, "H"),
        (product, "DC"),
    ):
        bounds = masked_quantiles(raw, population, (rules.q_low, rules.q_high))
        assert bounds == pytest.approx(case[f"out/norm_bounds/{name}"].tolist(), abs=STATISTICS_TOLERANCE)
        got = batch_normalize(raw, population, rules.q_low, rules.q_high, no_spread=rules.no_spread)
        torch.testing.assert_close(got, case[f"out/{name}_norm"], atol=SCORE_TOLERANCE, rtol=0, msg=name)
        if (index, name) in ((23, "D"), (9, "C")):  # no spread: every position exactly 0 (rule 5)
            assert torch.equal(got, torch.zeros_like(got))
    # Q3 (rule 7), read through the `fill` rule, whose q3_high_c scores 1 + C̃ exactly on Q3.
    fill = dataclasses.replace(rules, q3_rule="fill")
    in_q3 = selector_scores("q3_high_c", stats, valid, rules=fill, population=population) >= 1.0
    assert torch.equal(in_q3, valid & (case["out/quadrant"] == 3))
    n_valid = int(valid.sum())
    assert n_valid == int(case["out/n_valid"])
    assert [budget_size(float(r), n_valid, rules.budget_rounding) for r in RATIOS] == case[
        "out/budget_n"
    ].tolist()


@pytest.mark.parametrize("index", CASES)
def test_scores_match_the_authors(vectors, index):
    case = golden_case(vectors, index)
    settings = _authors(case)
    stats = _statistics(case, settings)
    valid, population = case["loss_mask"], _population(case, settings)
    for theirs, ours in SELECTORS.items():
        got = selector_scores(ours, stats, valid, rules=settings.selection_rules(), population=population)
        want = torch.where(valid, case[f"out/{theirs}/score"], 0.0)
        torch.testing.assert_close(got, want, atol=SCORE_TOLERANCE, rtol=0, msg=theirs)


def _mask_cases():
    return [(theirs, ratio, min_keep) for theirs in SELECTORS for ratio in RATIOS for min_keep in (0, 1)]


@pytest.mark.parametrize("index", CASES)
def test_every_mask_from_the_stored_scores(vectors, index):
    """Rules 8-11 alone: the authors' own float64 scores in, their masks out, bit for bit."""
    case = golden_case(vectors, index)
    valid, in_q3 = case["loss_mask"], case["out/quadrant"] == 3
    for theirs, ratio, min_keep in _mask_cases():
        got = select_from_scores(
            SELECTORS[theirs],
            case[f"out/{theirs}/score"],
            valid,
            float(ratio),
            rules=_authors(case, min_keep).selection_rules(),
            in_q3=in_q3,
            ta_entropy_scores=case["out/ca_softor_score"],
        )
        assert torch.equal(got, case[f"out/{theirs}/r{ratio}/mk{min_keep}/mask"]), (theirs, ratio, min_keep)


def _selection_on_grid(name, scores, top_up, valid, ratio, rules, in_q3) -> torch.Tensor:
    """The selection with every score rounded to a multiple of 1e-9: near-ties become ties, which the
    position-then-sample rule breaks the same way for both score sets."""

    def on_grid(values: torch.Tensor) -> torch.Tensor:
        return torch.round(values / GRID) * GRID

    return select_from_scores(
        name, on_grid(scores), valid, ratio, rules=rules, in_q3=in_q3, ta_entropy_scores=on_grid(top_up)
    )


@pytest.mark.parametrize("index", CASES)
def test_every_mask_end_to_end_up_to_near_ties(vectors, index):
    """Our statistics through the driver's selection (stable sample ids in batch order): each mask equals
    theirs, or differs only where both selections agree once every score sits on a 1e-9 grid."""
    case = golden_case(vectors, index)
    valid, in_q3 = case["loss_mask"], case["out/quadrant"] == 3
    sample_ids = [f"{row:04d}" for row in range(valid.shape[0])]
    stats = _statistics(case, _authors(case))
    for theirs, ratio, min_keep in _mask_cases():
        name, settings = SELECTORS[theirs], _authors(case, min_keep)
        rules = settings.selection_rules()
        population = _population(case, settings)
        got, _ = select_rollout_batch(
            stats,
            valid,
            sample_ids,
            selector=name,
            ratio=float(ratio),
            rules=rules,
            seed=0,
            global_step=0,
            population=population,
        )
        want = case[f"out/{theirs}/r{ratio}/mk{min_keep}/mask"]
        if torch.equal(got, want):
            continue
        # The rules give their mask from their scores; our scores select as theirs do up to near-ties.
        stored = select_from_scores(
            name,
            case[f"out/{theirs}/score"],
            valid,
            float(ratio),
            rules=rules,
            in_q3=in_q3,
            ta_entropy_scores=case["out/ca_softor_score"],
        )
        assert torch.equal(stored, want), (theirs, ratio, min_keep)
        ours = {
            key: selector_scores(key, stats, valid, rules=rules, population=population)
            for key in (name, "ta_entropy")
        }
        near_ties = (
            _selection_on_grid(name, ours[name], ours["ta_entropy"], valid, float(ratio), rules, in_q3),
            _selection_on_grid(
                name,
                case[f"out/{theirs}/score"],
                case["out/ca_softor_score"],
                valid,
                float(ratio),
                rules,
                in_q3,
            ),
        )
        assert torch.equal(*near_ties), (theirs, ratio, min_keep)


# ---- the paper preset: Eqs. 9-14 in float64 ----


def _paper_statistics(case) -> tuple[TokenStatistics, TAOPDConfig]:
    """The paper preset as the colocated teacher runs it (exact C from the teacher's log-probs at S)."""
    settings = TAOPDConfig(preset="paper", k=int(case["K"]), teacher="fsdp", teacher_path="/teacher")
    assert (settings.compatibility, settings.student_prob_floor) == ("exact", 0.0)
    teacher_log_probs = torch.log_softmax(case["teacher_logits"], dim=-1)
    exact = teacher_log_probs.gather(-1, case["student_topk_ids"].long())
    return _statistics(case, settings, teacher_logprobs_at_student_topk=exact), settings


def _equations(case) -> TokenStatistics:
    """Eq. 9 (forward KL of the renormalised teacher from the renormalised student on U = S ∪ T, true
    probabilities), Eq. 10 (the teacher's mass on S) and Eq. 14 (full-vocabulary entropy), float64."""
    student = torch.log_softmax(case["student_logits"].double(), dim=-1)
    teacher = torch.log_softmax(case["teacher_logits"].double(), dim=-1)
    union = torch.zeros_like(student, dtype=torch.bool)
    union.scatter_(-1, case["student_topk_ids"].long(), True)
    union.scatter_(-1, case["teacher_topk_ids"].long(), True)
    on_union_s = student.masked_fill(~union, -math.inf)
    on_union_t = teacher.masked_fill(~union, -math.inf)
    renormalised_s = on_union_s - torch.logsumexp(on_union_s, dim=-1, keepdim=True)
    renormalised_t = on_union_t - torch.logsumexp(on_union_t, dim=-1, keepdim=True)
    disagreement = torch.where(union, renormalised_t.exp() * (renormalised_t - renormalised_s), 0.0).sum(-1)
    compatibility = teacher.gather(-1, case["student_topk_ids"].long()).exp().sum(-1)
    entropy = -(student.exp() * student).sum(-1)
    return TokenStatistics(disagreement, compatibility, entropy)


@pytest.mark.parametrize("index", CASES)
def test_paper_preset_statistics_are_the_equations(vectors, index):
    case = golden_case(vectors, index)
    stats, _ = _paper_statistics(case)
    expected = _equations(case)
    response = case["response_mask"]
    # The inputs are float32 log-probs: about 1e-7 relative, whatever the logits' peak.
    for got, want, name in zip(stats, expected, ("D", "C", "H"), strict=True):
        torch.testing.assert_close(got[response], want[response], atol=1e-6, rtol=1e-6, msg=name)


def test_the_floor_caps_d_below_eq_9_on_peaked_logits(vectors):
    """What the paper preset changes: without the floor, D is Eq. 9 where the teacher's top tokens are far
    below e^-27.6 under the student; the default 1e-12 floor caps it there by many nats."""
    case = golden_case(vectors, 22)  # "mixed": per-position scales up to peaked
    paper, _ = _paper_statistics(case)
    default = TAOPDConfig(k=int(case["K"]))  # no preset: the 1e-12 floor
    exact = torch.log_softmax(case["teacher_logits"], -1).gather(-1, case["student_topk_ids"].long())
    floored = _statistics(case, default, teacher_logprobs_at_student_topk=exact)
    response = case["response_mask"]
    gap = (paper.disagreement - floored.disagreement)[response]
    assert gap.max() > 20 and gap.min() > -1e-6


def _equation_scores(stats: TokenStatistics, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 11 (quantiles over the valid positions, ε = 1e-12; at a spread <= 1e-6 every position 0.5, our
    rule for the case the paper leaves open) and Eqs. 12, 14-16, in float64 Python arithmetic."""

    def norm(values):
        chosen = sorted(values[valid].tolist())
        if not chosen:
            return torch.zeros_like(values)

        def quantile(q):
            position = q * (len(chosen) - 1)
            low = math.floor(position)
            high = min(low + 1, len(chosen) - 1)
            return chosen[low] + (position - low) * (chosen[high] - chosen[low])

        low, high = quantile(0.05), quantile(0.95)
        if high - low <= 1e-6:
            return torch.where(valid, 0.5, 0.0).double()
        return torch.where(valid, ((values - low) / (high - low + 1e-12)).clamp(0, 1), 0.0)

    d, c, h = norm(stats.disagreement), norm(stats.compatibility), norm(stats.entropy)
    s = d * c
    return {
        "teachability": s,
        "raw_kl": d,
        "entropy": h,
        "tip": h + d - h * d,
        "ta_entropy": h + s - h * s,
        "c_only": c,
        "d_incompat": d * (1 - c),
    }


def _equation_selection(scores: torch.Tensor, valid: torch.Tensor, ratio: str) -> torch.Tensor:
    """Eq. 13: the top ceil(ρ·N) valid positions of the batch; ties to the earlier position, then the
    lower sample index."""
    positions = [(b, t) for b, t in valid.nonzero().tolist()]
    ranked = sorted(positions, key=lambda p: (-scores[p[0], p[1]].item(), p[1], p[0]))
    mask = torch.zeros_like(valid)
    for b, t in ranked[: math.ceil(Fraction(ratio) * len(positions))]:
        mask[b, t] = True
    return mask


@pytest.mark.parametrize("index", CASES)
def test_paper_preset_scores_and_selection_are_the_equations(vectors, index):
    case = golden_case(vectors, index)
    stats, settings = _paper_statistics(case)
    valid = case["loss_mask"]
    expected = _equation_scores(stats, valid)
    sample_ids = [f"{row:04d}" for row in range(valid.shape[0])]
    for name, want in expected.items():
        got = selector_scores(name, stats, valid, rules=settings.selection_rules())
        torch.testing.assert_close(got, want, atol=SCORE_TOLERANCE, rtol=0, msg=name)
        for ratio in RATIOS:
            mask, _ = select_rollout_batch(
                stats,
                valid,
                sample_ids,
                selector=name,
                ratio=float(ratio),
                rules=settings.selection_rules(),
                seed=0,
                global_step=0,
            )
            assert torch.equal(mask, _equation_selection(got, valid, ratio)), (name, ratio)
