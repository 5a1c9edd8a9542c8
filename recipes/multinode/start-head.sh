#!/usr/bin/env bash
# Start the Ray head node of a TA-OPD cluster on this machine (docs/multinode.md).
#
#   NUM_GPUS=8 bash recipes/multinode/start-head.sh
#
# Resources are declared HERE, not by the job: once a job joins a running cluster, Ray refuses num_cpus
# and num_gpus in ray.init (our GPU config leaves ray_kwargs.ray_init.num_cpus null, as it must be).
# verl reserves 3 Ray CPUs with every GPU of its pools, plus CPUs for TransferQueue, the reward loop and
# the agent loop: declare the node's real cores (the default) or at least 4 per GPU.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${RAY_PORT:=6379}"                         # the cluster's address: <this host>:RAY_PORT
: "${DASHBOARD_PORT:=8265}"                   # where `ray job submit` sends jobs
: "${NUM_GPUS:=$(nvidia-smi -L 2>/dev/null | wc -l)}"
: "${NUM_CPUS:=$(nproc)}"
: "${NODE_IP:=$(hostname -I | awk '{print $1}')}"

# Ray 2.60 protects a cluster with a token when ~/.ray/auth_token exists on the head; nodes joining it,
# `ray job submit` and drivers must then present the same token (the same file through a shared home, or
# RAY_AUTH_TOKEN). Token mode is made explicit and the file created here; Ray before 2.5x has neither.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ray get-auth-token --generate >/dev/null 2>&1 || echo "this Ray has no token authentication" >&2

ray start --head --node-ip-address "$NODE_IP" --port "$RAY_PORT" \
    --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT" \
    --num-cpus "$NUM_CPUS" --num-gpus "$NUM_GPUS" "$@"
echo "head started: join with  HEAD_ADDRESS=$NODE_IP:$RAY_PORT bash recipes/multinode/start-worker.sh"
echo "submit jobs to  http://$NODE_IP:$DASHBOARD_PORT"
