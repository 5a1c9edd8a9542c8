"""The diagnostic's tables from the bank's grids: gains, correlations, regressions, Q3 gap, matched top-N
and the masked-training runs. Tensors in, plain dicts out (JSON-ready); no model, no file.

Conventions (the report repeats them):
- G_t = KL(p_T||p_θ0) - KL(p_T||p_θτ), full-vocabulary forward KL (Eq. 1): the ABSOLUTE gain, in nats,
  is primary. The RELATIVE gain of a set of positions is ΣG / ΣKL(p_T||p_θ0) over the set (the authors'
  scripts store a relative gain; a per-position ratio is unstable where the initial KL is near 0).
- Scores are θ0's, normalised over the whole bank (Eq. 11), with the exact C (the diagnostic form).
- Intervals: 95% percentile intervals of a prompt-clustered bootstrap (`analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ta_opd_verl.diagnose import analysis
from ta_opd_verl.diagnose.scoring import DETERMINISTIC_SELECTORS, bank_scores

# Spearman rows that depend on K, and those that do not (raw statistics of θ0 and the teacher).
SUPPORT_SCORES = (*DETERMINISTIC_SELECTORS, "D", "C", "C_lower_bound")
GLOBAL_SCORES = ("entropy_raw", "teacher_entropy", "forward_kl_0", "reverse_kl_0", "position")
BASE_REGRESSORS = ("H", "D", "H*D", "position", "teacher_entropy")
SPLIT_REGRESSORS = ("H", "D_L", "D_I", "H*D_L", "H*D_I", "position", "teacher_entropy")


@dataclass(frozen=True)
class BankView:
    """The bank flattened to its valid positions (rollout-major), with each position's prompt cluster."""

    valid: torch.Tensor
    clusters: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, valid: torch.Tensor, prompt_index: torch.Tensor) -> BankView:
        positions = torch.arange(valid.shape[1]).expand_as(valid)
        return cls(valid, prompt_index.unsqueeze(1).expand_as(valid)[valid], positions[valid])

    def flat(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[self.valid].double()

    @property
    def size(self) -> int:
        return int(self.valid.sum())


def interval(result: analysis.BootstrapResult, column: int) -> dict:
    return {
        "estimate": analysis.finite_or_none(float(result.estimate[column])),
        "low": analysis.finite_or_none(float(result.low[column])),
        "high": analysis.finite_or_none(float(result.high[column])),
    }


def gain_summary(
    view: BankView, kl_initial: torch.Tensor, kl_trained: torch.Tensor, *, resamples: int, seed: int
):
    """Bank-mean absolute gain (with interval), relative gain, mean initial/trained KL, share of G > 0."""
    kl0, klt = view.flat(kl_initial), view.flat(kl_trained)
    gain = kl0 - klt
    everything = {"all": torch.ones_like(gain, dtype=torch.bool)}
    result = analysis.clustered_bootstrap(
        analysis.combine(
            analysis.group_means(gain, everything), analysis.ratio_of_sums(gain, kl0, everything)
        ),
        view.clusters,
        resamples=resamples,
        seed=seed,
    )
    return {
        "mean_gain": interval(result, 0),
        "relative_gain": interval(result, 1),
        "mean_kl_initial": float(kl0.mean()),
        "mean_kl_trained": float(klt.mean()),
        "share_positive": float((gain > 0).double().mean()),
    }


def support_features(
    grids: dict[str, torch.Tensor], valid: torch.Tensor, k: int, q_low: float, q_high: float
):
    """Flat-able `[R, L]` features at support size K: the selectors' scores, raw D/C/Ĉ and the normalised
    statistics the regressions use."""
    scores = bank_scores(grids, valid, k, q_low=q_low, q_high=q_high)
    scores["D"] = grids[f"disagreement@{k}"]
    scores["C"] = grids[f"compatibility@{k}"]
    scores["C_lower_bound"] = grids[f"compatibility_lower_bound@{k}"]
    return scores


def correlations(
    view: BankView,
    grids: dict[str, torch.Tensor],
    gain_grid: torch.Tensor,
    ks: tuple[int, ...],
    *,
    q_low: float,
    q_high: float,
    resamples: int,
    seed: int,
) -> dict:
    """Spearman ρ(G, score) for every score and K, with the paired difference teachability − raw KL."""
    gain = view.flat(gain_grid)
    global_scores = {
        "entropy_raw": view.flat(grids["entropy"]),
        "teacher_entropy": view.flat(grids["teacher_entropy"]),
        "forward_kl_0": view.flat(grids["forward_kl"]),
        "reverse_kl_0": view.flat(grids["reverse_kl"]),
        "position": view.positions.double(),
    }
    out: dict = {"global": {}, "by_k": {}}
    result = analysis.clustered_bootstrap(
        analysis.spearman_table(gain, global_scores), view.clusters, resamples=resamples, seed=seed
    )
    out["global"] = {name: interval(result, i) for i, name in enumerate(global_scores)}
    for k in ks:
        features = support_features(grids, view.valid, k, q_low, q_high)
        scores = {name: view.flat(features[name]) for name in SUPPORT_SCORES}
        names = list(scores)
        pair = (names.index("teachability"), names.index("raw_kl"))
        statistic = analysis.difference(analysis.spearman_table(gain, scores), [pair])
        result = analysis.clustered_bootstrap(statistic, view.clusters, resamples=resamples, seed=seed)
        table = {name: interval(result, i) for i, name in enumerate(names)}
        table["teachability_minus_raw_kl"] = interval(result, len(names))
        out["by_k"][str(k)] = table
    return out


def regressions(
    view: BankView,
    grids: dict[str, torch.Tensor],
    gain_grid: torch.Tensor,
    ks: tuple[int, ...],
    *,
    q_low: float,
    q_high: float,
    resamples: int,
    seed: int,
) -> dict:
    """Standardised regressions of G on (H̃, D̃, H̃·D̃, position, teacher entropy) and on the same with D̃
    split into D^L = D̃C̃ and D^I = D̃(1 − C̃) (D̃ = D^L + D^I); β, R², ΔR² and β_L − β_I per K."""
    gain = view.flat(gain_grid)
    out = {}
    for k in ks:
        features = support_features(grids, view.valid, k, q_low, q_high)
        h, d = view.flat(features["H_norm"]), view.flat(features["D_norm"])
        d_l, d_i = view.flat(features["D_L"]), view.flat(features["D_I"])
        shared = {"position": view.positions.double(), "teacher_entropy": view.flat(grids["teacher_entropy"])}
        base = {"H": h, "D": d, "H*D": h * d, **shared}
        split = {"H": h, "D_L": d_l, "D_I": d_i, "H*D_L": h * d_l, "H*D_I": h * d_i, **shared}
        n_base, n_split = len(base) + 1, len(split) + 1
        combined = analysis.combine(
            analysis.standardised_regression(gain, base), analysis.standardised_regression(gain, split)
        )
        base_r2, split_r2 = n_base - 1, n_base + n_split - 1
        beta_l, beta_i = n_base + list(split).index("D_L"), n_base + list(split).index("D_I")
        statistic = analysis.difference(combined, [(split_r2, base_r2), (beta_l, beta_i)])
        result = analysis.clustered_bootstrap(statistic, view.clusters, resamples=resamples, seed=seed)
        out[str(k)] = {
            "base": {
                **{name: interval(result, i) for i, name in enumerate(base)},
                "r2": interval(result, base_r2),
            },
            "split": {
                **{name: interval(result, n_base + i) for i, name in enumerate(split)},
                "r2": interval(result, split_r2),
            },
            "delta_r2": interval(result, n_base + n_split),
            "beta_l_minus_beta_i": interval(result, n_base + n_split + 1),
        }
    return out


def q3_gaps(
    view: BankView,
    grids: dict[str, torch.Tensor],
    gain_grid: torch.Tensor,
    ks: tuple[int, ...],
    *,
    q_low: float,
    q_high: float,
    resamples: int,
    seed: int,
) -> dict:
    """Inside Q3 (H̃ below and D̃ at or above their bank medians), mean G of the top third by exact C minus
    the bottom third; also as relative gains. Q3 and the thirds are fixed on the whole bank."""
    gain, kl0 = view.flat(gain_grid), view.flat(grids["forward_kl"])
    out = {}
    for k in ks:
        features = support_features(grids, view.valid, k, q_low, q_high)
        member = view.flat(features["in_q3"]).bool()
        bottom, top = analysis.tertiles(view.flat(features["C"]), member)
        groups = {"top": top, "bottom": bottom}
        statistic = analysis.combine(
            analysis.difference(analysis.group_means(gain, groups), [(0, 1)]),
            analysis.difference(analysis.ratio_of_sums(gain, kl0, groups), [(0, 1)]),
        )
        result = analysis.clustered_bootstrap(statistic, view.clusters, resamples=resamples, seed=seed)
        out[str(k)] = {
            "q3_positions": int(member.sum()),
            "third_size": int(top.sum()),
            "top_third_mean_gain": interval(result, 0),
            "bottom_third_mean_gain": interval(result, 1),
            "gap": interval(result, 2),
            "relative_gap": interval(result, 5),
            "top_third_mean_c": float(view.flat(features["C"])[top].mean()) if bool(top.any()) else None,
            "bottom_third_mean_c": float(view.flat(features["C"])[bottom].mean())
            if bool(bottom.any())
            else None,
        }
    return out


def masked_means(
    view: BankView,
    gain_grid: torch.Tensor,
    kl_initial: torch.Tensor,
    masks: dict[str, torch.Tensor],
    *,
    resamples: int,
    seed: int,
) -> dict:
    """Mean G (with interval) and relative gain over each `[R, L]` mask: the matched top-N table."""
    gain, kl0 = view.flat(gain_grid), view.flat(kl_initial)
    groups = {name: view.flat(mask).bool() for name, mask in masks.items()}
    result = analysis.clustered_bootstrap(
        analysis.combine(analysis.group_means(gain, groups), analysis.ratio_of_sums(gain, kl0, groups)),
        view.clusters,
        resamples=resamples,
        seed=seed,
    )
    return {
        name: {
            "positions": int(groups[name].sum()),
            "mean_gain": interval(result, i),
            "relative_gain": interval(result, len(groups) + i),
        }
        for i, name in enumerate(groups)
    }


def masked_training_run(
    view: BankView,
    kl_initial: torch.Tensor,
    kl_trained: torch.Tensor,
    selected: torch.Tensor,
    losses: list[float],
    *,
    resamples: int,
    seed: int,
) -> dict:
    """One Table 2 run: actual keep ratio, bank-mean G (interval), relative gain, gain per kept token
    (ΣG over the bank / number of trained positions), mean G on and off the kept positions."""
    summary = gain_summary(view, kl_initial, kl_trained, resamples=resamples, seed=seed)
    gain = view.flat(kl_initial) - view.flat(kl_trained)
    kept = view.flat(selected).bool()
    n_kept = int(kept.sum())
    return {
        "kept": n_kept,
        "keep_ratio": n_kept / view.size,
        **summary,
        "gain_per_kept_token": float(gain.sum()) / max(n_kept, 1),
        "mean_gain_kept": float(gain[kept].mean()) if n_kept else None,
        "mean_gain_not_kept": float(gain[~kept].mean()) if n_kept < view.size else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
