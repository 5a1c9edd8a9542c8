#!/usr/bin/env bash
# NOT YET RUNNABLE: TA-OPD with a Qwen3-4B teacher and a Qwen3-1.7B student on ONE GPU.
#
# verl 0.9.1 cannot give its teacher servers a GPU that training also uses: the teacher gets a Ray
# resource pool of its own (distillation.n_gpus_per_node x distillation.nnodes, one whole GPU per
# placement-group bundle), verl checks before start-up that the cluster has the student's GPUs plus the
# teacher's, and there is no fractional or shared teacher pool. Declaring two logical GPUs to Ray on a
# one-GPU machine does not help either: the teacher process is then pinned to a device index (1) that
# does not exist. So verl's OPD needs at least two GPUs (see the pair recipes).
#
# This recipe uses the colocated FSDP teacher (`ta_opd.teacher=fsdp`: the teacher in the actor's worker
# processes, FSDP2-sharded and offloaded between uses, run in the scoring forward; verl's teacher pool is
# not started), which also gives the exact compatibility C. The teacher is built and tested on CPU
# (tests/verl/test_teacher_colocated*.py), but no run of this recipe on a GPU is recorded yet, so the
# script still stops before launching. TA_OPD_PRINT_OVERRIDES=1 prints its arguments.
#
# Shared settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${STUDENT_NAME:=Qwen3-1.7B}"   # paper
: "${TEACHER_NAME:=Qwen3-4B}"     # paper
: "${STUDENT_GPUS:=1}"            # our default: the one GPU
: "${TRAIN_BATCH_SIZE:=16}"       # our default: one GPU's worth of rollouts per step
: "${PPO_MINI_BATCH_SIZE:=4}"     # our default
: "${MAX_RESPONSE_LENGTH:=4096}"  # our default

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

overrides+=(
    distillation.distillation_loss.ta_opd.teacher=fsdp
    distillation.distillation_loss.ta_opd.teacher_path="$TEACHER"
    # The colocated teacher scores the student's own top-K ids: the exact C of Eq. 10.
    distillation.distillation_loss.ta_opd.compatibility=exact
    # Actor, teacher and the student's vLLM share the GPU: offload what waits, and a smaller KV cache.
    actor_rollout_ref.actor.fsdp_config.param_offload=True
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True
    actor_rollout_ref.rollout.gpu_memory_utilization=0.35
)

if [[ "${TA_OPD_PRINT_OVERRIDES:-0}" != 1 ]]; then
    echo "recipes/$(basename "$0"): not yet runnable: the colocated FSDP teacher has not been run on a" \
        "GPU yet (see the comment at the top)." >&2
    exit 3
fi
ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
    "${overrides[@]}" "$@"
