"""Normalisation (Eq. 11), selector scores and the global budget (Eq. 13) against Python-loop references."""

import math
import time
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ta_opd_verl.teachability import (
    SELECTORS,
    SelectionRules,
    TokenStatistics,
    batch_normalize,
    budget_size,
    masked_quantiles,
    select_budget,
    select_positions,
    selector_scores,
)


def reference_quantile(sorted_values, q):
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def reference_normalize(values, valid, q_low=0.05, q_high=0.95, no_spread="half"):
    flat_values, flat_valid = values.reshape(-1).tolist(), valid.reshape(-1).tolist()
    chosen = sorted(v for v, ok in zip(flat_values, flat_valid, strict=True) if ok)
    out = [0.0] * len(flat_values)
    if chosen:
        low, high = reference_quantile(chosen, q_low), reference_quantile(chosen, q_high)
        for i, (v, ok) in enumerate(zip(flat_values, flat_valid, strict=True)):
            if not ok:
                continue
            if no_spread == "half":
                out[i] = 0.5 if high - low <= 1e-6 else min(1.0, max(0.0, (v - low) / (high - low + 1e-12)))
            else:
                out[i] = 0.0 if abs(high - low) < 1e-12 else min(1.0, max(0.0, (v - low) / (high - low)))
    return torch.tensor(out, dtype=torch.float64).reshape(values.shape)


def reference_select(scores, valid, ratio, min_keep=0, candidates=None, top_up=None, rounding="decimal"):
    """The selection rules written out: the top n of the candidates (default: the valid positions) by
    (-score, t, b); then each sample short of min_keep gets its best unselected valid positions by
    (-top_up score, t)."""
    batch, length = scores.shape
    positions = [(b, t) for b in range(batch) for t in range(length) if valid[b, t]]
    pool = [p for p in positions if candidates is None or candidates[p]]
    ranked = sorted(pool, key=lambda p: (-scores[p].item(), p[1], p[0]))
    if rounding == "decimal":
        n_keep = math.ceil(Fraction(str(ratio)) * len(positions))
    else:
        n_keep = max(1, math.ceil(len(positions) * ratio))
    chosen = set(ranked[:n_keep])
    top_up = scores if top_up is None else top_up
    for b in range(batch):
        missing = min_keep - sum(1 for p in chosen if p[0] == b)
        own = sorted(
            (p for p in positions if p[0] == b and p not in chosen), key=lambda p: (-top_up[p].item(), p[1])
        )
        chosen.update(own[: max(missing, 0)])
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, t in chosen:
        mask[b, t] = True
    return mask


