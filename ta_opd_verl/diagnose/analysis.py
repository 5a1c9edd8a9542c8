"""Statistics of the fixed-context diagnostic: pure tensor math, torch only.

Every statistic is written for WEIGHTED rows, `[B, n]` weights for B resamples at once. A prompt-clustered
bootstrap resample draws prompts with replacement; a row's weight is then the number of times its prompt
was drawn, and a weighted statistic equals the statistic of the resample written out row by row
(duplicated rows, ties and all). Weights of 1 give the point estimate. So:
- the resampling unit is the prompt (all rollouts of a prompt, all their positions, move together);
- Spearman correlations use average ranks of the weighted multiset (`weighted_average_ranks`);
- regressions are weighted least squares on z-scores of the resample (standardised coefficients);
- group means (Q3 thirds, matched top-N, bank-mean gain) are weighted means of fixed groups.
Intervals are percentile intervals of the resampled statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_DTYPE = torch.float64


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates `[m]`, percentile interval bounds `[m]`, and the `[resamples, m]` draws."""

    estimate: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    draws: torch.Tensor


def cluster_ids(labels: torch.Tensor) -> torch.Tensor:
    """Labels of any integer values as cluster ids 0..C-1."""
    return torch.unique(labels, return_inverse=True)[1]


def cluster_weights(
    clusters: torch.Tensor, resamples: int, generator: torch.Generator, chunk: int = 100
) -> Iterator[torch.Tensor]:
    """`[b, n]` row weights of `resamples` prompt-clustered resamples, `chunk` resamples at a time.

    Each resample draws as many clusters as there are, uniformly with replacement; a row's weight is how
    often its cluster was drawn.
    """
    clusters = cluster_ids(clusters)
    n_clusters = int(clusters.max()) + 1
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        drawn = torch.randint(n_clusters, (b, n_clusters), generator=generator)
        counts = torch.zeros(b, n_clusters, dtype=_DTYPE).scatter_add_(
            1, drawn, torch.ones(b, n_clusters, dtype=_DTYPE)
        )
        yield counts[:, clusters]


