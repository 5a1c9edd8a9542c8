#!/usr/bin/env bash
# TA-OPD: Qwen3-14B teacher -> Qwen3-4B student on DAPO-Math prompts (the paper's Table 3, third row),
# one 8-GPU node: 4 GPUs for the student, 4 for verl's vLLM teacher servers (2 replicas of 2 GPUs).
#
#   bash recipes/qwen3-14b-to-qwen3-4b.sh [hydra overrides...]
#
# Shared settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${STUDENT_NAME:=Qwen3-4B}"   # paper
: "${TEACHER_NAME:=Qwen3-14B}"  # paper
: "${STUDENT_GPUS:=4}"          # our default
: "${TEACHER_GPUS:=4}"          # our default
# our default: 28 GiB of bf16 weights per replica leave little room for the KV cache and the teacher's
# prompt log-probs on one 80 GiB GPU; two GPUs per replica give both room.
: "${TEACHER_TP:=2}"

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
    "${overrides[@]}" "$@"
