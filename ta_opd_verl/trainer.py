"""TA-OPD's trainer: verl's synchronous v1 trainer with a scoring phase and a global selection.

Per step (verl 0.9.1, ``verl/trainer/ppo/v1/trainer_base.py``):
1. ``_compute_old_log_prob`` runs verl's one full forward over the batch with the logits processor on
   (``distillation_use_topk``) and ``ta_opd_phase=score``: the actor returns log-probs, entropy and our per-
   token D and C, which verl's collect writes to TransferQueue.
2. ``_update_actor`` reads D, C, H and the masks of the whole batch, drops the padding rows that
   ``_balance_batch`` added (``is_padding`` tags), normalises and selects over ALL valid positions (Eq. 11,
   13), writes the selection into the ``loss_mask`` field and runs verl's actor update with
   ``ta_opd_phase=train``; the loss (``ta_opd_verl.loss``) is the OPD loss on the selected positions.

With the colocated teacher (``ta_opd.teacher=fsdp``, ``ta_opd_verl.fsdp_teacher``) the scoring forward also
runs the teacher and returns its rows as per-token fields; step 1 then writes them to ``teacher_ids`` /
``teacher_logprobs``, where the update reads them as it reads a teacher server's. verl decides everywhere
whether to start its teacher servers from ``distillation.enabled`` (``need_teacher_policy`` for the teacher
pool and ``MultiTeacherModelManager`` in ``PPOTrainer._setup`` and ``_init_resource_pool_mgr``;
``is_distillation_enabled`` in the agent loop's ``_compute_teacher_logprobs``); this trainer sets it to false
in the config it shares with verl's TaskRunner before verl reads it, so no teacher pool, server or teacher
call exists, and builds the distillation dataclass itself.

Registered as ``trainer.v1.trainer_mode=ta_opd``. verl compares ``trainer_mode == "sync"`` literally in
several places (replay buffer, parameter sync); this class behaves as the sync trainer in all of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.metric import reduce_metrics
from verl.utils.py_functional import rename_dict
from verl.workers.utils.padding import response_from_nested, response_to_nested

from ta_opd_verl.batch_selection import select_rollout_batch, selection_records, stable_sample_ids
from ta_opd_verl.checks import check_model_paths, check_ta_opd_config, uses_fsdp_teacher
from ta_opd_verl.fsdp_teacher import (
    LOWER_BOUND_COMPATIBILITY_FIELD,
    LOWER_BOUND_DISAGREEMENT_FIELD,
    dumps_lower_bound,
    stack_teacher_rows,
    teacher_entry_fields,
)
from ta_opd_verl.loss import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    PHASE_KEY,
    SCORE_PHASE,
    TOPK_ENTROPY_FIELD,
    TRAIN_PHASE,
    TAOPDLossFunction,
    padded,
    split_teacher_entries,
)
from ta_opd_verl.teachability import TokenStatistics
from ta_opd_verl.teacher_server import install_teacher_server

logger = logging.getLogger("ta_opd_verl")

TRAINER_MODE = "ta_opd"


def switch_to_colocated_teacher(config) -> None:
    """Before verl reads the config: check the fsdp teacher's folder and shared vocabulary (the Hydra
    callback checks them too, for runs that compose the config without it), then turn off verl's switch
    for its teacher pool, servers and agent-loop teacher calls (module docstring)."""
    check_model_paths(config)
    config.distillation.enabled = False


@register_trainer(TRAINER_MODE)
class TAOPDTrainer(PPOTrainerSync):
    def __init__(self, config):
        check_ta_opd_config(config)
        self.fsdp_teacher = uses_fsdp_teacher(config)
        if self.fsdp_teacher:
            switch_to_colocated_teacher(config)
        super().__init__(config)
        # verl keys sync-only behaviour on the literal mode string: behave as "sync" everywhere.
        self.trainer_mode = "sync"
        self.parameter_sync_step = 1
        self.replay_buffer = self._build_replay_buffer()
        if not self.fsdp_teacher:
            install_teacher_server()

    def _setup(self):
        super()._setup()
        if self.fsdp_teacher:
            # verl builds it only with its teacher servers on; with enabled=false no teacher is validated.
            self.distillation_config = omega_conf_to_dataclass(self.config.distillation)
        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.ta_opd = self.distillation_config.distillation_loss.ta_opd
        # The fsdp teacher's lower-bound D and C, scored beside exact C for the selection dump.
        self.lower_bound_fields = (
            [LOWER_BOUND_DISAGREEMENT_FIELD, LOWER_BOUND_COMPATIBILITY_FIELD]
            if dumps_lower_bound(self.ta_opd)
            else []
        )
        model = self.config.actor_rollout_ref.model
        # verl's default attention for the student (HFModelConfig, verl/workers/config/model.py).
        attention = (model.get("override_config") or {}).get("attn_implementation", "flash_attention_2")
        self.actor_rollout_wg.set_loss_fn(
            TAOPDLossFunction(actor_config, self.distillation_config, teacher_attn_implementation=attention)
        )

    # ---- 1. scoring inside the old-log-prob forward --------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics):
        batch.extra_info.update(
            {
                "calculate_entropy": True,
                # compute_loss=True hands our loss callable to the forward, which runs it as the logits
                # processor; in the scoring phase its loss value is 0.
                "compute_loss": True,
                "distillation_use_topk": True,
                PHASE_KEY: SCORE_PHASE,
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
            }
        )
        output = self.actor_rollout_wg.compute_log_prob(batch)
        assert len(output) == len(batch)
        batch.extra_info.pop(PHASE_KEY)
        batch.extra_info["compute_loss"] = False

        score_fields = self._score_fields()
        fields = ["entropy", "log_probs", "response_mask", *score_fields]
        if self.config.actor_rollout_ref.rollout.calculate_log_probs:
            fields.extend(["responses", "rollout_log_probs"])
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        data["old_log_probs"] = response_from_nested(data.pop("log_probs"), response_mask)
        for field in ("entropy", *score_fields):
            data[field] = response_from_nested(data[field], response_mask)
        batch = tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=data.select("old_log_probs", "entropy", *score_fields),
        )
        if self.fsdp_teacher:
            batch = self._store_teacher_rows(batch)
        self._log_entropy_and_rollout_agreement(data, metrics)
        return batch

    def _store_teacher_rows(self, batch):
        """The fsdp teacher's per-token fields as ``teacher_ids`` / ``teacher_logprobs`` (over the whole
        sequence, row t for token t + 1, as a teacher server writes them), for the selection and the update.
        The update does not read the per-token copies (`_update_actor` leaves them out of its batch)."""
        topk = self.distillation_config.distillation_loss.topk
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=teacher_entry_fields(topk)
        )
        teacher_ids, teacher_logprobs = stack_teacher_rows(data, topk)
        rows = TensorDict(
            {"teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}, batch_size=len(batch.keys)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=rows)

    def _log_entropy_and_rollout_agreement(self, data, metrics):
        from verl.protocol import DataProto
        from verl.trainer.ppo.core_algos import agg_loss
        from verl.utils.debug.metrics import calculate_debug_metrics

        proto = DataProto(batch=data.exclude(*self._score_fields()).to_padded_tensor())
        actor_config = self.config.actor_rollout_ref.actor
        metrics["actor/entropy"] = agg_loss(
            loss_mat=proto.batch["entropy"],
            loss_mask=proto.batch["response_mask"],
            loss_agg_mode=actor_config.loss_agg_mode,
            loss_scale_factor=actor_config.loss_scale_factor,
        ).item()
        if self.config.actor_rollout_ref.rollout.calculate_log_probs:
            metrics.update(calculate_debug_metrics(proto))

    def _score_fields(self) -> list[str]:
        """Per-token fields our processor returns in the scoring forward."""
        fields = [DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, *self.lower_bound_fields]
        return fields + [TOPK_ENTROPY_FIELD] if self.ta_opd.entropy_mode == "topk" else fields

    # ---- 2. global selection, then the update on the selection ---------------------------------------
    def _select(self, batch, metrics):
        entropy_field = TOPK_ENTROPY_FIELD if self.ta_opd.entropy_mode == "topk" else "entropy"
        fields = ["response_mask", entropy_field, DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, "old_log_probs"]
        fields += ["teacher_logprobs", "teacher_ids", "prompts", "responses", *self.lower_bound_fields]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        valid = padded(response_mask, 0).bool()
        not_padding = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags])
        valid &= not_padding.unsqueeze(1)
        stats = TokenStatistics(
            disagreement=padded(data[DISAGREEMENT_FIELD], 0.0).float(),
            compatibility=padded(data[COMPATIBILITY_FIELD], 0.0).float(),
            entropy=padded(data[entropy_field], 0.0).float(),
        )
        topk = self.distillation_config.distillation_loss.topk
        teacher_logprobs = padded(response_from_nested(data["teacher_logprobs"], response_mask), 0.0)
        teacher_ids = padded(response_from_nested(data["teacher_ids"], response_mask), 0)
        top_ids, _, teacher_sampled = split_teacher_entries(teacher_ids, teacher_logprobs, topk)
        outside_top_k = ~(top_ids == teacher_ids[..., topk:]).any(-1)
        sampled_kl = padded(data["old_log_probs"], 0.0).float() - teacher_sampled.float()
        settings = self.ta_opd
        sample_ids = stable_sample_ids(list(batch.keys), [row.tolist() for row in data["prompts"].unbind()])
        mask, selection_metrics = select_rollout_batch(
            stats,
            valid,
            sample_ids,
            selector=settings.selector,
            ratio=settings.ratio,
            min_keep_per_sample=settings.min_keep_per_sample,
            q_low=settings.q_low,
            q_high=settings.q_high,
            seed=settings.seed,
            global_step=self.global_steps,
            sampled_kl=sampled_kl,
        )
        metrics.update(selection_metrics)
        # Share of positions whose sampled token lies outside the teacher's top-K: there verl's stock
        # server would have dropped the teacher's log-prob; ours keeps it.
        metrics["actor/ta_opd/sampled_outside_teacher_topk"] = float(outside_top_k[valid].float().mean())
        metrics["actor/ta_opd/compatibility_is_lower_bound"] = float(settings.compatibility == "lower_bound")
        metrics["actor/ta_opd/teacher_is_fsdp"] = float(self.fsdp_teacher)
        if settings.selection_dump_dir:
            responses = [row.tolist() for row in data["responses"].unbind()]
            # Dump names without the "ta_opd_" field prefix, like disagreement / compatibility.
            extra = {
                name.removeprefix("ta_opd_"): padded(data[name], 0.0).float()
                for name in self.lower_bound_fields
            }
            self._dump_selection(selection_records(sample_ids, responses, stats, valid, mask, extra))
        loss_mask = response_to_nested(mask.to(torch.int64), response_mask)
        fields = TensorDict({"loss_mask": loss_mask}, batch_size=len(batch.keys))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)

    def _dump_selection(self, records: list[dict]) -> None:
        folder = Path(self.ta_opd.selection_dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"step_{self.global_steps}.jsonl", "w") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)

    def _update_actor(self, batch, metrics):
        self._select(batch, metrics)
        actor = self.config.actor_rollout_ref.actor
        mini_batch_size = actor.ppo_mini_batch_size * self.config.actor_rollout_ref.rollout.n
        batch.extra_info.update(
            {
                "calculate_entropy": actor.calculate_entropy or actor.entropy_coeff != 0.0,
                # The logits processor is needed in the update only for the top-K reverse-KL loss.
                "distillation_use_topk": self.ta_opd.loss == "reverse_kl_topk",
                "distillation_only": False,
                PHASE_KEY: TRAIN_PHASE,
                "global_batch_size": mini_batch_size,
                "mini_batch_size": mini_batch_size,
                "epochs": actor.ppo_epochs,
                "seed": actor.data_loader_seed,
                "dataloader_kwargs": {"shuffle": actor.shuffle},
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
            }
        )
        if self.fsdp_teacher and batch.fields is not None:
            # Every listed field travels to every micro-batch; the teacher rows are already stacked.
            entry_fields = set(teacher_entry_fields(self.distillation_config.distillation_loss.topk))
            batch.fields = [name for name in batch.fields if name not in entry_fields]
        output = self.actor_rollout_wg.update_actor(batch)
        batch.extra_info.pop(PHASE_KEY)
        output = rename_dict(output["metrics"], "actor/")
        output["perf/mfu/actor"] = output.pop("actor/mfu")
        metrics.update(reduce_metrics(output))
        return batch
