# shellcheck shell=bash
# The shared part of the TA-OPD recipes (recipes/*.sh): defaults, the override arrays, and the launcher.
# Sourced, never run: a recipe sets STUDENT_NAME and TEACHER_NAME (and any pair-specific default), sources
# this file, adds its own overrides, then calls
#
#   ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
#     "${overrides[@]}" "$@"
#
# Every variable below can be set in the environment (`RATIO=0.05 SEED=1 bash recipes/<pair>.sh`), and
# any Hydra override can follow the script's name (`bash recipes/<pair>.sh trainer.total_training_steps=50`).
# Each default says where it comes from: `# paper` (arXiv 2605.26844 states it) or `# our default`.
#
# TA_OPD_PRINT_OVERRIDES=1 prints the command instead of running it, as one line a shell can run
# (`eval "$(TA_OPD_PRINT_OVERRIDES=1 bash recipes/<pair>.sh)"`) and Python's shlex.split can read
# (tests/tools/test_recipes.py checks every recipe that way against verl's config classes without a GPU).
# Either way the variables are checked first (recipes/checks.sh): a refused value prints one line naming
# it and exits with status 2, and nothing is run or printed as a command.

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# ---- user-adjustable: where things are ----
# PYTHON: the interpreter that runs verl; default: the clone's .venv, else python3 (recipes/checks.sh).
# shellcheck source-path=SCRIPTDIR source=checks.sh
source "$RECIPES_DIR/checks.sh"
# The clone's Hydra configs; from an installed wheel use CONF=pkg://ta_opd_verl.conf.
: "${CONF:=$(cd "$RECIPES_DIR/../conf" && pwd)}"
# Local model folders (`hf download Qwen/Qwen3-1.7B --local-dir "$MODEL_DIR/Qwen3-1.7B"`): the pre-flight
# check reads each folder's tokenizer to compare the vocabularies, so hub ids are refused.
: "${MODEL_DIR:=$HOME/models}"                                    # our default
: "${STUDENT:=$MODEL_DIR/$STUDENT_NAME}"
: "${TEACHER:=$MODEL_DIR/$TEACHER_NAME}"
# `ta-opd prepare-data dapo-math --out "$DATA_DIR/dapo-math" ...` writes these two files.
: "${DATA_DIR:=$HOME/data/ta-opd}"                                # our default
: "${TRAIN_FILES:=$DATA_DIR/dapo-math/train.parquet}"             # paper: DAPO-Math prompts
# The paper evaluates on AIME24/25, GPQA-D, HumanEval, IFEval and MATH-500 after training; during
# training we validate on held-out DAPO-Math prompts (add "$DATA_DIR/gsm8k/test.parquet" for GSM8K).
: "${VAL_FILES:=$DATA_DIR/dapo-math/val.parquet}"                 # our default
# Checkpoints and metrics. On a multi-node run this must be storage every node mounts at the same path.
: "${OUTPUT_DIR:=$HOME/ta-opd-runs}"                              # our default

# ---- user-adjustable: TA-OPD ----
# A preset sets TA-OPD's method keys together: paper (Eqs. 7-17 as written) or authors_code (the authors'
# code); empty: our defaults (docs/algorithm.md, "Presets"). The *-paper.sh and *-authors-code.sh recipes
# set it with the rest of their settings.
: "${PRESET:=}"                   # our default: none
: "${SELECTOR:=teachability}"     # paper (baselines: full, entropy, raw_kl, tip, random, ...)
: "${RATIO:=0.10}"                # paper: the budget of its main table (its abstract's default is 0.05)
: "${K:=16}"                      # paper: support size of the student and teacher top-K
: "${TEACHER_TOPK:=32}"           # our default: teacher entries per position (verl's YAML default)
: "${MIN_KEEP_PER_SAMPLE:=}"      # empty: the preset's (0 without one, as the paper; authors' code: 1)

# ---- user-adjustable: optimisation ----
: "${LR:=1e-6}"                   # paper: Adam learning rate
: "${CLIP_LOW:=0.2}"              # paper: PPO clip, lower
: "${CLIP_HIGH:=0.28}"            # paper: PPO clip, upper
: "${TEMPERATURE:=1.0}"           # paper: rollout temperature
: "${SEED:=0}"                    # our default: data order, vLLM sampling, the random selectors
: "${TRAIN_BATCH_SIZE:=64}"       # our default: prompts per step
: "${ROLLOUT_N:=4}"               # our default: responses per prompt
: "${PPO_MINI_BATCH_SIZE:=16}"    # our default: prompts per update (4 updates per step)
: "${MAX_PROMPT_LENGTH:=1024}"    # our default
: "${MAX_RESPONSE_LENGTH:=8192}"  # our default
: "${TOTAL_EPOCHS:=1}"            # our default
: "${TOTAL_STEPS:=}"              # our default: empty = the whole epoch
: "${SAVE_FREQ:=50}"              # our default
: "${TEST_FREQ:=25}"              # our default