def random_stats(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return TokenStatistics(
        torch.rand(shape, generator=gen) * 3,
        torch.rand(shape, generator=gen),
        torch.rand(shape, generator=gen) * 5,
    )


def reference_scores(name, stats, valid, population=None, no_spread="half", product=False):
    """The selector formulas (Eq. 12, 14-16) on statistics normalised over `population` (default valid);
    `product`: the authors' ta_entropy and q3, with Norm(D·C) in place of D̃·C̃."""
    population = valid if population is None else population

    def norm(values):
        return reference_normalize(values.double(), population, no_spread=no_spread)

    d, c, h = norm(stats.disagreement), norm(stats.compatibility), norm(stats.entropy)
    s = norm(stats.disagreement.double() * stats.compatibility.double()) if product else d * c
    formulas = {
        "teachability": lambda: d * c,
        "raw_kl": lambda: d,
        "entropy": lambda: h,
        "tip": lambda: h + d - h * d,
        "ta_entropy": lambda: h + s - h * s,
        "c_only": lambda: c,
        "d_incompat": lambda: d * (1 - c),
        "q3": lambda: (1 - h) * s,
        "q3_high_c": lambda: c,
    }
    return torch.where(valid, formulas[name](), 0.0)


def reference_q3(stats, valid, population=None, no_spread="half"):
    population = valid if population is None else population
    d = reference_normalize(stats.disagreement, population, no_spread=no_spread)
    h = reference_normalize(stats.entropy, population, no_spread=no_spread)
    h_median = reference_quantile(sorted(h[population].tolist()), 0.5)
    d_median = reference_quantile(sorted(d[population].tolist()), 0.5)
    return population & (h < h_median) & (d >= d_median)


VALID_PATTERNS = ["random", "all", "one", "none"]


def make_valid(shape, pattern, gen):
    if pattern == "all":
        return torch.ones(shape, dtype=torch.bool)
    if pattern == "none":
        return torch.zeros(shape, dtype=torch.bool)
    if pattern == "one":
        valid = torch.zeros(shape, dtype=torch.bool)
        valid.view(-1)[int(torch.randint(0, valid.numel(), (1,), generator=gen))] = True
        return valid
    return torch.rand(shape, generator=gen) < 0.6


# ---- batch_normalize ----


@pytest.mark.parametrize("no_spread", ["half", "zero"])
@pytest.mark.parametrize("pattern", VALID_PATTERNS)
@pytest.mark.parametrize("shape", [(4, 9), (3, 2, 5), (50,)])
@pytest.mark.parametrize(("q_low", "q_high"), [(0.05, 0.95), (0.0, 1.0), (0.25, 0.3)])
def test_batch_normalize_matches_reference(shape, pattern, q_low, q_high, no_spread):
    gen = torch.Generator().manual_seed(len(shape) * 10 + VALID_PATTERNS.index(pattern))
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    valid = make_valid(shape, pattern, gen)
    values[~valid] = 1e6  # must not influence the quantiles
    got = batch_normalize(values, valid, q_low, q_high, no_spread=no_spread)
    assert got.dtype == torch.float64
    expected = reference_normalize(values, valid, q_low, q_high, no_spread)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert (got[~valid] == 0).all()


def test_spreads_between_the_two_no_spread_thresholds():
    # A spread of 1e-9: below ours (1e-6, every position 0.5), above the authors' (1e-12, normalised).
    values = torch.tensor([[1.0, 1.0 + 1e-9, 1.0 + 2e-9]], dtype=torch.float64)
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert batch_normalize(values, valid, 0.0, 1.0).tolist() == [[0.5, 0.5, 0.5]]
    torch.testing.assert_close(
        batch_normalize(values, valid, 0.0, 1.0, no_spread="zero"),
        torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    constant = torch.full((1, 3), 2.5)
    assert batch_normalize(constant, valid, no_spread="zero").tolist() == [[0.0, 0.0, 0.0]]


def test_quantiles_agree_with_torch_quantile():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1001, generator=gen).round(decimals=1)  # many ties
    valid = torch.rand(1001, generator=gen) < 0.7
    qs = (0.0, 0.05, 0.5, 0.95, 1.0)
    expected = torch.quantile(values[valid].double(), torch.tensor(qs, dtype=torch.float64)).tolist()
    assert masked_quantiles(values, valid, qs) == pytest.approx(expected, abs=1e-6)


def test_quantile_interpolation_is_written_like_the_authors():
    # x_lo·(1 - f) + x_hi·f, not x_lo + f·(x_hi - x_lo): the two differ in the last bit here.
    values = torch.tensor([0.1, 0.7, 0.3, 0.9, 0.5, 0.2], dtype=torch.float64)
    valid = torch.ones(6, dtype=torch.bool)
    xs = sorted(values.tolist())
    for q in (0.05, 0.5, 0.95):
        position = q * 5
        low, frac = math.floor(position), position - math.floor(position)
        expected = xs[low] * (1.0 - frac) + xs[low + 1] * frac
        assert masked_quantiles(values, valid, (q,)) == [expected]


def test_constant_statistic_gives_one_half_and_no_valid_gives_zeros():
    valid = torch.tensor([[True, False, True], [True, True, False]])
    got = batch_normalize(torch.full((2, 3), 2.5), valid)
    assert torch.equal(got, torch.where(valid, 0.5, 0.0))
    assert torch.equal(
        batch_normalize(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 3)
    )


def test_batch_normalize_beyond_torch_quantile_limit():
    # 17 copies of each of 2**20 levels, shuffled by a multiplicative bijection: the quantiles are known.
    levels, copies = 2**20, 17
    n = levels * copies
    assert n > 2**24
    values = (((torch.arange(n, dtype=torch.int64) * 7919) % n) % levels).float()
    valid = torch.ones(n, dtype=torch.bool)
    extra_values = torch.tensor([-1e9, 1e9])
    values = torch.cat([values, extra_values])
    valid = torch.cat([valid, torch.zeros(2, dtype=torch.bool)])
    start = time.perf_counter()
    got = batch_normalize(values, valid)
    elapsed = time.perf_counter() - start

    def order_statistic(rank):
        return float(rank // copies)

    def quantile(q):
        position = q * (n - 1)
        low = math.floor(position)
        return order_statistic(low) + (position - low) * (order_statistic(low + 1) - order_statistic(low))

    q_low, q_high = quantile(0.05), quantile(0.95)
    assert masked_quantiles(values, valid, (0.05, 0.95)) == pytest.approx([q_low, q_high], abs=1e-3)
    probe = torch.tensor([0, 1000, 524_288, levels - 1])
    expected = ((values[probe].double() - q_low) / (q_high - q_low)).clamp(0, 1)
    torch.testing.assert_close(got[probe].double(), expected, atol=1e-6, rtol=0)
    assert got[-2:].tolist() == [0.0, 0.0]
    assert elapsed < 30


# ---- select_budget ----


@pytest.mark.parametrize("min_keep", [0, 1, 3])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_select_budget_matches_reference(pattern, ratio, min_keep):
    gen = torch.Generator().manual_seed(VALID_PATTERNS.index(pattern))
    shape = (5, 13)
    scores = torch.randint(0, 4, shape, generator=gen).float()  # many ties
    valid = make_valid(shape, pattern, gen)
    got = select_budget(scores, valid, ratio, min_keep_per_sample=min_keep)
    assert got.dtype == torch.bool
    assert torch.equal(got, reference_select(scores, valid, ratio, min_keep))


def test_ties_break_toward_earlier_position_then_lower_sample():
    scores = torch.ones(4, 3)
    valid = torch.ones(4, 3, dtype=torch.bool)
    got = select_budget(scores, valid, 0.5)
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[:, 0] = True
    expected[:2, 1] = True
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("ratio", "n_valid", "expected"), [(0.05, 100, 5), (0.07, 100, 7), (0.1, 30, 3), (0.3, 10, 3)]
)
def test_exact_integer_budgets_do_not_round_up(ratio, n_valid, expected):
    scores = torch.randn(1, n_valid)
    assert int(select_budget(scores, torch.ones(1, n_valid, dtype=torch.bool), ratio).sum()) == expected


def test_budget_rounds_up_otherwise():
    scores = torch.randn(2, 21)
    assert int(select_budget(scores, torch.ones(2, 21, dtype=torch.bool), 0.05).sum()) == 3


def test_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.0, -5.0]])
    got = select_budget(scores, torch.ones(1, 3, dtype=torch.bool), 0.6)
    assert got.tolist() == [[False, True, True]]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_select_budget_rejects_ratio_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="ratio"):
        select_budget(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), bad)


