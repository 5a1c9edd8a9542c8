"""The TA-OPD loss inside verl's actor worker: a logits processor that scores positions, and the OPD loss
restricted to the positions the driver selected.

verl 0.9.1 internals this leans on:
- ``TrainingWorker.set_loss_fn`` (``verl/workers/engine_workers.py``, a ONE_TO_ALL worker method): the
  trainer replaces the actor's loss callable with a :class:`TAOPDLossFunction`.
- ``FSDPEngineWithLMHead.prepare_model_outputs`` (``verl/workers/engine/fsdp/transformer_impl.py``) calls
  the loss callable as a logits processor, ``fn(student_logits=(1, nnz, V), data=micro_batch)``, when the
  micro-batch's non-tensor flag ``distillation_use_topk`` is set, and stores each returned ``(1, nnz)``
  tensor as ``model_output[key]`` (nested by sequence). Logits arrive already divided by the temperature.
- ``forward_backward_batch`` computes ``batch_num_tokens`` as the sum of ``loss_mask`` over the global
  mini-batch (all data-parallel ranks). The trainer writes the selection mask into ``loss_mask``, so
  ``batch_num_tokens`` is the number of SELECTED positions of the mini-batch: the denominator of the
  paper's Eq. 7.
- The teacher's entries arrive as ``teacher_ids`` / ``teacher_logprobs`` (nested, one row per sequence
  position, row t describing token t+1). With our teacher server (``ta_opd_verl.teacher_server``) each row
  holds the teacher's top ``distillation_loss.topk`` entries followed by one column for the sampled token.
  With the colocated teacher (``ta_opd.teacher=fsdp``, ``ta_opd_verl.fsdp_teacher``) the scoring forward
  computes them itself and the trainer writes them to those fields before the update.
"""

from __future__ import annotations

from typing import Any

import torch

from ta_opd_verl.teachability import token_statistics

# Non-tensor flag the trainer sets on a batch to tell the loss callable which forward it is in.
PHASE_KEY = "ta_opd_phase"
SCORE_PHASE = "score"
TRAIN_PHASE = "train"

# Per-token fields the scoring forward returns (written to TransferQueue by verl's collect).
DISAGREEMENT_FIELD = "ta_opd_disagreement"
COMPATIBILITY_FIELD = "ta_opd_compatibility"
# Only with entropy_mode=topk; with the paper's full-vocabulary entropy, verl's own `entropy` output is H.
TOPK_ENTROPY_FIELD = "ta_opd_topk_entropy"
REVERSE_KL_FIELD = "ta_opd_reverse_kl"


class TeacherLayoutError(RuntimeError):
    """The teacher entries do not have the layout TA-OPD needs (top-K plus the sampled token)."""


def split_teacher_entries(
    teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``[..., topk + 1]`` teacher rows into the top-K ids, their log-probs and the sampled token's
    log-prob. Raises when the sampled-token column is missing (the stock teacher server drops it)."""
    width = teacher_ids.shape[-1]
    if width != topk + 1:
        raise TeacherLayoutError(
            f"TA-OPD expects {topk} + 1 teacher entries per position (top-{topk} plus the sampled token), "
            f"got {width}. The teacher servers must run TA-OPD's vLLM server "
            "(trainer.v1.trainer_mode=ta_opd installs it); verl's stock server drops the sampled token's "
            "log-prob when it is outside the teacher's top-K."
        )
    return teacher_ids[..., :topk], teacher_logprobs[..., :topk], teacher_logprobs[..., topk]


def reverse_kl_on_teacher_support(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-position reverse KL(p̄_S || p̄_T) with both distributions renormalised on the teacher's returned
    ids (exact when they cover the vocabulary). Differentiable in the student logits."""
    student_log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    student_on_support = torch.gather(student_log_probs, -1, teacher_ids.long())
    student_on_support = student_on_support - torch.logsumexp(student_on_support, dim=-1, keepdim=True)
    teacher_on_support = teacher_logprobs.float() - torch.logsumexp(
        teacher_logprobs.float(), dim=-1, keepdim=True
    )
    return (student_on_support.exp() * (student_on_support - teacher_on_support)).sum(-1)


def masked_aggregate(
    per_token: torch.Tensor,
    selected: torch.Tensor,
    mode: str,
    *,
    dp_size: int,
    batch_num_selected: float,
    global_batch_size: int,
) -> torch.Tensor:
    """Aggregate a ``[B, T]`` per-token loss over the selected positions of one micro-batch so that the
    gradient summed over micro-batches and averaged over data-parallel ranks equals:
    ``token-mean``: the sum over the mini-batch's selected positions divided by their number (Eq. 7);
    ``seq-mean-token-mean``: the mean over samples of each sample's mean over its selected positions.
    A mini-batch with nothing selected contributes exactly 0."""
    selected = selected.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * selected).sum() / max(batch_num_selected, 1.0) * dp_size
    counts = selected.sum(-1)
    sample_means = (per_token * selected).sum(-1) / counts.clamp_min(1.0)
    return sample_means.sum() / max(global_batch_size, 1) * dp_size


