#!/usr/bin/env bash
# TA-OPD: Qwen3-8B teacher -> Qwen3-4B student on DAPO-Math prompts (the paper's Table 3, second row),
# one 8-GPU node: 4 GPUs for the student, 4 for verl's vLLM teacher servers.
#
# The paper's teacher is a GRPO-tuned Qwen3-8B that is not published: this recipe uses the released
# Qwen/Qwen3-8B instead, so its numbers are not the paper's. Point TEACHER at your own GRPO checkpoint
# (a Hugging Face folder) to get closer.
#
#   bash recipes/qwen3-8b-to-qwen3-4b.sh [hydra overrides...]
#
# Shared settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${STUDENT_NAME:=Qwen3-4B}"  # paper
: "${TEACHER_NAME:=Qwen3-8B}"  # our default: the paper's Qwen3-8B-GRPO is not published
: "${STUDENT_GPUS:=4}"         # our default
: "${TEACHER_GPUS:=4}"         # our default
: "${TEACHER_TP:=1}"           # our default: an 8B teacher fits on one GPU, 4 replicas

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
    "${overrides[@]}" "$@"