def test_select_budget_is_fast_for_a_million_positions():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, 1000, generator=gen)
    valid = torch.rand(1000, 1000, generator=gen) < 0.8
    start = time.perf_counter()
    got = select_budget(scores, valid, 0.05, min_keep_per_sample=1)
    elapsed = time.perf_counter() - start
    n_valid = int(valid.sum())
    assert not (got & ~valid).any()
    assert int(got.sum()) >= math.ceil(Fraction(1, 20) * n_valid)
    assert got.any(dim=1).all()
    assert elapsed < 10


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    length=st.integers(1, 12),
    ratio=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]),
    min_keep=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_selection_count_rule(batch, length, ratio, min_keep, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (batch, length), generator=gen).float()
    valid = torch.rand(batch, length, generator=gen) < 0.7
    got = select_budget(scores, valid, ratio, min_keep_per_sample=min_keep)
    assert not (got & ~valid).any()
    n_keep = math.ceil(Fraction(str(ratio)) * int(valid.sum()))
    base = select_budget(scores, valid, ratio)
    assert int(base.sum()) == n_keep
    per_sample = base.sum(dim=1)
    targets = torch.minimum(torch.full_like(per_sample, min_keep), valid.sum(dim=1))
    top_ups = (targets - per_sample).clamp_min(0)
    assert int(got.sum()) == n_keep + int(top_ups.sum())
    assert (got.sum(dim=1) == torch.maximum(per_sample, targets)).all()
    assert not (base & ~got).any()


