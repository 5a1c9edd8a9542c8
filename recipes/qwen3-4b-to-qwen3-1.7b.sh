#!/usr/bin/env bash
# TA-OPD: Qwen3-4B teacher -> Qwen3-1.7B student on DAPO-Math prompts (the paper's Table 3, first row),
# one 8-GPU node: 4 GPUs for the student (FSDP actor + vLLM rollout), 4 for verl's vLLM teacher servers.
#
#   bash recipes/qwen3-4b-to-qwen3-1.7b.sh [hydra overrides...]
#   SELECTOR=entropy RATIO=0.05 SEED=1 bash recipes/qwen3-4b-to-qwen3-1.7b.sh
#
# Shared settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${STUDENT_NAME:=Qwen3-1.7B}"  # paper
: "${TEACHER_NAME:=Qwen3-4B}"    # paper
: "${STUDENT_GPUS:=4}"           # our default
: "${TEACHER_GPUS:=4}"           # our default
: "${TEACHER_TP:=1}"             # our default: a 4B teacher fits on one GPU, 4 replicas

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
    "${overrides[@]}" "$@"