# ---- user-adjustable: placement (GPUs of the student's and the teacher's Ray pools) ----
: "${NNODES:=1}"                  # our default: nodes of the student pool (FSDP actor + vLLM rollout)
: "${STUDENT_GPUS:=4}"            # our default: GPUs per node of the student pool
: "${ROLLOUT_TP:=1}"              # our default
: "${TEACHER_NNODES:=1}"          # our default: nodes of the teacher pool (verl's vLLM teacher servers)
: "${TEACHER_GPUS:=4}"            # our default: GPUs per node of the teacher pool
: "${TEACHER_TP:=1}"              # our default: GPUs per teacher replica (replicas = pool / TP)

: "${PROJECT_NAME:=ta_opd}"
: "${EXPERIMENT:=${TEACHER_NAME}-to-${STUDENT_NAME}${PRESET:+-$PRESET}-${SELECTOR}-r${RATIO}-seed${SEED}}"

# ---- checked before anything is printed or run ----
require_ratio RATIO "$RATIO"
require_non_negative_integer SEED "$SEED"
for name in K TEACHER_TOPK ROLLOUT_N TRAIN_BATCH_SIZE PPO_MINI_BATCH_SIZE MAX_PROMPT_LENGTH \
    MAX_RESPONSE_LENGTH TOTAL_EPOCHS NNODES STUDENT_GPUS ROLLOUT_TP TEACHER_NNODES TEACHER_GPUS TEACHER_TP; do
    require_positive_integer "$name" "${!name}"
done
[[ -z "$TOTAL_STEPS" ]] || require_positive_integer TOTAL_STEPS "$TOTAL_STEPS"
[[ -z "$MIN_KEEP_PER_SAMPLE" ]] || require_non_negative_integer MIN_KEEP_PER_SAMPLE "$MIN_KEEP_PER_SAMPLE"
ask_python_for_selectors
require_selector SELECTOR "$SELECTOR"

# Dynamic batching packs micro-batches by tokens: two full-length sequences per GPU forward.
MAX_TOKENS_PER_GPU=$(((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2))

MODEL=(
    actor_rollout_ref.model.path="$STUDENT"
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.model.use_remove_padding=True
)

DATA=(
    data.train_files="$TRAIN_FILES"
    data.val_files="$VAL_FILES"
    data.train_batch_size="$TRAIN_BATCH_SIZE"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=True
    data.truncation=error
    data.seed="$SEED"
)

ACTOR=(
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
    actor_rollout_ref.actor.data_loader_seed="$SEED"
)

ROLLOUT=(
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.temperature="$TEMPERATURE"
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.seed="$SEED"
)

DISTILLATION=(
    distillation.n_gpus_per_node="$TEACHER_GPUS"
    distillation.nnodes="$TEACHER_NNODES"
    distillation.teacher_models.teacher_model.model_path="$TEACHER"
    distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size="$TEACHER_TP"
    # The teacher servers have their GPUs to themselves.
    distillation.teacher_models.teacher_model.inference.gpu_memory_utilization=0.85
    distillation.distillation_loss.topk="$TEACHER_TOPK"
    distillation.distillation_loss.clip_ratio_low="$CLIP_LOW"
    distillation.distillation_loss.clip_ratio_high="$CLIP_HIGH"
    distillation.distillation_loss.ta_opd.selector="$SELECTOR"
    distillation.distillation_loss.ta_opd.ratio="$RATIO"
    distillation.distillation_loss.ta_opd.k="$K"
    distillation.distillation_loss.ta_opd.preset="${PRESET:-null}"
    distillation.distillation_loss.ta_opd.seed="$SEED"
)
if [[ -n "$MIN_KEEP_PER_SAMPLE" ]]; then
    DISTILLATION+=(distillation.distillation_loss.ta_opd.min_keep_per_sample="$MIN_KEEP_PER_SAMPLE")
fi

TRAINER=(
    trainer.n_gpus_per_node="$STUDENT_GPUS"
    trainer.nnodes="$NNODES"
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$EXPERIMENT"
    trainer.default_local_dir="$OUTPUT_DIR/checkpoints/$EXPERIMENT"
    trainer.logger='["console","file"]'
    trainer.total_epochs="$TOTAL_EPOCHS"
    trainer.save_freq="$SAVE_FREQ"
    trainer.test_freq="$TEST_FREQ"
    trainer.val_before_train=True
    # verl's file logger runs in a Ray actor: the variable reaches it through Ray's runtime environment
    # (writes $OUTPUT_DIR/metrics/<project>/<experiment>.jsonl).
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT="$OUTPUT_DIR/metrics"
)
if [[ -n "$TOTAL_STEPS" ]]; then
    TRAINER+=(trainer.total_training_steps="$TOTAL_STEPS")
fi

# Recipes append their pair-specific overrides to this array and pass it to ta_opd_run.
# shellcheck disable=SC2034
overrides=("${MODEL[@]}" "${DATA[@]}" "${ACTOR[@]}" "${ROLLOUT[@]}" "${DISTILLATION[@]}" "${TRAINER[@]}")

# Run a command, or with TA_OPD_PRINT_OVERRIDES=1 print it whole on one line, each word quoted by
# printf %q: `eval` runs the same argv, and shlex.split reads it back.
ta_opd_run() {
    if [[ "${TA_OPD_PRINT_OVERRIDES:-0}" == 1 ]]; then
        local line
        printf -v line '%q ' "$@"
        printf '%s\n' "${line% }"
        return 0
    fi
    exec "$@"
}