# ---- selector scores ----

RANKED = ["teachability", "raw_kl", "entropy", "tip", "ta_entropy", "c_only", "d_incompat"]


@pytest.mark.parametrize("pattern", ["random", "all", "one"])
@pytest.mark.parametrize("name", RANKED)
def test_selector_scores_match_reference(name, pattern):
    gen = torch.Generator().manual_seed(RANKED.index(name))
    stats = random_stats((4, 10), RANKED.index(name))
    valid = make_valid((4, 10), pattern, gen)
    got = selector_scores(name, stats, valid)
    torch.testing.assert_close(got.double(), reference_scores(name, stats, valid), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", RANKED)
def test_select_positions_keeps_the_top_scores(name):
    stats = random_stats((3, 20), 7)
    valid = torch.rand(3, 20, generator=torch.Generator().manual_seed(7)) < 0.8
    expected = reference_select(reference_scores(name, stats, valid), valid, 0.1, 1)
    got = select_positions(name, stats, valid, 0.1, rules=SelectionRules(min_keep_per_sample=1))
    assert torch.equal(got, expected)


AUTHORS_RULES = SelectionRules(
    min_keep_per_sample=1,
    no_spread="zero",
    ta_entropy_score="normalized_product",
    q3_rule="quadrant_only",
    min_keep_score="ta_entropy",
    budget_rounding="float",
)


@pytest.mark.parametrize("name", [*RANKED, "q3", "q3_high_c"])
def test_the_authors_rules_rank_and_top_up_as_written(name):
    stats = random_stats((5, 24), 21)
    gen = torch.Generator().manual_seed(21)
    population = torch.rand(5, 24, generator=gen) < 0.9  # response positions
    valid = population & (torch.rand(5, 24, generator=gen) < 0.8)  # their loss-mask positions
    valid[4] = False  # a sample with nothing valid is never topped up
    expected_scores = reference_scores(name, stats, valid, population, "zero", product=True)
    got_scores = selector_scores(name, stats, valid, rules=AUTHORS_RULES, population=population)
    torch.testing.assert_close(got_scores, expected_scores, atol=1e-12, rtol=0)
    q3 = reference_q3(stats, valid, population, "zero")
    expected = reference_select(
        expected_scores,
        valid,
        0.1,
        1,
        candidates=q3 if name.startswith("q3") else None,
        top_up=reference_scores("ta_entropy", stats, valid, population, "zero", product=True),
        rounding="float",
    )
    got = select_positions(name, stats, valid, 0.1, rules=AUTHORS_RULES, population=population)
    assert torch.equal(got, expected)
    if name.startswith("q3"):  # never more than the quadrant holds, plus the top-ups
        assert int((got & q3).sum()) <= int((q3 & valid).sum())


def test_q3_quadrant_only_keeps_at_most_the_quadrant():
    stats = random_stats((4, 30), 22)
    valid = torch.ones(4, 30, dtype=torch.bool)
    q3 = reference_q3(stats, valid)
    rules = SelectionRules(q3_rule="quadrant_only")
    got = select_positions("q3_high_c", stats, valid, 0.9, rules=rules)
    assert torch.equal(got, q3)
    filled = select_positions("q3_high_c", stats, valid, 0.9)
    assert int(filled.sum()) == math.ceil(Fraction("0.9") * 120) and (filled & q3).sum() == q3.sum()


@pytest.mark.parametrize("min_keep", [0, 1, 2])
@pytest.mark.parametrize("rounding", ["decimal", "float"])
@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_select_budget_with_candidates_and_a_top_up_score_matches_reference(pattern, rounding, min_keep):
    gen = torch.Generator().manual_seed(30 + VALID_PATTERNS.index(pattern))
    shape = (6, 11)
    scores = torch.randint(0, 4, shape, generator=gen).double()  # many ties
    top_up = torch.randint(0, 3, shape, generator=gen).double()
    candidates = torch.rand(shape, generator=gen) < 0.3
    valid = make_valid(shape, pattern, gen)
    for ratio in (0.05, 0.3, 0.7):
        got = select_budget(
            scores,
            valid,
            ratio,
            min_keep_per_sample=min_keep,
            candidates=candidates,
            top_up_scores=top_up,
            budget_rounding=rounding,
        )
        expected = reference_select(scores, valid, ratio, min_keep, candidates, top_up, rounding)
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("ratio", "n_valid", "decimal", "float_"), [(0.07, 100, 7, 8), (0.05, 7, 1, 1), (0.1, 0, 0, 1)]
)
def test_budget_size_rounding(ratio, n_valid, decimal, float_):
    # 0.07 · 100 is 7.000000000000001 in float64: the authors' ceil gives 8.
    assert budget_size(ratio, n_valid) == decimal
    assert budget_size(ratio, n_valid, "float") == float_


