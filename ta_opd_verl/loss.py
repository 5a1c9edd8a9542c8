"""The TA-OPD loss inside verl's actor worker: one callable that verl's engine runs as the logits
processor (scoring positions, or the per-token reverse KL of the update) and as the loss (the OPD loss on
the positions the driver selected). How verl calls it: `ta_opd_verl.verl_fence.worker`. What travels
between it and the driver: `ta_opd_verl.protocol`. The loss math: `ta_opd_verl.opd_loss`.
"""

from __future__ import annotations

from typing import Any

import torch

from ta_opd_verl.batch_selection import trained_position_records, write_trained_positions
from ta_opd_verl.config import LOGITS_LOSSES
from ta_opd_verl.opd_loss import (
    clipped_policy_loss,
    masked_aggregate,
    masked_mean,
    reverse_kl_on_teacher_support,
    reverse_kl_topk_tail,
)
from ta_opd_verl.protocol import (
    PHASE_KEY,
    REVERSE_KL_FIELD,
    SCORE_PHASE,
    SELECTION_FIELD,
    STEP_KEY,
    TEACHER_IDS_FIELD,
    TEACHER_LOGPROBS_FIELD,
    TRAIN_PHASE,
    padded,
    split_teacher_entries,
)
from ta_opd_verl.verl_fence.worker import (
    batch_info,
    get_policy_loss_fn,
    kl_penalty,
    no_padding_2_padding,
    non_tensor,
    slice_for_sequence_parallel,
)


