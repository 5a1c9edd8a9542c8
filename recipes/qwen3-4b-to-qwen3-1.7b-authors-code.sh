#!/usr/bin/env bash
# TA-OPD as the authors' code runs it: recipes/qwen3-4b-to-qwen3-1.7b.sh (Qwen3-4B teacher -> Qwen3-1.7B
# student) with the `authors_code` preset (every behaviour of github:ckjsuperhh/taopd-baseline that their
# golden vectors pin; the random selector's stream excepted) and the settings of their training scripts
# (TA-OPD/scripts/train/run_opd_budget_ratio_sweep.sh calling
# TA-OPD/examples/on_policy_distillation/run-qwen3-1.7B-sampled-opd-sglang.sh): 4 prompts x 2 responses of
# at most 64 tokens per step, one update per step, 50 steps, the teacher's top 16, no clamp, Adam with
# weight decay 0.1 and beta2 0.98. The placement stays that recipe's (their scripts: one GPU for the
# teacher, one or two for the student).
#
#   bash recipes/qwen3-4b-to-qwen3-1.7b-authors-code.sh [hydra overrides...]
#
# Which behaviour each preset reproduces, and what no setting can: docs/algorithm.md, "Presets". Shared
# settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${PRESET:=authors_code}"       # authors' code
: "${TEACHER_TOPK:=16}"           # authors: --opd-topk-metrics-k 16, the teacher's list holds K entries
: "${TRAIN_BATCH_SIZE:=4}"        # authors: --rollout-batch-size 4
: "${ROLLOUT_N:=2}"               # authors: --n-samples-per-prompt 2
: "${PPO_MINI_BATCH_SIZE:=4}"     # authors: --global-batch-size 8 = 4 x 2, one update per step
: "${MAX_RESPONSE_LENGTH:=64}"    # authors: ROLLOUT_MAX_RESPONSE_LEN=64
: "${TOTAL_STEPS:=50}"            # authors: NUM_ROLLOUT=50
: "${WEIGHT_DECAY:=0.1}"          # authors: --weight-decay 0.1
: "${ADAM_BETA2:=0.98}"           # authors: --adam-beta1 0.9 --adam-beta2 0.98
export PRESET TEACHER_TOPK TRAIN_BATCH_SIZE ROLLOUT_N PPO_MINI_BATCH_SIZE MAX_RESPONSE_LENGTH TOTAL_STEPS

# verl's keys a preset cannot set (it sets the `ta_opd` block only), before the caller's overrides.
exec bash "$(dirname "${BASH_SOURCE[0]}")/qwen3-4b-to-qwen3-1.7b.sh" \
    distillation.distillation_loss.loss_max_clamp=null \
    actor_rollout_ref.actor.optim.weight_decay="$WEIGHT_DECAY" \
    "actor_rollout_ref.actor.optim.betas=[0.9,$ADAM_BETA2]" \
    "$@"