def test_float64_scores_are_not_rounded_to_float32_before_ranking():
    scores = torch.tensor([[1.0 - 2**-40, 1.0]], dtype=torch.float64)  # equal in float32
    assert select_budget(scores, torch.ones(1, 2, dtype=torch.bool), 0.5).tolist() == [[False, True]]


def test_q3_fills_its_quadrant_first_in_random_order():
    stats = random_stats((6, 30), 11)
    valid = torch.rand(6, 30, generator=torch.Generator().manual_seed(11)) < 0.9
    q3 = reference_q3(stats, valid)
    scores = selector_scores("q3", stats, valid, generator=torch.Generator().manual_seed(0))
    assert (scores[q3] >= 1).all() and (scores[q3] < 2).all()
    assert (scores[valid & ~q3] < 1).all() and (scores[valid & ~q3] >= 0).all()
    assert q3.any()
    # A Fraction ratio is exact, so the budget is exactly the quadrant's size.
    got = select_positions("q3", stats, valid, Fraction(int(q3.sum()), int(valid.sum())))
    assert torch.equal(got, q3)


def test_q3_high_c_ranks_quadrant_by_compatibility():
    stats = random_stats((5, 16), 12)
    valid = torch.ones(5, 16, dtype=torch.bool)
    q3 = reference_q3(stats, valid)
    c = reference_normalize(stats.compatibility, valid)
    expected = torch.where(q3, 1 + c, 0.0)
    torch.testing.assert_close(
        selector_scores("q3_high_c", stats, valid).double(), expected, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", ["random", "q3"])
def test_random_selectors_are_deterministic_under_a_seed(name):
    stats = random_stats((4, 25), 13)
    valid = torch.ones(4, 25, dtype=torch.bool)

    def run(seed):
        return select_positions(name, stats, valid, 0.2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert int(run(3).sum()) == 20


def test_full_keeps_every_valid_position_whatever_the_ratio():
    stats = random_stats((3, 7), 14)
    valid = torch.rand(3, 7, generator=torch.Generator().manual_seed(14)) < 0.5
    assert torch.equal(select_positions("full", stats, valid, 0.01), valid)


def test_unknown_selector_lists_the_valid_names():
    stats = random_stats((2, 3), 0)
    with pytest.raises(ValueError, match="teachability") as info:
        select_positions("nope", stats, torch.ones(2, 3, dtype=torch.bool), 0.1)
    assert all(name in str(info.value) for name in SELECTORS)
    with pytest.raises(ValueError, match="q3_high_c"):
        selector_scores("nope", stats, torch.ones(2, 3, dtype=torch.bool))


def test_invalid_positions_score_zero_for_every_selector():
    stats = random_stats((3, 8), 15)
    valid = torch.rand(3, 8, generator=torch.Generator().manual_seed(15)) < 0.5
    for name in SELECTORS:
        got = selector_scores(name, stats, valid, generator=torch.Generator().manual_seed(0))
        assert (got[~valid] == 0).all(), name