class TAOPDLossFunction:
    """The callable verl's actor worker runs as processor and as loss.

    Built on the driver by TA-OPD's trainer and sent to every actor rank with ``set_loss_fn``. In the
    scoring forward (``ta_opd_phase=score``) the processor is the teacher's scoring (``teacher``: a
    `ta_opd_verl.teachers.Teacher`) and the loss is 0; in the update (``ta_opd_phase=train``) the loss is
    the OPD loss on the positions in ``loss_mask`` (the selection)."""

    def __init__(self, actor_config, distillation_config, teacher):
        self.actor_config = actor_config
        self.distillation_config = distillation_config
        self.loss_config = distillation_config.distillation_loss
        self.settings = self.loss_config.ta_opd
        self.teacher = teacher

    def __call__(self, *, data, model_output: dict | None = None, dp_group=None, student_logits=None, **_):
        phase = non_tensor(data, PHASE_KEY)
        if phase not in (SCORE_PHASE, TRAIN_PHASE):
            raise RuntimeError(
                f"TA-OPD loss called without {PHASE_KEY!r} ({phase!r}): the actor's loss was replaced by "
                "TA-OPD but the batch did not come from TA-OPD's trainer (trainer.v1.trainer_mode=ta_opd)."
            )
        if student_logits is not None:
            if phase == SCORE_PHASE:
                return self.teacher.score_micro_batch(self, student_logits, data)
            return {REVERSE_KL_FIELD: self.update_reverse_kl(student_logits, data)}
        if phase == SCORE_PHASE:
            return torch.zeros((), device=model_output["log_probs"].values().device), {}
        return self.training_loss(model_output, data)

    def update_reverse_kl(self, student_logits: torch.Tensor, data) -> torch.Tensor:
        """The update's processor (a loss of `LOGITS_LOSSES`): the loss's per-position reverse KL, ``(1,
        nnz)`` for this rank's ``(1, nnz, V)`` student logits, at the selected positions only (0 elsewhere,
        where the loss does not read it), so its vocabulary-wide work scales with the selection, not N."""
        rows = selected_packed_rows(data)
        student_rows = student_logits[0, rows]
        if self.settings.loss in ("reverse_kl_topk", "reverse_kl_topk_tail"):
            top_ids, top_logprobs = self._teacher_top_entries(data)
            on_teacher_top = (
                reverse_kl_on_teacher_support
                if self.settings.loss == "reverse_kl_topk"
                else reverse_kl_topk_tail
            )
            values = on_teacher_top(student_rows, top_ids[rows], top_logprobs[rows])
        else:
            values = self.teacher.reverse_kl_full(self, student_rows, data, rows)
        per_token = values.new_zeros(student_logits.shape[1])
        return per_token.index_put((rows,), values).unsqueeze(0)

    def _teacher_top_entries(self, data) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's teacher rows of the micro-batch: the top-K ids and log-probs, ``[nnz, K]`` each."""
        teacher_ids = data[TEACHER_IDS_FIELD].values().unsqueeze(0)
        teacher_logprobs = data[TEACHER_LOGPROBS_FIELD].values().unsqueeze(0)
        teacher_ids, teacher_logprobs = slice_for_sequence_parallel(teacher_ids, teacher_logprobs)
        top_ids, top_logprobs, _ = split_teacher_entries(
            teacher_ids[0], teacher_logprobs[0], self.loss_config.topk
        )
        return top_ids, top_logprobs

    def training_loss(self, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
        response_mask = padded(data["response_mask"], False).bool()
        selected = selected_positions(data)
        if self.settings.selection_dump_dir:
            records = trained_position_records(padded(data["responses"], 0), selected, response_mask)
            write_trained_positions(self.settings.selection_dump_dir, non_tensor(data, STEP_KEY), records)
        info = batch_info(data, self.actor_config.loss_scale_factor)
        if self.settings.loss in LOGITS_LOSSES:
            per_token = no_padding_2_padding(model_output[REVERSE_KL_FIELD], data)
            loss = self._aggregate(per_token, selected, info)
            metrics = {"ta_opd/reverse_kl_selected": masked_mean(per_token.detach(), selected)}
            return loss, metrics | {"distillation/loss": loss.detach().item()}
        return self.sampled_token_policy_loss(model_output, data, selected, info)

    def sampled_token_policy_loss(self, model_output: dict, data, selected: torch.Tensor, info: dict):
        """``loss=pg_k1``: the sampled-token OPD loss with the selection as the loss mask: advantage
        -(log p(y) - log p_T(y)) from the current or the old log-prob (``ta_opd.advantage_logprob``),
        PPO-clipped by verl's policy loss, mirrored from verl's ``distillation_loss`` (``ta_opd.dual_clip``
        true), or by the plain clip of the paper and the authors' code (false)."""
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        old_log_prob = padded(data["old_log_probs"], 0.0)
        teacher_ids = no_padding_2_padding(data[TEACHER_IDS_FIELD], data)
        teacher_logprobs = no_padding_2_padding(data[TEACHER_LOGPROBS_FIELD], data)
        _, _, teacher_sampled = split_teacher_entries(teacher_ids, teacher_logprobs, self.loss_config.topk)
        policy_log_prob = old_log_prob if self.settings.advantage_logprob == "old" else log_prob
        per_token = kl_penalty(
            logprob=policy_log_prob, ref_logprob=teacher_sampled.to(log_prob.dtype), kl_penalty="k1"
        )
        clamp = self.loss_config.loss_max_clamp
        if clamp is not None:
            per_token = per_token.clamp(min=-clamp, max=clamp)
        advantages = -per_token.detach()
        if self.settings.dual_clip:
            loss, metrics = self._verl_policy_loss(log_prob, old_log_prob, advantages, selected, data, info)
        else:
            per_token_loss, clipped = clipped_policy_loss(
                log_prob,
                old_log_prob,
                advantages,
                self.loss_config.clip_ratio_low,
                self.loss_config.clip_ratio_high,
            )
            weights = data.get("rollout_is_weights", None)
            if weights is not None:  # verl's rollout correction, applied as its policy loss applies it
                per_token_loss = per_token_loss * padded(weights, 0.0)
            loss = self._aggregate(per_token_loss, selected, info)
            metrics = {
                "distillation/pg_clipfrac": masked_mean(clipped.float(), selected),
                "distillation/ppo_kl": masked_mean((old_log_prob - log_prob).detach(), selected),
            }
        metrics["ta_opd/k1_selected"] = masked_mean(per_token.detach(), selected)
        metrics["distillation/loss"] = loss.detach().item()
        return loss, metrics

    def _aggregate(self, per_token: torch.Tensor, selected: torch.Tensor, info: dict) -> torch.Tensor:
        return masked_aggregate(
            per_token,
            selected,
            self.settings.aggregation,
            dp_size=info["dp_size"],
            batch_num_selected=info["batch_num_tokens"],
            global_batch_size=info["global_batch_size"],
        )

    def _verl_policy_loss(self, log_prob, old_log_prob, advantages, selected, data, info: dict):
        for key, value in info.items():
            self.loss_config.global_batch_info[key] = value
        policy_loss_fn = get_policy_loss_fn(self.loss_config.policy_loss_mode)
        loss, pg_metrics = policy_loss_fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=selected,
            loss_agg_mode=self.settings.aggregation,
            config=self.loss_config,
            rollout_is_weights=data.get("rollout_is_weights", None),
        )
        return loss, {f"distillation/{k.split('/', 1)[-1]}": v for k, v in pg_metrics.items()}


def selected_positions(data) -> torch.Tensor:
    """The micro-batch's selection, ``[B, T]`` bool over the response positions: the driver's mask (verl's
    ``loss_mask``) within the response mask."""
    return padded(data[SELECTION_FIELD], False).bool() & padded(data["response_mask"], False).bool()


def selected_packed_rows(data) -> torch.Tensor:
    """The rows of this rank's packed student logits that score a selected response position (row
    ``prompt + t - 1`` of a sequence scores its response token t): verl's own response slicing
    (``no_padding_2_padding``) applied to the row numbers."""
    packed_ids = data["input_ids"].values()
    row_numbers = torch.arange(packed_ids.shape[0], device=packed_ids.device)
    response_rows = no_padding_2_padding(row_numbers, data)
    is_selected = torch.zeros_like(row_numbers)
    is_selected[response_rows[selected_positions(data)]] = 1
    (is_selected,) = slice_for_sequence_parallel(is_selected.unsqueeze(0))
    return is_selected[0].nonzero().squeeze(-1)
