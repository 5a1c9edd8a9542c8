"""TA-OPD's trainer: verl's synchronous v1 trainer with a scoring phase and a global selection.

Per step:
1. ``_compute_old_log_prob`` runs verl's one full forward over the batch with the logits processor on and
   ``ta_opd_phase=score``: the actor returns log-probs, entropy and the teacher's per-token scoring (D, C;
   the colocated teacher also its rows), which verl's collect writes to TransferQueue.
2. ``_update_actor`` reads D, C, H and the masks of the whole batch, drops the padding rows that batch
   balancing added, normalises and selects over ALL valid positions (Eq. 11, 13), writes the selection into
   the ``loss_mask`` field and runs verl's actor update with ``ta_opd_phase=train``; the loss
   (`ta_opd_verl.loss`) is the OPD loss on the selected positions.

The teacher (`ta_opd_verl.teachers`) decides what the forward scores with, what is stored after it and
what the update leaves out. Every verl internal this leans on: `ta_opd_verl.verl_fence.trainer`.
Registered as ``trainer.v1.trainer_mode=ta_opd``.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf

from ta_opd_verl.batch_selection import (
    METRIC_PREFIX,
    select_rollout_batch,
    selection_dump,
    stable_sample_ids,
    write_selection_dump,
)
from ta_opd_verl.checks import (
    check_ta_opd_config,
    check_teacher_prompts,
    checked_pairs,
    special_token_maps_to_apply,
)
from ta_opd_verl.config import LOGITS_LOSSES
from ta_opd_verl.loss import TAOPDLossFunction
from ta_opd_verl.protocol import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    PHASE_KEY,
    SCORE_PHASE,
    SELECTION_FIELD,
    STEP_KEY,
    TEACHER_IDS_FIELD,
    TEACHER_LOGPROBS_FIELD,
    TEACHER_ORPHAN_MASS_FIELD,
    TOPK_ENTROPY_FIELD,
    TRAIN_PHASE,
    padded,
    split_teacher_entries,
)
from ta_opd_verl.teachability import TokenStatistics
from ta_opd_verl.teacher_prompts import TeacherPrompts
from ta_opd_verl.teachers import resolve_teacher
from ta_opd_verl.teachers.base import STUDENT_PATH_KEY
from ta_opd_verl.verl_fence.trainer import (
    PPOTrainerSync,
    actor_dataclass,
    behave_as_sync,
    distillation_dataclass,
    log_entropy_and_rollout_agreement,
    register_trainer,
    score_forward,
    store_old_log_probs,
    update_actor,
)
from ta_opd_verl.verl_fence.transfer_queue import (
    not_padding_rows,
    read_fields,
    response_from_nested,
    response_to_nested,
    rollout_ids,
    write_fields,
)

logger = logging.getLogger("ta_opd_verl")

TRAINER_MODE = "ta_opd"


@register_trainer(TRAINER_MODE)
class TAOPDTrainer(PPOTrainerSync):
    def __init__(self, config):
        check_ta_opd_config(config)
        # The Hydra callback checks the model folders too; runs that compose their config without it do not.
        pairs = checked_pairs(config)
        check_teacher_prompts(config, pairs)
        self.teacher = resolve_teacher(config)
        self.teacher.use_special_token_maps(special_token_maps_to_apply(pairs))
        self.teacher.use_teacher_prompts(TeacherPrompts.from_config(config))
        self.teacher.prepare_config(config)
        super().__init__(config)
        behave_as_sync(self)
        self.teacher.install()

    def _setup(self):
        super()._setup()
        self.distillation_config = distillation_dataclass(self.config)
        self.loss_config = self.distillation_config.distillation_loss
        self.ta_opd = self.loss_config.ta_opd
        # Once per run: what a preset and the explicit keys resolved to, the settings the workers get too.
        settings = "\n".join(self.loss_config.resolved_settings())
        logger.info(settings)
        print(settings, flush=True)
        actor_config = actor_dataclass(self.config)
        self.actor_rollout_wg.set_loss_fn(
            TAOPDLossFunction(actor_config, self.distillation_config, self.teacher)
        )

    # ---- 1. scoring inside the old-log-prob forward --------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics):
        batch = self.teacher.before_scoring(batch)
        score_forward(self, batch, {PHASE_KEY: SCORE_PHASE})
        score_fields = self._score_fields()
        batch, data = store_old_log_probs(self, batch, score_fields)
        batch = self.teacher.after_scoring(batch, self.loss_config.topk)
        log_entropy_and_rollout_agreement(self.config, data.exclude(*score_fields), metrics)
        return batch

    def _score_fields(self) -> list[str]:
        """Per-response-position fields the scoring forward returns."""
        fields = [
            DISAGREEMENT_FIELD,
            COMPATIBILITY_FIELD,
            *self.teacher.score_fields(self.ta_opd, self.loss_config.topk),
        ]
        return fields + [TOPK_ENTROPY_FIELD] if self.ta_opd.entropy_mode == "topk" else fields

    # ---- 2. global selection, then the update on the selection ---------------------------------------
    def _update_actor(self, batch, metrics):
        self._select(batch, metrics)
        return update_actor(
            self,
            batch,
            metrics,
            # The logits processor is needed in the update only for the reverse-KL losses.
            distillation_use_topk=self.ta_opd.loss in LOGITS_LOSSES,
            marker={PHASE_KEY: TRAIN_PHASE, STEP_KEY: self.global_steps},
            leave_out=self.teacher.update_leaves_out(self.loss_config.topk),
        )

    def _select(self, batch, metrics) -> None:
        entropy_field = TOPK_ENTROPY_FIELD if self.ta_opd.entropy_mode == "topk" else "entropy"
        extra_fields = self.teacher.score_fields(self.ta_opd, self.loss_config.topk)
        fields = ["response_mask", entropy_field, DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, "old_log_probs"]
        fields += [TEACHER_LOGPROBS_FIELD, TEACHER_IDS_FIELD, "prompts", "responses", *extra_fields]
        data = read_fields(batch, fields)
        response_mask = data["response_mask"]
        real_rows = not_padding_rows(batch).unsqueeze(1)
        valid = padded(response_mask, 0).bool() & real_rows
        # normalize_over=response: every response position, the ones the response mask leaves out included.
        population = (
            valid if self.ta_opd.normalize_over == "valid" else (padded(response_mask, -1) >= 0) & real_rows
        )
        stats = TokenStatistics(
            disagreement=padded(data[DISAGREEMENT_FIELD], 0.0).double(),
            compatibility=padded(data[COMPATIBILITY_FIELD], 0.0).double(),
            entropy=padded(data[entropy_field], 0.0).double(),
        )
        prompts = [row.tolist() for row in data["prompts"].unbind()]
        sample_ids = stable_sample_ids(rollout_ids(batch), prompts)
        teacher_sampled = self._teacher_sampled_logprobs(data, valid, metrics)
        self._special_token_metrics(data, valid, metrics)
        self._teacher_prompt_metrics(batch, data["prompts"], metrics)
        settings = self.ta_opd
        selection = {
            "selector": settings.selector,
            "ratio": settings.ratio,
            "rules": settings.selection_rules(),
            "seed": settings.seed,
            "global_step": self.global_steps,
            "population": population,
        }
        mask, selection_metrics = select_rollout_batch(
            stats,
            valid,
            sample_ids,
            **selection,
            sampled_kl=padded(data["old_log_probs"], 0.0).float() - teacher_sampled,
        )
        metrics.update(selection_metrics)
        metrics[METRIC_PREFIX + "compatibility_is_lower_bound"] = float(
            settings.compatibility == "lower_bound"
        )
        metrics[METRIC_PREFIX + "teacher_is_fsdp"] = float(self.teacher.colocated)
        if settings.selection_dump_dir:
            responses = [row.tolist() for row in data["responses"].unbind()]
            # Dump names without the "ta_opd_" field prefix, like disagreement / compatibility.
            extra = {name.removeprefix("ta_opd_"): padded(data[name], 0.0).float() for name in extra_fields}
            extra["teacher_sampled_logprob"] = teacher_sampled
            records, header = selection_dump(
                sample_ids, prompts, responses, stats, valid, mask, extra, **selection
            )
            # The student's folder, where `ta-opd show-selection` finds the tokenizer by default.
            header["student_path"] = OmegaConf.select(self.config, STUDENT_PATH_KEY)
            write_selection_dump(settings.selection_dump_dir, self.global_steps, records, header)
        write_fields(batch, {SELECTION_FIELD: response_to_nested(mask.to(torch.int64), response_mask)})

    def _teacher_sampled_logprobs(self, data, valid: torch.Tensor, metrics: dict) -> torch.Tensor:
        """The teacher's log-prob of each response position's sampled token, ``[B, T]``; and the share of
        valid positions whose sampled token lies outside the teacher's top-K (there verl's stock server
        would have dropped the teacher's log-prob) as a metric."""
        response_mask, topk = data["response_mask"], self.loss_config.topk
        teacher_ids = padded(response_from_nested(data[TEACHER_IDS_FIELD], response_mask), 0)
        teacher_logprobs = padded(response_from_nested(data[TEACHER_LOGPROBS_FIELD], response_mask), 0.0)
        top_ids, top_logprobs, sampled = split_teacher_entries(teacher_ids, teacher_logprobs, topk)
        # A -inf entry is no entry (verl's filler, id 0), whatever its id.
        in_top_k = (top_ids == teacher_ids[..., topk:]) & (top_logprobs > float("-inf"))
        outside_top_k = ~in_top_k.any(-1)
        metrics[METRIC_PREFIX + "sampled_outside_teacher_topk"] = float(outside_top_k[valid].float().mean())
        metrics[METRIC_PREFIX + "teacher_rows_bytes_per_token"] = teacher_rows_bytes_per_token(
            data[TEACHER_IDS_FIELD], data[TEACHER_LOGPROBS_FIELD]
        )
        return sampled.float()

    def _special_token_metrics(self, data, valid: torch.Tensor, metrics: dict) -> None:
        """With a special-token map in use: the share of valid positions whose sampled token the map
        changed for the teacher (over the maps of every teacher), and the colocated teacher's mean
        probability on ids the student cannot place."""
        maps = self.teacher.special_token_maps.values()
        if not maps:
            return
        mapped_ids = torch.tensor(sorted({s for token_map in maps for s in token_map.entries}))
        mapped = torch.isin(padded(data["responses"], 0), mapped_ids)
        metrics[METRIC_PREFIX + "special_token_mapped_share"] = float(mapped[valid].float().mean())
        if TEACHER_ORPHAN_MASS_FIELD in data.keys():
            orphan_mass = padded(data[TEACHER_ORPHAN_MASS_FIELD], 0.0).double()
            metrics[METRIC_PREFIX + "teacher_orphan_mass"] = float(orphan_mass[valid].mean())

    def _teacher_prompt_metrics(self, batch, student_prompts, metrics: dict) -> None:
        """With a teacher-side prompt: the mean prompt length, in tokens, the teacher read and the student's,
        over the real samples."""
        lengths = self.teacher.teacher_prompt_lengths(batch)
        if lengths is None:
            return
        real = not_padding_rows(batch)
        metrics[METRIC_PREFIX + "teacher_prompt_length_mean"] = float(lengths[real].double().mean())
        student = student_prompts.offsets().diff()
        metrics[METRIC_PREFIX + "student_prompt_length_mean"] = float(student[real].double().mean())


def teacher_rows_bytes_per_token(teacher_ids, teacher_logprobs) -> float:
    """What the teacher rows occupy in TransferQueue per token of the batch: both fields as stored (nested
    ``[tokens, K + 1]``: verl's int32 ids and float32 log-probs), over the tokens they cover."""
    stored = [field.values() for field in (teacher_ids, teacher_logprobs)]
    tokens = stored[0].shape[0]
    return sum(values.numel() * values.element_size() for values in stored) / max(tokens, 1)