def clustered_bootstrap(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    clusters: torch.Tensor,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Percentile bootstrap of `statistic(weights [B, n]) -> [B, m]` with prompts as the resampling unit.

    Resamples where a statistic is undefined (NaN, e.g. an empty group) are left out of its interval.
    """
    n = clusters.numel()
    estimate = statistic(torch.ones(1, n, dtype=_DTYPE))[0]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.cat([statistic(w) for w in cluster_weights(clusters, resamples, generator)])
    alpha = (1.0 - level) / 2.0
    bounds = torch.nanquantile(draws, torch.tensor([alpha, 1.0 - alpha], dtype=draws.dtype), dim=0)
    return BootstrapResult(estimate, bounds[0], bounds[1], draws)


# ---- ranks and correlations -----------------------------------------------------------------------


def tie_groups(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each row's group of equal values, groups numbered in increasing value; and the number of groups."""
    unique, inverse = torch.unique(values, return_inverse=True)
    return inverse, unique.numel()


def weighted_average_ranks(weights: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """`[B, n]` 1-based average ranks of each row's value in the multiset where row i appears weights[b, i]
    times: (how many items are smaller) + (how many equal it + 1) / 2."""
    group_weight = torch.zeros(weights.shape[0], n_groups, dtype=_DTYPE).index_add_(
        1, groups, weights.to(_DTYPE)
    )
    smaller = torch.cumsum(group_weight, dim=1) - group_weight
    return (smaller + (group_weight + 1.0) / 2.0)[:, groups]


def weighted_pearson(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[B]` Pearson correlation of rows weighted by `weights` `[B, n]`; x, y `[n]` or `[B, n]`. NaN when
    either side is constant."""
    total = weights.sum(-1, keepdim=True)
    x_centred = x - (weights * x).sum(-1, keepdim=True) / total
    y_centred = y - (weights * y).sum(-1, keepdim=True) / total
    covariance = (weights * x_centred * y_centred).sum(-1)
    spread = ((weights * x_centred**2).sum(-1) * (weights * y_centred**2).sum(-1)).sqrt()
    return torch.where(spread > 0, covariance / spread, torch.nan)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two `[n]` tensors (average ranks for ties)."""
    return float(weighted_spearman(x, y)(torch.ones(1, x.numel(), dtype=_DTYPE))[0])


def weighted_spearman(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The statistic `weights [B, n] -> [B]`: Spearman correlation of x and y over the weighted rows."""
    x_groups, y_groups = tie_groups(x), tie_groups(y)

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        x_ranks = weighted_average_ranks(weights, *x_groups)
        y_ranks = weighted_average_ranks(weights, *y_groups)
        return weighted_pearson(x_ranks, y_ranks, weights)

    return statistic


def spearman_table(
    gain: torch.Tensor, scores: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The statistic `weights -> [B, len(scores)]`: Spearman correlation of the gain with each score, the
    gain's ranks computed once per resample."""
    gain_groups = tie_groups(gain)
    score_groups = [tie_groups(score) for score in scores.values()]

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        gain_ranks = weighted_average_ranks(weights, *gain_groups)
        columns = [
            weighted_pearson(gain_ranks, weighted_average_ranks(weights, *groups), weights)
            for groups in score_groups
        ]
        return torch.stack(columns, dim=-1)

    return statistic


# ---- standardised regression ----------------------------------------------------------------------


def standardised_regression(
    target: torch.Tensor, regressors: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The statistic `weights -> [B, p + 1]`: standardised coefficients of each regressor (in order), then R².

    Ordinary least squares with an intercept on the weighted rows; a coefficient times the regressor's
    weighted standard deviation over the target's is the coefficient of z-scored variables. A regressor
    constant in a resample gets coefficient 0.
    """
    # z-score on the full sample first: the normal equations then stay well conditioned in every resample.
    design = torch.stack([_zscore(v) for v in regressors.values()], dim=-1)
    design = torch.cat([torch.ones(design.shape[0], 1, dtype=_DTYPE), design], dim=-1)
    target = _zscore(target)

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(_DTYPE)
        total = weights.sum(-1, keepdim=True)
        gram = torch.einsum("bn,ni,nj->bij", weights, design, design)
        moment = torch.einsum("bn,ni,n->bi", weights, design, target)
        # A tiny ridge only lifts singular systems (a regressor constant in the resample) to a solution.
        gram = gram + 1e-10 * total.unsqueeze(-1) * torch.eye(design.shape[1], dtype=_DTYPE)
        coefficients = torch.linalg.solve(gram, moment.unsqueeze(-1)).squeeze(-1)
        fitted = coefficients @ design.T
        target_mean = (weights * target).sum(-1, keepdim=True) / total
        total_ss = (weights * (target - target_mean) ** 2).sum(-1)
        residual_ss = (weights * (target - fitted) ** 2).sum(-1)
        target_sd = (total_ss / total.squeeze(-1)).sqrt()
        design_mean = (weights @ design[:, 1:]) / total
        design_sd = ((weights @ design[:, 1:] ** 2) / total - design_mean**2).clamp_min(0.0).sqrt()
        standardised = coefficients[:, 1:] * design_sd / target_sd.unsqueeze(-1)
        r_squared = 1.0 - residual_ss / total_ss
        return torch.cat([standardised, r_squared.unsqueeze(-1)], dim=-1)

    return statistic


def _zscore(values: torch.Tensor) -> torch.Tensor:
    values = values.to(_DTYPE)
    sd = values.std(unbiased=False)
    centred = values - values.mean()
    return centred / sd if sd > 0 else centred


# ---- group means ----------------------------------------------------------------------------------


def group_means(
    values: torch.Tensor, groups: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The statistic `weights -> [B, len(groups)]`: weighted mean of `values` over each bool `[n]` group
    (NaN for a group with no weight in the resample)."""
    values = values.to(_DTYPE)
    members = torch.stack([g.to(_DTYPE) for g in groups.values()], dim=-1)

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        mass = weights.to(_DTYPE) @ members
        sums = (weights.to(_DTYPE) * values) @ members
        return torch.where(mass > 0, sums / mass.clamp_min(1e-300), torch.nan)

    return statistic


def ratio_of_sums(
    numerator: torch.Tensor, denominator: torch.Tensor, groups: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The statistic `weights -> [B, len(groups)]`: Σ numerator / Σ denominator over each group (the
    relative gain of a set of positions, ΣG / ΣKL0)."""
    members = torch.stack([g.to(_DTYPE) for g in groups.values()], dim=-1)
    numerator, denominator = numerator.to(_DTYPE), denominator.to(_DTYPE)

    def statistic(weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(_DTYPE)
        bottom = (weights * denominator) @ members
        return torch.where(
            bottom > 0, ((weights * numerator) @ members) / bottom.clamp_min(1e-300), torch.nan
        )

    return statistic


def tertiles(values: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[n]` masks of the bottom and top thirds of `values` among `member` rows (by rank; ties keep
    row order). With m members the thirds hold floor(m / 3) rows each."""
    index = torch.nonzero(member).squeeze(-1)
    order = index[torch.sort(values[index], stable=True).indices]
    third = index.numel() // 3
    bottom = torch.zeros_like(member, dtype=torch.bool)
    top = torch.zeros_like(member, dtype=torch.bool)
    bottom[order[:third]] = True
    if third:
        top[order[-third:]] = True
    return bottom, top


def difference(statistic: Callable[[torch.Tensor], torch.Tensor], pairs: list[tuple[int, int]]):
    """Append `column a - column b` for each pair to a statistic's columns (paired: same resamples)."""

    def with_differences(weights: torch.Tensor) -> torch.Tensor:
        columns = statistic(weights)
        extra = [columns[:, a] - columns[:, b] for a, b in pairs]
        return torch.cat([columns, torch.stack(extra, dim=-1)], dim=-1) if extra else columns

    return with_differences


def combine(*statistics: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Several statistics evaluated on the same resamples, columns concatenated."""

    def combined(weights: torch.Tensor) -> torch.Tensor:
        return torch.cat([statistic(weights) for statistic in statistics], dim=-1)

    return combined


def finite_or_none(value: float) -> float | None:
    """A float for JSON: NaN and infinities become None."""
    return value if math.isfinite(value) else None
