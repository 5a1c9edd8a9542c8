#!/usr/bin/env bash
# Join this machine to a running TA-OPD Ray cluster (docs/multinode.md).
#
#   HEAD_ADDRESS=10.0.0.1:6379 NUM_GPUS=8 bash recipes/multinode/start-worker.sh
#
# Declare this node's resources here (see start-head.sh: a job cannot declare them).
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${HEAD_ADDRESS:?set HEAD_ADDRESS to the head node address <ip>:<port>}"
: "${NUM_GPUS:=$(nvidia-smi -L 2>/dev/null | wc -l)}"
: "${NUM_CPUS:=$(nproc)}"
: "${NODE_IP:=$(hostname -I | awk '{print $1}')}"

# The head's token (start-head.sh): ~/.ray/auth_token on a shared home, or RAY_AUTH_TOKEN.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

ray start --address "$HEAD_ADDRESS" --node-ip-address "$NODE_IP" \
    --num-cpus "$NUM_CPUS" --num-gpus "$NUM_GPUS" "$@"
