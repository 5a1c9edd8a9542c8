"""Checks that stop a bad TA-OPD run before training, with a message that names the key.

They run twice: in the driver before Ray starts, through a Hydra callback that our configs declare
(``hydra.callbacks.ta_opd_preflight``, Hydra's ``Callback.on_job_start`` runs before verl's ``main``), and
again in TA-OPD's trainer (for runs that compose their own config without the callback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
LOSS_MODE_KEY = "distillation.distillation_loss.loss_mode"
TEACHER_KEY = "distillation.distillation_loss.ta_opd.teacher"
TEACHER_PATH_KEY = "distillation.distillation_loss.ta_opd.teacher_path"
SEQUENCE_PARALLEL_KEY = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"


def uses_fsdp_teacher(config: DictConfig) -> bool:
    """``ta_opd.teacher=fsdp``: the teacher is colocated in the actor's workers (ta_opd_verl.fsdp_teacher)."""
    return OmegaConf.select(config, TEACHER_KEY, default="server") == "fsdp"


class TAOPDConfigError(ValueError):
    """A TA-OPD run's configuration is invalid; the message names the key and what is accepted."""


def _select(config: DictConfig, key: str, default=None):
    return OmegaConf.select(config, key, default=default)


def check_ta_opd_config(config: DictConfig) -> None:
    """Validate the composed verl config of a TA-OPD run. Raises :class:`TAOPDConfigError`."""
    from ta_opd_verl.verl_plugin import require_plugin

    require_plugin()
    if not _select(config, "distillation.enabled", False):
        raise TAOPDConfigError("TA-OPD needs distillation.enabled=true (it distils from the teacher servers)")
    loss_mode = _select(config, LOSS_MODE_KEY)
    if loss_mode != "ta_opd":
        raise TAOPDConfigError(f"{LOSS_MODE_KEY}={loss_mode!r}: TA-OPD's trainer needs loss_mode=ta_opd")
    strategy = _select(config, "actor_rollout_ref.actor.strategy")
    if strategy not in SUPPORTED_STRATEGIES:
        raise TAOPDConfigError(
            f"actor_rollout_ref.actor.strategy={strategy!r} is not supported by TA-OPD; accepted: "
            f"{', '.join(SUPPORTED_STRATEGIES)} (Megatron shards logits by vocabulary: not implemented)"
        )
    if _select(config, "algorithm.rollout_correction.bypass_mode", False):
        raise TAOPDConfigError(
            "algorithm.rollout_correction.bypass_mode=True skips the old-log-prob forward in which TA-OPD "
            "scores every position; set it to False"
        )
    if _select(config, "actor_rollout_ref.actor.use_fused_kernels", False) or _select(
        config, "actor_rollout_ref.model.use_fused_kernels", False
    ):
        raise TAOPDConfigError(
            "actor_rollout_ref.model.use_fused_kernels=True never materialises the logits TA-OPD scores; "
            "set it to False"
        )
    sequence_parallel = _select(config, SEQUENCE_PARALLEL_KEY, 1) or 1
    if uses_fsdp_teacher(config) and sequence_parallel > 1:
        raise TAOPDConfigError(
            f"{SEQUENCE_PARALLEL_KEY}={sequence_parallel}: the fsdp teacher scores whole sequences, not "
            f"Ulysses slices; accepted with {TEACHER_KEY}=fsdp: 1"
        )
    configured_teachers = _select(config, "distillation.teacher_models", {}) or {}
    if uses_fsdp_teacher(config) and len(configured_teachers) > 1:
        raise TAOPDConfigError(
            f"distillation.teacher_models has {len(configured_teachers)} teachers "
            f"({', '.join(configured_teachers)}): multi-teacher routing needs {TEACHER_KEY}=server; "
            f"{TEACHER_KEY}=fsdp runs the one teacher at {TEACHER_PATH_KEY}"
        )
    # The fsdp teacher leaves distillation.teacher_models unused: verl's teacher servers are not started.
    teacher_models = {} if uses_fsdp_teacher(config) else configured_teachers
    for name, teacher in teacher_models.items():
        engine = OmegaConf.select(teacher, "inference.name")
        if engine != "vllm":
            raise TAOPDConfigError(
                f"distillation.teacher_models.{name}.inference.name={engine!r}: TA-OPD's teacher server "
                "keeps the sampled token's log-prob for vLLM teachers only; accepted: vllm"
            )
    _build_loss_config(config)


