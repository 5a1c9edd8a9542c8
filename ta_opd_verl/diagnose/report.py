"""The diagnostic's files: `summary.json`, `tokens.parquet` (one row per bank position), `report.md` and
PNG plots (gain vs teachability and vs raw KL, the D^L/D^I plane, the budget curve)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ta_opd_verl.diagnose.bank import Bank
from ta_opd_verl.diagnose.diagnostic import support_features

# The paper's figures (Qwen3 pairs) the report sets ours beside; the paper does not say whether each is an
# absolute or a relative gain (the authors' scripts store relative gains), so both of ours are shown.
PAPER = {
    "beta_l": "0.086-0.087",
    "beta_i": "0.043-0.045",
    "q3_gap": "+0.078 [+0.060, +0.095] (K = 16)",
    "table2_5pct": {"teachability": 0.049, "raw_kl": 0.036, "tip": 0.026, "random": 0.021, "entropy": 0.009},
    "budget_curve_teachability": {0.01: 0.034, 0.03: 0.047, 0.05: 0.049, 0.10: 0.035},
}


def write_outputs(
    out: Path,
    summary: dict,
    bank: Bank,
    grids: dict[str, torch.Tensor],
    gain_grid: torch.Tensor,
    kl_tau: torch.Tensor,
    run_gains: dict[str, torch.Tensor],
    ks: tuple[int, ...],
    train_k: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tokens = token_table(bank, grids, gain_grid, kl_tau, run_gains, ks)
    tokens.to_parquet(out / "tokens.parquet", index=False)
    plots = write_plots(out, tokens, summary, train_k)
    (out / "report.md").write_text(markdown(summary, plots, train_k))


def token_table(bank, grids, gain_grid, kl_tau, run_gains, ks):
    """One row per valid bank position: ids, θ0's statistics and scores for every K, θτ's KL and the gains."""
    valid = bank.valid_mask()
    rollout = torch.arange(bank.rollouts).unsqueeze(1).expand_as(valid)
    columns = {
        "rollout": rollout[valid],
        "prompt_index": torch.tensor(bank.prompt_index).unsqueeze(1).expand_as(valid)[valid],
        "sample": torch.tensor(bank.sample).unsqueeze(1).expand_as(valid)[valid],
        "position": torch.arange(valid.shape[1]).expand_as(valid)[valid],
        "token_id": bank.response_tensor()[valid],
        "forward_kl_0": grids["forward_kl"][valid],
        "reverse_kl_0": grids["reverse_kl"][valid],
        "entropy": grids["entropy"][valid],
        "teacher_entropy": grids["teacher_entropy"][valid],
        "forward_kl_tau": kl_tau[valid],
        "gain": gain_grid[valid],
    }
    for k in ks:
        features = support_features(grids, valid, k, 0.05, 0.95)
        for name in ("D", "C", "C_lower_bound", "D_norm", "C_norm", "H_norm", "D_L", "D_I", "in_q3"):
            columns[f"{name}@{k}"] = features[name][valid]
    for name, gain in run_gains.items():
        columns[f"gain[{name}]"] = gain[valid]
    return pd.DataFrame({name: value.numpy() for name, value in columns.items()})


def write_plots(out: Path, tokens, summary: dict, train_k: int) -> list[str]:
    # matplotlib only where a plot is drawn, and its Agg backend chosen then, not for every importer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, column, label in (
        (axes[0], f"D_L@{train_k}", f"teachability s = D̃·C̃ (K = {train_k})"),
        (axes[1], f"D_norm@{train_k}", f"raw KL D̃ (K = {train_k})"),
    ):
        axis.scatter(tokens[column], tokens["gain"], s=3, alpha=0.25, color="tab:gray", label="positions")
        centres, means = _binned_means(tokens[column], tokens["gain"])
        axis.plot(centres, means, "o-", color="tab:red", label="mean G per score decile")
        axis.axhline(0.0, color="black", linewidth=0.6)
        # A handful of positions gain or lose several nats; the central 99% keeps the trend readable.
        low, high = float(tokens["gain"].quantile(0.005)), float(tokens["gain"].quantile(0.995))
        if low < high:
            axis.set_ylim(low, high)
        axis.set_xlabel(label)
        axis.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("G = KL(p_T||p_θ0) − KL(p_T||p_θτ), nats (central 99%)")
    figure.suptitle(f"Token gain vs θ0's score; θτ: {summary['models']['theta_tau']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "gain_vs_scores.png", dpi=110)
    plt.close(figure)
    written.append("gain_vs_scores.png")

    figure, axis = plt.subplots(figsize=(5.6, 4.6))
    d_l, d_i, gain = tokens[f"D_L@{train_k}"], tokens[f"D_I@{train_k}"], tokens["gain"]
    limit = float(abs(gain).quantile(0.95)) or 1.0
    hexes = axis.hexbin(
        d_l,
        d_i,
        C=gain,
        gridsize=25,
        reduce_C_function=lambda v: sum(v) / len(v),
        cmap="RdBu_r",
        vmin=-limit,
        vmax=limit,
        mincnt=3,
    )
    figure.colorbar(hexes, ax=axis, label="mean G (nats)")
    axis.set_xlabel("D^L = D̃·C̃ (learnable)")
    axis.set_ylabel("D^I = D̃·(1 − C̃) (incompatible)")
    axis.set_title(f"Mean gain over the D^L / D^I plane (K = {train_k})", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "dl_di_plane.png", dpi=110)
    plt.close(figure)
    written.append("dl_di_plane.png")

    runs = summary["masked_training"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for run in runs.values():
        if "selector" in run:
            curves.setdefault(run["selector"], []).append((run["budget"], run["mean_gain"]["estimate"]))
    if curves:
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        for selector, points in sorted(curves.items()):
            points.sort()
            style = {"linewidth": 2.4} if selector == "teachability" else {"linewidth": 1.0}
            axis.plot([100 * b for b, _ in points], [g for _, g in points], "o-", label=selector, **style)
        if "full" in runs:
            axis.axhline(
                runs["full"]["mean_gain"]["estimate"],
                color="black",
                linestyle="--",
                label="full (every position)",
            )
        axis.set_xlabel("budget ρ (% of bank positions trained)")
        axis.set_ylabel("bank-mean G (nats)")
        axis.set_title("Masked training on the frozen bank (Table 2)", fontsize=9)
        axis.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(out / "budget_curve.png", dpi=110)
        plt.close(figure)
        written.append("budget_curve.png")
    return written


def _binned_means(x, y, bins: int = 10):
    """Mean of y in each decile of x (deciles that coincide, at ties, are merged)."""
    edges = pd.qcut(x, bins, duplicates="drop")
    grouped = pd.DataFrame({"x": x, "y": y, "bin": edges}).groupby("bin", observed=True)
    return grouped["x"].mean().to_numpy(), grouped["y"].mean().to_numpy()


def _ci(value: dict | None, digits: int = 3) -> str:
    if value is None or value.get("estimate") is None:
        return "n/a"
    low, high = value.get("low"), value.get("high")
    text = f"{value['estimate']:+.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return text


def markdown(summary: dict, plots: list[str], train_k: int) -> str:
    bank, settings, gain = summary["bank"], summary["settings"], summary["gain"]
    ks = [str(k) for k in settings["ks"]]
    lines = [
        "# Fixed-context diagnostic",
        "",
        f"`{summary['command']}` — {summary['date']}, {summary['machine']['platform']}, "
        f"{summary['machine']['cpu_count']} CPUs, device {settings['device']} ({settings['dtype']}), "
        f"{summary['wall_s']:.0f} s.",
        "",
        f"- Teacher `{summary['models']['teacher']}`; θ0 `{summary['models']['student']}`; θτ: "
        f"{summary['models']['theta_tau']}.",
        f"- Bank: {bank['rollouts']} rollouts of {bank['prompts']} prompts, first {bank['response_tokens']} "
        f"response tokens, {bank['positions']} positions (mean length {bank['mean_response_length']:.1f}); "
        f"vocabulary {bank['vocabulary']}.",
        f"- K = {', '.join(ks)}; selection masks at K = {train_k} with "
        f"{settings['compatibility_for_masks']} C; "
        f"teacher top-{settings['teacher_topk']} for the loss. Training: {settings['loss']}, "
        f"{settings['train_steps']} full-batch Adam steps, lr {settings['lr']:g}.",
        "- G_t = KL(p_T||p_θ0) − KL(p_T||p_θτ), full-vocabulary forward KL (Eq. 1), in nats: the ABSOLUTE "
        "gain is primary. The RELATIVE gain of a set is ΣG / ΣKL(p_T||p_θ0) over it.",
        f"- Intervals: 95% percentile, prompt-clustered bootstrap, {settings['bootstrap']} resamples.",
        "",
        "## Gain of θτ on the bank",
        "",
        "| mean G (nats) | relative gain | mean KL θ0 | mean KL θτ | share G > 0 |",
        "|---|---|---|---|---|",
        f"| {_ci(gain['mean_gain'], 4)} | {_ci(gain['relative_gain'])} | {gain['mean_kl_initial']:.4f} | "
        f"{gain['mean_kl_trained']:.4f} | {gain['share_positive']:.3f} |",
        "",
        "## Spearman correlation of G with θ0's scores",
        "",
        "| score | " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    by_k = summary["spearman"]["by_k"]
    for name in next(iter(by_k.values())):
        lines.append(f"| {name} | " + " | ".join(_ci(by_k[k][name]) for k in ks) + " |")
    for name, value in summary["spearman"]["global"].items():
        lines.append(f"| {name} (no K) | {_ci(value)} |" + " |" * (len(ks) - 1))
    lines += [
        "",
        "`teachability_minus_raw_kl` is the paired difference ρ(G, s) − ρ(G, D̃) on the same resamples. "
        "`forward_kl_0` shares a term with G (G = KL0 − KLτ), so its correlation is partly mechanical.",
        "",
        "## Standardised regressions of G",
        "",
        "Base: G ~ H̃ + D̃ + H̃·D̃ + position + teacher entropy. Split: D̃ = D^L + D^I replaces D̃ "
        "(D^L = D̃C̃, D^I = D̃(1 − C̃), interactions with H̃ likewise). Coefficients of z-scored variables.",
        "",
        "| K | β D (base) | β D^L | β D^I | β_L − β_I | R² base | R² split | ΔR² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        r = summary["regression"][k]
        lines.append(
            f"| {k} | {_ci(r['base']['D'])} | {_ci(r['split']['D_L'])} | {_ci(r['split']['D_I'])} | "
            f"{_ci(r['beta_l_minus_beta_i'])} | {_ci(r['base']['r2'])} | {_ci(r['split']['r2'])} | "
            f"{_ci(r['delta_r2'], 4)} |"
        )
    lines += [
        "",
        "## Inside Q3: top vs bottom third by exact C",
        "",
        "Q3 = H̃ below its bank median and D̃ at or above its median (fixed on the whole bank, as are the "
        "thirds).",
        "",
        "| K | Q3 positions | third | mean C top / bottom | mean G top | mean G bottom | gap (absolute) | "
        "gap (relative) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        q = summary["q3"][k]
        c_top, c_bottom = q["top_third_mean_c"], q["bottom_third_mean_c"]
        c_text = f"{c_top:.3f} / {c_bottom:.3f}" if c_top is not None and c_bottom is not None else "n/a"
        lines.append(
            f"| {k} | {q['q3_positions']} | {q['third_size']} | {c_text} | {_ci(q['top_third_mean_gain'])} | "
            f"{_ci(q['bottom_third_mean_gain'])} | {_ci(q['gap'])} | {_ci(q['relative_gap'])} |"
        )
    lines += _matched_and_training(summary)
    lines += _paper_comparison(summary)
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += ["", "Per-position values: `tokens.parquet`; every number above: `summary.json`.", ""]
    return "\n".join(lines)


def _by_selector(entries: dict, budgets: list[float]) -> dict[str, dict[float, dict]]:
    table: dict[str, dict[float, dict]] = {}
    for name, entry in entries.items():
        selector, budget = name.rsplit("@", 1)
        table.setdefault(selector, {})[float(budget)] = entry
    return table


def _matched_and_training(summary: dict) -> list[str]:
    budgets = summary["settings"]["budgets"]
    header = "| selector | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |"
    rule = "|---|" + "---|" * len(budgets)
    lines = [
        "",
        "## Matched top-N: mean G of each selector's top ρ·N positions under θτ",
        "",
        "Scores from θ0; the same N for every selector at a budget. Cells: mean G [interval] "
        "(relative gain).",
        "",
        header,
        rule,
    ]
    for selector, cells in _by_selector(summary["matched_top_n"], budgets).items():
        lines.append(
            f"| {selector} | "
            + " | ".join(
                f"{_ci(cells[b]['mean_gain'])} ({_ci({'estimate': cells[b]['relative_gain']['estimate']})})"
                if b in cells
                else ""
                for b in budgets
            )
            + " |"
        )
    runs = summary["masked_training"]
    masked = {name: run for name, run in runs.items() if "selector" in run}
    if not runs:
        return lines
    lines += [
        "",
        "## Masked training on the frozen bank (Table 2)",
        "",
        "θ0 trained on the bank with each selector's mask (from θ0's scores), equal steps and learning rate. "
        "Cells: bank-mean G [interval]; below it, relative gain and gain per kept token "
        "(ΣG / kept positions).",
        "",
        header,
        rule,
    ]
    for selector, cells in _by_selector(masked, budgets).items():
        lines.append(
            f"| {selector} | "
            + " | ".join(_ci(cells[b]["mean_gain"], 4) if b in cells else "" for b in budgets)
            + " |"
        )
        lines.append(
            "| ↳ relative / per kept | "
            + " | ".join(
                f"{cells[b]['relative_gain']['estimate']:+.3f} / {cells[b]['gain_per_kept_token']:+.3f}"
                if b in cells
                else ""
                for b in budgets
            )
            + " |"
        )
    keep = {run["budget"]: run["keep_ratio"] for run in masked.values()}
    lines += [
        "",
        "Actual keep ratios: " + ", ".join(f"{100 * b:g}%: {100 * r:.2f}%" for b, r in sorted(keep.items())),
    ]
    if "full" in runs:
        full = runs["full"]
        lines.append(
            f"Full (every position, the θτ above): mean G {_ci(full['mean_gain'], 4)}, relative "
            f"{full['relative_gain']['estimate']:+.3f}, per kept token {full['gain_per_kept_token']:+.4f}."
        )
    return lines


def _paper_comparison(summary: dict) -> list[str]:
    lines = [
        "",
        "## Beside the paper",
        "",
        "The paper's numbers are for Qwen3 pairs on 57,600 positions; the spec does not say which gain unit "
        "each uses (the authors' scripts store relative gains), so both of ours are given.",
        "",
        "| quantity | paper | ours (absolute G) | ours (relative) |",
        "|---|---|---|---|",
    ]
    for k, r in summary["regression"].items():
        lines.append(
            f"| β D^L vs β D^I, K = {k} | {PAPER['beta_l']} vs {PAPER['beta_i']} | "
            f"{_ci(r['split']['D_L'])} vs {_ci(r['split']['D_I'])} | (regression on absolute G only) |"
        )
    for k, q in summary["q3"].items():
        lines.append(
            f"| Q3 top − bottom third by C, K = {k} | {PAPER['q3_gap']} | {_ci(q['gap'])} | "
            f"{_ci(q['relative_gap'])} |"
        )
    runs = summary["masked_training"]
    for selector, paper_value in PAPER["table2_5pct"].items():
        run = runs.get(f"{selector}@0.05")
        if run:
            lines.append(
                f"| Table 2, 5%: {selector} | {paper_value} | {_ci(run['mean_gain'], 4)} | "
                f"{_ci(run['relative_gain'])} |"
            )
    for budget, paper_value in PAPER["budget_curve_teachability"].items():
        run = runs.get(f"teachability@{budget:g}")
        if run:
            lines.append(
                f"| budget curve, TA-OPD {100 * budget:g}% | {paper_value} | {_ci(run['mean_gain'], 4)} | "
                f"{_ci(run['relative_gain'])} |"
            )
    return lines