def padded(tensor: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """A nested (jagged) tensor as a padded one; a dense tensor as it is."""
    return tensor.to_padded_tensor(fill) if tensor.is_nested else tensor


class TAOPDLossFunction:
    """The callable verl's actor worker runs as processor and as loss (see the module docstring).

    Built on the driver from the actor and distillation dataclasses and sent to every actor rank with
    ``set_loss_fn``. In the scoring forward (``ta_opd_phase=score``) the processor returns D and C per
    position and the loss is 0; in the update (``ta_opd_phase=train``) the loss is the OPD loss on the
    positions in ``loss_mask`` (the selection)."""

    def __init__(self, actor_config, distillation_config, teacher_attn_implementation: str | None = None):
        self.actor_config = actor_config
        self.distillation_config = distillation_config
        self.loss_config = distillation_config.distillation_loss
        self.settings = self.loss_config.ta_opd
        # The fsdp teacher's attention kernel (the trainer passes the student's); unused with server teachers.
        self.teacher_attn_implementation = teacher_attn_implementation

    def __call__(self, *, data, model_output: dict | None = None, dp_group=None, student_logits=None, **_):
        from verl.utils import tensordict_utils as tu

        phase = tu.get_non_tensor_data(data=data, key=PHASE_KEY, default=None)
        if phase not in (SCORE_PHASE, TRAIN_PHASE):
            raise RuntimeError(
                f"TA-OPD loss called without {PHASE_KEY!r} ({phase!r}): the actor's loss was replaced by "
                "TA-OPD but the batch did not come from TA-OPD's trainer (trainer.v1.trainer_mode=ta_opd)."
            )
        if student_logits is not None:
            return self.process_logits(student_logits, data, phase)
        if phase == SCORE_PHASE:
            return torch.zeros((), device=model_output["log_probs"].values().device), {}
        return self.training_loss(model_output, data)

    # ---- logits processor ---------------------------------------------------------------------------
    def process_logits(self, student_logits: torch.Tensor, data, phase: str) -> dict[str, torch.Tensor]:
        if phase == SCORE_PHASE and self.settings.teacher == "fsdp":
            # The colocated teacher scores this micro-batch and returns the teacher rows the update reads.
            from ta_opd_verl.fsdp_teacher import score_micro_batch

            return score_micro_batch(self, student_logits, data)
        teacher_ids = data["teacher_ids"].values().unsqueeze(0)
        teacher_logprobs = data["teacher_logprobs"].values().unsqueeze(0)
        teacher_ids, teacher_logprobs = _slice_for_sequence_parallel(teacher_ids, teacher_logprobs)
        top_ids, top_logprobs, _ = split_teacher_entries(teacher_ids, teacher_logprobs, self.loss_config.topk)
        if phase == SCORE_PHASE:
            topk_entropy = self.settings.entropy_mode == "topk"
            with torch.no_grad():
                stats = token_statistics(
                    student_logits,
                    top_ids,
                    top_logprobs,
                    k=self.settings.k,
                    student_probs=self.settings.student_probs,
                    entropy_mode=self.settings.entropy_mode,
                    # The full-vocabulary H is verl's own entropy output of this forward: no second V-pass.
                    student_entropy=None
                    if topk_entropy
                    else torch.zeros(student_logits.shape[:-1], device=student_logits.device),
                )
            outputs = {DISAGREEMENT_FIELD: stats.disagreement, COMPATIBILITY_FIELD: stats.compatibility}
            if topk_entropy:
                outputs[TOPK_ENTROPY_FIELD] = stats.entropy
            return outputs
        return {REVERSE_KL_FIELD: reverse_kl_on_teacher_support(student_logits, top_ids, top_logprobs)}

    # ---- loss on the selected positions ---------------------------------------------------------------
    def training_loss(self, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import get_policy_loss_fn, kl_penalty
        from verl.workers.utils.padding import no_padding_2_padding

        selected = padded(data["loss_mask"], False).bool()
        response_mask = padded(data["response_mask"], False).bool()
        selected = selected & response_mask
        batch_info = {
            "dp_size": data["dp_size"],
            "batch_num_tokens": max(float(data["batch_num_tokens"]), 1.0),
            "global_batch_size": data["global_batch_size"],
            "loss_scale_factor": self.actor_config.loss_scale_factor,
        }
        metrics: dict[str, Any] = {}
        if self.settings.loss == "reverse_kl_topk":
            per_token = no_padding_2_padding(model_output[REVERSE_KL_FIELD], data)
            loss = masked_aggregate(
                per_token,
                selected,
                self.settings.aggregation,
                dp_size=batch_info["dp_size"],
                batch_num_selected=batch_info["batch_num_tokens"],
                global_batch_size=batch_info["global_batch_size"],
            )
            metrics["ta_opd/reverse_kl_selected"] = _masked_mean(per_token.detach(), selected)
            metrics["distillation/loss"] = loss.detach().item()
            return loss, metrics

        # pg_k1: verl's sampled-token OPD (advantage = -(log p_θ(y) - log p_T(y)), PPO-clipped), mirrored
        # from verl's `distillation_loss` with the selection as the loss mask.
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        teacher_ids = no_padding_2_padding(data["teacher_ids"], data)
        teacher_logprobs = no_padding_2_padding(data["teacher_logprobs"], data)
        _, _, teacher_sampled = split_teacher_entries(teacher_ids, teacher_logprobs, self.loss_config.topk)
        per_token = kl_penalty(
            logprob=log_prob, ref_logprob=teacher_sampled.to(log_prob.dtype), kl_penalty="k1"
        )
        if self.loss_config.loss_max_clamp is not None:
            per_token = per_token.clamp(
                min=-self.loss_config.loss_max_clamp, max=self.loss_config.loss_max_clamp
            )
        old_log_prob = padded(data["old_log_probs"], 0.0)
        for key, value in batch_info.items():
            self.loss_config.global_batch_info[key] = value
        policy_loss_fn = get_policy_loss_fn(self.loss_config.policy_loss_mode)
        mode = "token-mean" if self.settings.aggregation == "token-mean" else "seq-mean-token-mean"
        loss, pg_metrics = policy_loss_fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=-per_token.detach(),
            response_mask=selected,
            loss_agg_mode=mode,
            config=self.loss_config,
            rollout_is_weights=data.get("rollout_is_weights", None),
        )
        metrics.update({f"distillation/{k.split('/', 1)[-1]}": v for k, v in pg_metrics.items()})
        metrics["ta_opd/k1_selected"] = _masked_mean(per_token.detach(), selected)
        metrics["distillation/loss"] = loss.detach().item()
        return loss, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


def _slice_for_sequence_parallel(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under Ulysses sequence parallelism each rank sees a slice of the sequence dimension; slice the
    teacher rows the same way (as verl's ``fsdp/losses.py`` does)."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    if get_ulysses_sequence_parallel_world_size() <= 1:
        return tensors
    return tuple(slice_input_tensor(t, dim=1) for t in tensors)


def register_ta_opd_loss() -> None:
    """Register ``loss_mode=ta_opd`` in verl's distillation-loss registry (idempotent).

    ``use_topk=True`` makes verl ask the teacher servers for top-K entries and set
    ``distillation_use_topk`` on update batches. The registered function itself only raises: TA-OPD's
    loss runs through :class:`TAOPDLossFunction`, installed by TA-OPD's trainer; reaching verl's own
    dispatch means the trainer was not used."""
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        DistillationLossSettings,
        register_distillation_loss,
    )

    if "ta_opd" in DISTILLATION_LOSS_REGISTRY:
        return

    @register_distillation_loss(DistillationLossSettings(names=["ta_opd"], use_topk=True))
    def ta_opd_needs_its_trainer(config, distillation_config, model_output, data):
        raise RuntimeError(
            "distillation.distillation_loss.loss_mode=ta_opd runs only with TA-OPD's trainer: set "
            "trainer.v1.trainer_mode=ta_opd (conf/ta_opd_trainer.yaml does)."
        )