def _build_loss_config(config: DictConfig):
    """Instantiate the distillation-loss dataclass as verl's workers will (its ``__post_init__`` checks the
    ``ta_opd`` block: ratio, k <= topk, names)."""
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    from ta_opd_verl.config import TAOPDDistillationLossConfig

    target = _select(config, "distillation.distillation_loss._target_")
    expected = f"{TAOPDDistillationLossConfig.__module__}.{TAOPDDistillationLossConfig.__name__}"
    if target != expected:
        raise TAOPDConfigError(
            f"distillation.distillation_loss._target_={target!r}: TA-OPD needs {expected} "
            "(verl's keys plus the ta_opd block); conf/ta_opd_common.yaml sets it"
        )
    try:
        loss_config = omega_conf_to_dataclass(config.distillation.distillation_loss)
    except InstantiationException as error:
        # Hydra wraps the dataclass's own message (which names the key) in its call details.
        raise TAOPDConfigError(str(error.__cause__ or error)) from None
    if loss_config.ta_opd.compatibility == "exact" and loss_config.ta_opd.teacher == "server":
        raise TAOPDConfigError(
            "distillation.distillation_loss.ta_opd.compatibility=exact needs the teacher's log-probs at the "
            "student's top-K ids, which verl's teacher servers cannot return; accepted with server teachers: "
            f"lower_bound (or set {TEACHER_KEY}=fsdp: the colocated teacher gives exact C)"
        )
    return loss_config


def check_model_paths(config: DictConfig) -> None:
    """Student and teacher folders exist, share a vocabulary, and (on CPU) the models vLLM serves have a
    head size vLLM-CPU accepts. With the fsdp teacher the teacher is ``ta_opd.teacher_path`` (run by torch
    in the actor's workers, not by vLLM) and ``distillation.teacher_models`` is unused."""
    from ta_opd_verl.vocab import VocabularyMismatchError, check_same_vocabulary

    student = _select(config, "actor_rollout_ref.model.path")
    paths = {"actor_rollout_ref.model.path": student}
    served_by_vllm = {"actor_rollout_ref.model.path"}
    if uses_fsdp_teacher(config):
        paths[TEACHER_PATH_KEY] = _select(config, TEACHER_PATH_KEY)
    else:
        for name, teacher in (_select(config, "distillation.teacher_models", {}) or {}).items():
            key = f"distillation.teacher_models.{name}.model_path"
            paths[key] = OmegaConf.select(teacher, "model_path")
            served_by_vllm.add(key)
    for key, path in paths.items():
        if path is None or not (Path(str(path)) / "config.json").is_file():
            raise TAOPDConfigError(
                f"{key}={path!r} is not a model folder: a Hugging Face folder with config.json is accepted "
                "(this check needs local folders; download hub models first)"
            )
        if key in served_by_vllm and os.environ.get("VERL_PLATFORM", "").lower() == "cpu":
            from ta_opd_verl.tiny.vllm_cpu import check_vllm_cpu_head_size

            check_vllm_cpu_head_size(path)
    for key, path in paths.items():
        if key != "actor_rollout_ref.model.path":
            try:
                check_same_vocabulary(student, path)
            except VocabularyMismatchError as error:
                raise VocabularyMismatchError(f"{key}: {error}") from None


class PreflightCallback(Callback):
    """Hydra callback: validates a TA-OPD (or CPU OPD) config in the driver, before verl starts Ray.

    Hydra turns exceptions raised by callbacks into warnings (``hydra/_internal/callbacks.py``, Hydra 1.3),
    so a failed check prints its message and exits with ``SystemExit(2)``, which Hydra does not catch."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        task_config = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
        try:
            if _select(task_config, "trainer.v1.trainer_mode") == "ta_opd":
                check_ta_opd_config(task_config)
            if _select(task_config, "distillation.enabled", False):
                check_model_paths(task_config)
        except (ValueError, OSError) as error:  # ours: TAOPDConfigError, vocabulary and head-size errors
            print(f"ta-opd: configuration refused before start-up: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
