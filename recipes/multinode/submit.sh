#!/usr/bin/env bash
# Submit a TA-OPD recipe as a Ray job to a running multi-node cluster (docs/multinode.md).
#
#   DASHBOARD=http://10.0.0.1:8265 NNODES=1 STUDENT_GPUS=8 TEACHER_NNODES=1 TEACHER_GPUS=8 \
#     bash recipes/multinode/submit.sh recipes/qwen3-14b-to-qwen3-4b.sh [hydra overrides...]
#
# The recipe's variables (NNODES, STUDENT_GPUS, TEACHER_NNODES, TEACHER_GPUS, TEACHER_TP, OUTPUT_DIR,
# MODEL_DIR, DATA_DIR, ...; recipes/common.sh) are passed on to the job. The recipe runs on the head
# node and its paths must exist there; OUTPUT_DIR, MODEL_DIR and DATA_DIR must be storage every node
# mounts at the same path.
set -euo pipefail

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- user-adjustable (the environment overrides each value) ----
: "${DASHBOARD:=http://127.0.0.1:8265}"        # the head node's dashboard address
: "${RUNTIME_ENV:=$RECIPES_DIR/multinode/runtime_env.yaml}"

[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE [hydra overrides...]" >&2; exit 2; }
recipe="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift

# The recipe's settings travel as `env NAME=value` in front of the entry point.
settings=()
for name in NNODES STUDENT_GPUS ROLLOUT_TP TEACHER_NNODES TEACHER_GPUS TEACHER_TP OUTPUT_DIR MODEL_DIR \
    DATA_DIR STUDENT TEACHER TRAIN_FILES VAL_FILES PRESET SELECTOR RATIO K MIN_KEEP_PER_SAMPLE SEED TOTAL_STEPS \
    EXPERIMENT PYTHON CONF; do
    if [[ -n "${!name:-}" ]]; then
        settings+=("$name=${!name}")
    fi
done

# The head's token (start-head.sh): ~/.ray/auth_token on a shared home, or RAY_AUTH_TOKEN.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

exec ray job submit --address "$DASHBOARD" --runtime-env "$RUNTIME_ENV" \
    -- env "${settings[@]}" bash "$recipe" "$@"
