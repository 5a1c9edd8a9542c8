"""verl 0.9.1's v1 trainer (driver side), as TA-OPD's trainer uses it.

What we lean on, each checked by a fingerprint (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``PPOTrainer._compute_old_log_prob`` (``verl/trainer/ppo/v1/trainer_base.py``): `score_forward`,
  `store_old_log_probs` and `log_entropy_and_rollout_agreement` are its steps 1-4, with the processor
  switched on (``compute_loss``, ``distillation_use_topk``) and our phase marker added.
- ``PPOTrainer._update_actor``: `update_actor` is it, with the distillation flags set by us and the fields
  the update must not receive left out.
- ``PPOTrainer._setup`` builds ``self.distillation_config`` only while ``distillation.enabled`` holds
  (`distillation_dataclass`; `ta_opd_verl.verl_fence.config.disable_verl_teacher` turns it off).
- ``PPOTrainer._build_replay_buffer`` and the literal ``trainer_mode == "sync"`` checks: `behave_as_sync`.
"""

from __future__ import annotations

from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.utils.metric import reduce_metrics
from verl.utils.py_functional import rename_dict

from ta_opd_verl.verl_fence import FINGERPRINTS
from ta_opd_verl.verl_fence.config import omega_conf_to_dataclass
from ta_opd_verl.verl_fence.transfer_queue import read_fields, response_from_nested, write_fields

__all__ = [
    "PPOTrainerSync",
    "actor_dataclass",
    "behave_as_sync",
    "distillation_dataclass",
    "log_entropy_and_rollout_agreement",
    "register_trainer",
    "score_forward",
    "store_old_log_probs",
    "update_actor",
]

FINGERPRINTS.update(
    {
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._compute_old_log_prob": "b2630e6178ed99f7",
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._update_actor": "d7009bd8a69d40b9",
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._setup": "248aee497276b816",
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer._build_replay_buffer": "c6c5bd0783311ea3",
        "verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync": "beb30ff5187a75b9",
    }
)


def behave_as_sync(trainer) -> None:
    """verl keys sync-only behaviour (replay buffer, parameter sync) on the literal mode string ``"sync"``;
    a registered mode of another name must reset it after ``PPOTrainer.__init__``."""
    trainer.trainer_mode = "sync"
    trainer.parameter_sync_step = 1
    trainer.replay_buffer = trainer._build_replay_buffer()


def distillation_dataclass(config):
    """``config.distillation`` as verl's ``DistillationConfig`` (verl builds it itself only while
    ``distillation.enabled`` holds)."""
    return omega_conf_to_dataclass(config.distillation)


def actor_dataclass(config):
    """``config.actor_rollout_ref.actor`` as verl's actor config dataclass."""
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def score_forward(trainer, batch, marker: dict) -> None:
    """``_compute_old_log_prob``'s forward with the loss callable run as the logits processor
    (``compute_loss``, ``distillation_use_topk``) and ``marker`` (non-tensor flags) on the batch; its
    per-token outputs land in TransferQueue."""
    batch.extra_info.update(
        {
            "calculate_entropy": True,
            "compute_loss": True,
            "distillation_use_topk": True,
            **marker,
            "temperature": trainer.config.actor_rollout_ref.rollout.temperature,
        }
    )
    output = trainer.actor_rollout_wg.compute_log_prob(batch)
    assert len(output) == len(batch)
    for key in marker:
        batch.extra_info.pop(key)
    batch.extra_info["compute_loss"] = False


def store_old_log_probs(trainer, batch, per_token_fields: list[str]):
    """``_compute_old_log_prob`` step 2: the forward's log-probs as ``old_log_probs`` and its entropy and
    ``per_token_fields`` cut to the response, written back. Returns (batch meta, the fields read)."""
    fields = ["entropy", "log_probs", "response_mask", *per_token_fields]
    if trainer.config.actor_rollout_ref.rollout.calculate_log_probs:
        fields.extend(["responses", "rollout_log_probs"])
    data = read_fields(batch, fields)
    response_mask = data["response_mask"]
    data["old_log_probs"] = response_from_nested(data.pop("log_probs"), response_mask)
    for field in ("entropy", *per_token_fields):
        data[field] = response_from_nested(data[field], response_mask)
    batch = write_fields(batch, data.select("old_log_probs", "entropy", *per_token_fields))
    return batch, data


def log_entropy_and_rollout_agreement(config, data: TensorDict, metrics: dict) -> None:
    """``_compute_old_log_prob`` steps 3-4: ``actor/entropy`` and the rollout-vs-actor agreement metrics."""
    proto = DataProto(batch=data.to_padded_tensor())
    actor_config = config.actor_rollout_ref.actor
    metrics["actor/entropy"] = agg_loss(
        loss_mat=proto.batch["entropy"],
        loss_mask=proto.batch["response_mask"],
        loss_agg_mode=actor_config.loss_agg_mode,
        loss_scale_factor=actor_config.loss_scale_factor,
    ).item()
    if config.actor_rollout_ref.rollout.calculate_log_probs:
        metrics.update(calculate_debug_metrics(proto))


def update_actor(trainer, batch, metrics: dict, *, distillation_use_topk: bool, marker: dict, leave_out=()):
    """``_update_actor`` with our distillation flags and ``marker`` on the batch; the fields named in
    ``leave_out`` are not sent (every listed field travels to every micro-batch)."""
    actor = trainer.config.actor_rollout_ref.actor
    mini_batch_size = actor.ppo_mini_batch_size * trainer.config.actor_rollout_ref.rollout.n
    batch.extra_info.update(
        {
            "calculate_entropy": actor.calculate_entropy or actor.entropy_coeff != 0.0,
            "distillation_use_topk": distillation_use_topk,
            "distillation_only": False,
            **marker,
            "global_batch_size": mini_batch_size,
            "mini_batch_size": mini_batch_size,
            "epochs": actor.ppo_epochs,
            "seed": actor.data_loader_seed,
            "dataloader_kwargs": {"shuffle": actor.shuffle},
            "temperature": trainer.config.actor_rollout_ref.rollout.temperature,
        }
    )
    if leave_out and batch.fields is not None:
        batch.fields = [name for name in batch.fields if name not in set(leave_out)]
    output = trainer.actor_rollout_wg.update_actor(batch)
    for key in marker:
        batch.extra_info.pop(key)
    output = rename_dict(output["metrics"], "actor/")
    output["perf/mfu/actor"] = output.pop("actor/mfu")
    metrics.update(reduce_metrics(output))
    return batch
