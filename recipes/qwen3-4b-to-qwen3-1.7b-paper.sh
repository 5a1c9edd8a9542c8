#!/usr/bin/env bash
# TA-OPD as the paper writes it: recipes/qwen3-4b-to-qwen3-1.7b.sh (Qwen3-4B teacher -> Qwen3-1.7B student,
# the paper's Table 3, first row) with the `paper` preset: Eqs. 7-17 as written, D from the true
# log-probabilities with no floor, the sampled-token advantage from the old log-prob, the plain PPO clip,
# and no clamp of the advantage. Everything else as that recipe.
#
#   bash recipes/qwen3-4b-to-qwen3-1.7b-paper.sh [hydra overrides...]
#
# Which behaviour each preset reproduces: docs/algorithm.md, "Presets". Shared settings and every
# environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${PRESET:=paper}"  # paper: Eqs. 7-17 as written
export PRESET

# verl's keys a preset cannot set (it sets the `ta_opd` block only), before the caller's overrides.
exec bash "$(dirname "${BASH_SOURCE[0]}")/qwen3-4b-to-qwen3-1.7b.sh" \
    distillation.distillation_loss.loss_max_clamp=null \
    "$@"
