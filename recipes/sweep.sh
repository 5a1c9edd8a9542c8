#!/usr/bin/env bash
# Selector x budget x training seed, one pair recipe, runs one after another.
#
#   bash recipes/sweep.sh --dry-run                                  # print the commands, run nothing
#   bash recipes/sweep.sh --recipe recipes/qwen3-8b-to-qwen3-4b.sh -- trainer.total_training_steps=100
#   SELECTORS="teachability entropy" RATIOS="0.03 0.05" SEEDS="0 1 2 3" bash recipes/sweep.sh
#
# The paper reports one training run per setting and leaves the 1% and 20% budgets open downstream;
# several seeds per cell are what makes a selector comparison meaningful. `full` (plain OPD, every
# position) ignores the budget and runs once per seed. Each run has its own experiment name (selector,
# budget, seed), hence its own checkpoint folder: rerunning the sweep after an interruption resumes each
# run from its last checkpoint (verl's trainer.resume_mode=auto). Overrides after `--` go to every run.
# Every selector, budget and seed is checked before the first run (recipes/checks.sh): one refused value
# prints one line naming it and exits with status 2, running and printing nothing.
set -euo pipefail
# SELECTORS, RATIOS and SEEDS are split at spaces, never expanded as file patterns.
set -o noglob

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=checks.sh
source "$RECIPES_DIR/checks.sh"

# ---- user-adjustable (the environment overrides each value) ----
: "${SELECTORS:=teachability entropy raw_kl tip random}"  # the paper's selectors at equal budget
: "${RATIOS:=0.01 0.03 0.05 0.10 0.20}"                   # the paper's 1-10% plus 20%
: "${SEEDS:=0 1 2}"                                       # our default: three training seeds
: "${BASELINE_FULL:=1}"                                   # also run `full` once per seed (0: skip)

usage() {
    echo "usage: $0 [--dry-run] [--recipe PATH] [-- hydra overrides...]" >&2
    exit 2
}

recipe="$RECIPES_DIR/qwen3-4b-to-qwen3-1.7b.sh"
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --recipe) [[ $# -ge 2 ]] || usage; recipe="$2"; shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
[[ -f "$recipe" ]] || { echo "$0: no recipe at $recipe" >&2; exit 2; }

for ratio in $RATIOS; do
    require_ratio RATIOS "$ratio"
done
for seed in $SEEDS; do
    require_non_negative_integer SEEDS "$seed"
done
[[ "$BASELINE_FULL" == 0 || "$BASELINE_FULL" == 1 ]] ||
    refuse_value BASELINE_FULL "$BASELINE_FULL" "1 (also run \`full\` once per seed) or 0"
ask_python_for_selectors
for selector in $SELECTORS; do
    require_selector SELECTORS "$selector"
done

runs=()
for seed in $SEEDS; do
    if [[ "$BASELINE_FULL" == 1 ]]; then
        runs+=("full 1.0 $seed")
    fi
    for selector in $SELECTORS; do
        for ratio in $RATIOS; do
            runs+=("$selector $ratio $seed")
        done
    done
done

[[ ${#runs[@]} -gt 0 ]] || refuse "nothing to run: SEEDS, or SELECTORS or RATIOS with BASELINE_FULL=0, is empty"
for run in "${runs[@]}"; do
    read -r selector ratio seed <<<"$run"
    command=(env SELECTOR="$selector" RATIO="$ratio" SEED="$seed" bash "$recipe" "$@")
    if [[ "$dry_run" == 1 ]]; then
        printf '%q ' "${command[@]}"
        printf '\n'
    else
        echo "[sweep] selector=$selector ratio=$ratio seed=$seed" >&2
        "${command[@]}"
    fi
done
