"""What the driver (TA-OPD's trainer) and the actor workers (the loss callable) exchange, in one place.

Torch only. The driver marks each forward with a phase (a non-tensor flag of the batch); the workers return
per-token fields, which verl's collect writes to TransferQueue and every later micro-batch receives; the
teacher's entries travel as verl's ``teacher_ids`` / ``teacher_logprobs`` rows.

Teacher-row layout (both teachers write it): row t describes token t + 1 and holds ``topk + 1`` columns,
the teacher's top-``topk`` ids / log-probs, then the sampled token's id / log-prob (real even when the
token is outside the teacher's top-K). A processor output must be one value per token, so the colocated
teacher sends each column as its own per-token field (`teacher_entry_fields`) and the driver stacks them
into rows (`stack_teacher_rows`).
"""

from __future__ import annotations

import torch

# Non-tensor flag the trainer sets on a batch to tell the loss callable which forward it is in.
PHASE_KEY = "ta_opd_phase"
SCORE_PHASE = "score"
TRAIN_PHASE = "train"
# Non-tensor flag of the update: the trainer's global step (workers record what they trained on under it).
STEP_KEY = "ta_opd_step"

# Per-token fields the scoring forward returns.
DISAGREEMENT_FIELD = "ta_opd_disagreement"
COMPATIBILITY_FIELD = "ta_opd_compatibility"
# Only with entropy_mode=topk; with the paper's full-vocabulary entropy, verl's own `entropy` output is H.
TOPK_ENTROPY_FIELD = "ta_opd_topk_entropy"
# D and C as ``compatibility=lower_bound`` would give them from the same teacher top-K: returned by the
# colocated teacher beside exact C when a selection dump is written, to show what exact C changes.
LOWER_BOUND_DISAGREEMENT_FIELD = "ta_opd_lower_bound_disagreement"
LOWER_BOUND_COMPATIBILITY_FIELD = "ta_opd_lower_bound_compatibility"
# Per-token field of the colocated teacher's scoring forward with a special-token map: the teacher's
# probability on ids with no student counterpart (`ta_opd_verl.special_tokens`).
TEACHER_ORPHAN_MASS_FIELD = "ta_opd_teacher_orphan_mass"
# Per-sample field the driver stores for the colocated teacher with a teacher-side prompt
# (`ta_opd_verl.teacher_prompts`): the teacher's prompt ids, in the teacher's ids.
TEACHER_PROMPT_IDS_FIELD = "ta_opd_teacher_prompt_ids"
# Per-token field of the update's forward with a reverse-KL loss (`ta_opd_verl.config.LOGITS_LOSSES`).
REVERSE_KL_FIELD = "ta_opd_reverse_kl"

# The driver's selection travels to the update as verl's own loss mask.
SELECTION_FIELD = "loss_mask"
TEACHER_IDS_FIELD = "teacher_ids"
TEACHER_LOGPROBS_FIELD = "teacher_logprobs"

# The colocated teacher's rows as per-token fields: column i of the top-K, then the sampled token.
TEACHER_ID_FIELD = "ta_opd_teacher_id_{}"
TEACHER_LOGPROB_FIELD = "ta_opd_teacher_logprob_{}"
SAMPLED_ID_FIELD = "ta_opd_teacher_sampled_id"
SAMPLED_LOGPROB_FIELD = "ta_opd_teacher_sampled_logprob"


class TeacherLayoutError(RuntimeError):
    """The teacher entries do not have the layout TA-OPD needs (top-K plus the sampled token)."""


def split_teacher_entries(
    teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``[..., topk + 1]`` teacher rows into the top-K ids, their log-probs and the sampled token's
    log-prob. Raises when the sampled-token column is missing (verl's stock teacher server drops it)."""
    width = teacher_ids.shape[-1]
    if width != topk + 1:
        raise TeacherLayoutError(
            f"TA-OPD expects {topk} + 1 teacher entries per position (top-{topk} plus the sampled token), "
            f"got {width}. The teacher servers must run TA-OPD's vLLM server "
            "(trainer.v1.trainer_mode=ta_opd installs it); verl's stock server drops the sampled token's "
            "log-prob when it is outside the teacher's top-K."
        )
    return teacher_ids[..., :topk], teacher_logprobs[..., :topk], teacher_logprobs[..., topk]


def teacher_entry_fields(topk: int) -> list[str]:
    """Names of the per-token fields that carry the teacher rows: K ids, the sampled id, K log-probs, the
    sampled log-prob."""
    ids = [TEACHER_ID_FIELD.format(i) for i in range(topk)]
    logprobs = [TEACHER_LOGPROB_FIELD.format(i) for i in range(topk)]
    return [*ids, SAMPLED_ID_FIELD, *logprobs, SAMPLED_LOGPROB_FIELD]


def teacher_entry_outputs(
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_logprobs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``[N, topk]`` top entries and ``[N]`` sampled-token entries as `teacher_entry_fields`, each
    ``(1, N)`` as a processor returns per-token values."""
    outputs = {}
    for i in range(top_ids.shape[-1]):
        outputs[TEACHER_ID_FIELD.format(i)] = top_ids[:, i].unsqueeze(0)
        outputs[TEACHER_LOGPROB_FIELD.format(i)] = top_logprobs[:, i].unsqueeze(0)
    outputs[SAMPLED_ID_FIELD] = sampled_ids.unsqueeze(0)
    outputs[SAMPLED_LOGPROB_FIELD] = sampled_logprobs.unsqueeze(0)
    return outputs


def stack_teacher_rows(fields, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token fields of one batch (nested, one value per sequence position) as ``teacher_ids`` /
    ``teacher_logprobs``: nested ``[positions, topk + 1]`` rows in the layout of the module docstring."""
    id_names = [TEACHER_ID_FIELD.format(i) for i in range(topk)] + [SAMPLED_ID_FIELD]
    logprob_names = [TEACHER_LOGPROB_FIELD.format(i) for i in range(topk)] + [SAMPLED_LOGPROB_FIELD]
    offsets = fields[SAMPLED_ID_FIELD].offsets()
    ids = torch.stack([fields[name].values() for name in id_names], dim=-1).to(torch.int32)
    logprobs = torch.stack([fields[name].values() for name in logprob_names], dim=-1).float()
    return (
        torch.nested.nested_tensor_from_jagged(ids, offsets),
        torch.nested.nested_tensor_from_jagged(logprobs, offsets),
    )


def padded(tensor: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """A nested (jagged) tensor as a padded one; a dense tensor as it is."""
    return tensor.to_padded_tensor(fill) if tensor.is_nested else tensor
