"""The teacher interface: everything the choice ``distillation.distillation_loss.ta_opd.teacher`` touches.

A teacher is chosen once (`ta_opd_verl.teachers.resolve_teacher`) and asked, at each stage of a run:
- before Ray starts (`ta_opd_verl.checks`): which model folders it reads (`model_paths`, `vllm_model_paths`)
  and what it refuses (`check_config`);
- in the driver before verl reads the config (`prepare_config`) and before verl builds its workers
  (`install`);
- in the actor's workers, inside the scoring forward: the per-token outputs of one micro-batch
  (`score_micro_batch`), given the student's logits; inside the update's forward with
  ``loss=reverse_kl_full``: the full-vocabulary reverse KL at the selected positions (`reverse_kl_full`);
- in the driver before the scoring forward: what its workers read beyond verl's fields (`before_scoring`);
  after it: what to store for the selection and the update
  (`after_scoring`, `score_fields`) and which fields the update must not receive (`update_leaves_out`).

Instances hold no model: they are pickled to every worker inside the loss callable. They carry the
special-token maps to apply (`use_special_token_maps`), derived once in the driver by the pre-flight check
that loads both tokenizers anyway (`ta_opd_verl.checks.checked_pairs`): plain dictionaries of ints that
travel with the instance, so no worker or server loads a tokenizer for them. Likewise the teacher-side
prompts (`use_teacher_prompts`, `ta_opd_verl.teacher_prompts`), which the one process that renders them
(the driver for the colocated teacher, verl's agent loop for servers) renders with the teacher's tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from omegaconf import DictConfig

from ta_opd_verl.protocol import COMPATIBILITY_FIELD, DISAGREEMENT_FIELD, TOPK_ENTROPY_FIELD
from ta_opd_verl.special_tokens import SpecialTokenMap
from ta_opd_verl.teachability import TokenStatistics
from ta_opd_verl.teacher_prompts import TeacherPrompts

TA_OPD_KEY = "distillation.distillation_loss.ta_opd"
TEACHER_KEY = f"{TA_OPD_KEY}.teacher"
TEACHER_PATH_KEY = f"{TA_OPD_KEY}.teacher_path"
LOSS_KEY = f"{TA_OPD_KEY}.loss"
STUDENT_PATH_KEY = "actor_rollout_ref.model.path"


class Teacher(ABC):
    name: str
    # Whether the teacher's full logits sit next to the student's (exact C, no teacher pool).
    colocated: bool

    def __init__(self):
        # Teacher model folder (as configured) -> the special-token map its scoring applies.
        self.special_token_maps: dict[str, SpecialTokenMap] = {}
        # How the teacher's own prompt is built (``ta_opd.teacher_prompt``); None: the student's prompt ids.
        self.teacher_prompts: TeacherPrompts | None = None

    @classmethod
    def from_config(cls, config: DictConfig) -> Teacher:
        """The teacher for a composed verl config."""
        return cls()

    def use_special_token_maps(self, maps: Mapping[str, SpecialTokenMap]) -> None:
        """Apply these maps (teacher model folder -> map, each with entries; a folder left out is scored on
        the student's ids as they are): set in the driver before the instance is sent anywhere."""
        self.special_token_maps = dict(maps)

    def use_teacher_prompts(self, prompts: TeacherPrompts | None) -> None:
        """Score the student's responses after these teacher-side prompts (None: the student's prompt ids):
        set in the driver, like the maps."""
        self.teacher_prompts = prompts

    # ---- before Ray starts -----------------------------------------------------------------------------
    @abstractmethod
    def model_paths(self, config: DictConfig) -> dict[str, str | None]:
        """Config key -> model folder, for every teacher model this run loads."""

    def vllm_model_paths(self, config: DictConfig) -> dict[str, str | None]:
        """The subset of `model_paths` that vLLM serves (the CPU runtime checks their head size)."""
        return {}

    @abstractmethod
    def check_config(self, config: DictConfig, loss_config) -> None:
        """Raise `ta_opd_verl.config.TAOPDConfigError` for what this teacher cannot run (``loss_config``:
        the built ``distillation_loss`` dataclass)."""

    # ---- driver ----------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_config(self, config: DictConfig) -> None:
        """Adjust the config TA-OPD's trainer shares with verl, before verl reads it."""

    @abstractmethod
    def install(self) -> None:
        """Hook into verl in the driver process before verl builds its workers and servers."""

    def score_fields(self, settings, topk: int) -> list[str]:
        """Per-token fields the scoring forward returns beyond D, C and the top-k entropy."""
        return []

    def before_scoring(self, batch):
        """Store what the scoring forward's workers read beyond verl's fields; returns the batch meta."""
        return batch

    def after_scoring(self, batch, topk: int):
        """Store what the selection and the update read; returns the batch meta."""
        return batch

    def teacher_prompt_lengths(self, batch) -> torch.Tensor | None:
        """Per row of ``batch``, the length of the prompt the teacher read, with a teacher-side prompt."""
        return None

    def update_leaves_out(self, topk: int) -> list[str]:
        """Fields of the batch the update must not receive."""
        return []

    # ---- actor workers ---------------------------------------------------------------------------------
    @abstractmethod
    def score_micro_batch(self, loss_fn, student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
        """The scoring forward's per-token outputs for one micro-batch, each ``(1, nnz)``."""

    def reverse_kl_full(self, loss_fn, student_rows: torch.Tensor, data, rows: torch.Tensor) -> torch.Tensor:
        """KL(p_θ || p_T) over the whole vocabulary at the packed ``rows`` of the update's micro-batch
        (``student_rows``: the student's logits there, ``[len(rows), V]``), differentiable in them. Only a
        teacher whose whole distribution is at hand gives it; `check_config` refuses the loss otherwise."""
        raise NotImplementedError(f"the {self.name} teacher cannot give {LOSS_KEY}=reverse_kl_full")


def statistics_outputs(stats: TokenStatistics, entropy_mode: str) -> dict[str, torch.Tensor]:
    """D and C (and with ``entropy_mode=topk`` the top-k entropy) as the scoring forward returns them; the
    full-vocabulary H is verl's own ``entropy`` output of the same forward."""
    outputs = {DISAGREEMENT_FIELD: stats.disagreement, COMPATIBILITY_FIELD: stats.compatibility}
    if entropy_mode == "topk":
        outputs[TOPK_ENTROPY_FIELD] = stats.entropy
    return outputs


def skipped_entropy(entropy_mode: str, like: torch.Tensor) -> torch.Tensor | None:
    """`token_statistics`' ``student_entropy`` argument: with the full-vocabulary H, verl's own entropy
    output of this forward is H, so a placeholder skips a second pass over the vocabulary."""
    return None if entropy_mode == "topk" else torch.zeros(like.shape[:-1], device=like.device)
