#!/usr/bin/env bash
# TA-OPD: DeepSeek-R1-Distill-Qwen-14B teacher -> Qwen2.5-3B student on DAPO-Math prompts (the paper's
# Table 3, fourth row), one 8-GPU node: 4 GPUs for the student, 4 for verl's vLLM teacher servers.
#
#   bash recipes/r1-distill-qwen-14b-to-qwen2.5-3b.sh [hydra overrides...]
#
# Vocabularies. The two models share Qwen2's byte-level BPE (151,643 regular tokens, same ids) but not
# their added tokens: from id 151,643 on, the student's ChatML tokens (<|endoftext|>, <|im_start|>,
# <|im_end|>, ...) sit where the teacher has DeepSeek's (<｜end▁of▁sentence｜>, <｜User｜>, <｜Assistant｜>,
# ...), and the embeddings have 151,936 (student) and 152,064 (teacher) rows. The pre-flight vocabulary
# check (ta_opd_verl/vocab.py, run by ta_opd_verl/checks.py before Ray starts) accepts exactly this:
# regular tokens must match id by id, added tokens may differ, logits are compared on the 151,936 common
# ids, and every student id must lie inside the teacher's embedding. The teacher reads its own format:
# the special-token map (`ta_opd.special_token_map=auto`, the default) turns the student's <|im_end|>
# (151,645) into the teacher's <｜end▁of▁sentence｜> (151,643) and maps the teacher's ids back, and the
# teacher scores each response after the conversation rendered with ITS chat template
# (`ta_opd.teacher_prompt=teacher_template`, set below; TEACHER_PROMPT=student gives the student's prompt
# ids instead). docs/recipes.md, "DeepSeek-R1-Distill-Qwen-14B -> Qwen2.5-3B".
#
# Shared settings and every environment variable: recipes/common.sh. Data: `ta-opd prepare-data`.
set -euo pipefail

# ---- user-adjustable (the environment overrides each value) ----
: "${STUDENT_NAME:=Qwen2.5-3B}"                    # paper
: "${TEACHER_NAME:=DeepSeek-R1-Distill-Qwen-14B}"  # paper
: "${STUDENT_GPUS:=4}"                             # our default
: "${TEACHER_GPUS:=4}"                             # our default
: "${TEACHER_TP:=2}"                               # our default, as for Qwen3-14B
: "${TEACHER_PROMPT:=teacher_template}"            # our default: the teacher's own chat template

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
overrides+=(distillation.distillation_loss.ta_opd.teacher_prompt="$TEACHER_PROMPT")

ta_opd_run "$PYTHON" -m verl.trainer.main_ppo --config-path "$CONF" --config-name ta_opd_trainer \
    "${overrides[@]}" "$@"
