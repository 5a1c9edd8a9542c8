"""``ta_opd.teacher=server``: verl's teacher servers (``distillation.teacher_models``, multi-teacher routing
included), with the teacher's log-prob of the sampled token kept.

vLLM's prompt log-probs list, for every position, the top-K entries plus the actual next token when it is
outside the top-K. verl's extraction drops that extra entry, so the sampled token's teacher log-prob would
be lost exactly where the teacher disagrees most; TA-OPD needs it for the sampled-token OPD loss. Our
teacher servers extract every row as ``top-K entries + [sampled token]`` (`ta_opd_verl.protocol`'s
layout); the student's rollout servers are untouched (`ta_opd_verl.verl_fence.rollout`).

C is the lower bound (Eq. 17): a server returns only the teacher's own top-K, not its log-probs at the
student's top-k ids.

With a special-token map (`ta_opd_verl.special_tokens`) the server reads the student's whole sequence
through it and returns its rows in the student's ids (`StudentSpaceRequests`): a top-K entry with no
student counterpart becomes the filler verl's extraction writes for a missing entry (id 0, log-prob -inf),
which every reader of the rows skips as no entry (`token_statistics`, the top-K losses of
`ta_opd_verl.opd_loss`, the trainer's ``sampled_outside_teacher_topk``). The teacher's mass on such ids is
then known only inside its top-K, and the rows have no column for it: the orphan-mass metric comes from
the colocated teacher only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from ta_opd_verl.config import TAOPDConfigError
from ta_opd_verl.protocol import TEACHER_IDS_FIELD, TEACHER_LOGPROBS_FIELD, split_teacher_entries
from ta_opd_verl.special_tokens import SpecialTokenMap, student_to_teacher_ids, teacher_to_student_ids
from ta_opd_verl.teachability import token_statistics
from ta_opd_verl.teachers.base import LOSS_KEY, TEACHER_KEY, Teacher, skipped_entropy, statistics_outputs
from ta_opd_verl.verl_fence.rollout import register_vllm_replica
from ta_opd_verl.verl_fence.worker import slice_for_sequence_parallel

TEACHER_MODELS_KEY = "distillation.teacher_models"


def extract_prompt_logprobs_with_sampled_token(output, num_prompt_logprobs, result_dict: dict) -> None:
    """verl's ``extract_prompt_logprobs`` contract, with one more column holding the actual token."""
    if num_prompt_logprobs is None:
        return
    if num_prompt_logprobs == 0:
        raise ValueError("TA-OPD's teacher server needs top-K prompt log-probs (distillation_loss.topk > 0)")
    prompt_ids = output.prompt_token_ids
    rows_ids, rows_logprobs = [], []
    # Position t's dictionary describes token t (None for t = 0); verl's row t is the distribution of t + 1.
    for position, logprobs_dict in enumerate(output.prompt_logprobs[1:], start=1):
        logprobs_dict = {int(token_id): entry for token_id, entry in logprobs_dict.items()}
        ids = [0] * num_prompt_logprobs
        logprobs = [float("-inf")] * num_prompt_logprobs
        for token_id, entry in logprobs_dict.items():
            if entry.rank <= num_prompt_logprobs:
                ids[entry.rank - 1] = token_id
                logprobs[entry.rank - 1] = entry.logprob
        actual = prompt_ids[position]
        rows_ids.append(ids + [int(actual)])
        rows_logprobs.append(logprobs + [logprobs_dict[actual].logprob])
    # verl pads one dummy row for the last position (no next token).
    rows_ids.append([0] * (num_prompt_logprobs + 1))
    rows_logprobs.append([0.0] * (num_prompt_logprobs + 1))
    result_dict["prompt_ids"] = rows_ids
    result_dict["prompt_logprobs"] = rows_logprobs


@dataclass(frozen=True)
class StudentSpaceRequests:
    """A teacher server's requests through a special-token map (`ta_opd_verl.verl_fence.rollout.RequestMap`):
    the student's sequence in, rows in the student's ids out."""

    token_map: SpecialTokenMap

    def teacher_prompt_ids(self, prompt_ids: list[int]) -> list[int]:
        return student_to_teacher_ids(torch.tensor(prompt_ids), self.token_map).tolist()

    def to_student(self, prompt_ids: list[int], extra_fields: dict) -> None:
        """The rows of `extract_prompt_logprobs_with_sampled_token` in the student's ids: the top-K ids mapped
        back, an entry with no student counterpart turned into the missing-entry filler (id 0, -inf); the
        sampled column the student's own token, with the teacher's log-prob of the id it read."""
        if "prompt_ids" not in extra_fields:  # an aborted request returns no rows
            return
        ids = torch.tensor(extra_fields["prompt_ids"])
        # float64 holds every Python float of the rows as it is.
        logprobs = torch.tensor(extra_fields["prompt_logprobs"], dtype=torch.float64)
        top = teacher_to_student_ids(ids[:-1, :-1], self.token_map)  # the last row is verl's dummy row
        ids[:-1, :-1] = top.ids.masked_fill(top.orphan, 0)
        logprobs[:-1, :-1] = logprobs[:-1, :-1].masked_fill(top.orphan, float("-inf"))
        ids[:-1, -1] = torch.tensor(prompt_ids[1:], dtype=ids.dtype)
        extra_fields["prompt_ids"] = ids.tolist()
        extra_fields["prompt_logprobs"] = logprobs.tolist()


class ServerTeacher(Teacher):
    name = "server"
    colocated = False

    def model_paths(self, config: DictConfig) -> dict[str, str | None]:
        teachers = OmegaConf.select(config, TEACHER_MODELS_KEY, default={}) or {}
        return {
            f"{TEACHER_MODELS_KEY}.{name}.model_path": OmegaConf.select(teacher, "model_path")
            for name, teacher in teachers.items()
        }

    vllm_model_paths = model_paths

    def check_config(self, config: DictConfig, loss_config) -> None:
        for name, teacher in (OmegaConf.select(config, TEACHER_MODELS_KEY, default={}) or {}).items():
            engine = OmegaConf.select(teacher, "inference.name")
            if engine != "vllm":
                raise TAOPDConfigError(
                    f"{TEACHER_MODELS_KEY}.{name}.inference.name={engine!r}: TA-OPD's teacher server keeps "
                    "the sampled token's log-prob for vLLM teachers only; accepted: vllm"
                )
        if loss_config.ta_opd.compatibility == "exact":
            raise TAOPDConfigError(
                "distillation.distillation_loss.ta_opd.compatibility=exact needs the teacher's log-probs at "
                "the student's top-K ids, which verl's teacher servers cannot return; accepted with server "
                f"teachers: lower_bound (or set {TEACHER_KEY}=fsdp: the colocated teacher gives exact C)"
            )
        if loss_config.ta_opd.loss == "reverse_kl_full":
            raise TAOPDConfigError(
                f"{LOSS_KEY}=reverse_kl_full needs the teacher's whole distribution at the selected "
                "positions, which verl's teacher servers do not return (only their top-K); accepted with "
                f"server teachers: pg_k1, reverse_kl_topk, reverse_kl_topk_tail (or set {TEACHER_KEY}=fsdp: "
                "the colocated teacher gives the full-vocabulary reverse KL)"
            )

    def prepare_config(self, config: DictConfig) -> None:
        """Nothing to change: verl starts its teacher servers from ``distillation.teacher_models``."""

    def install(self) -> None:
        request_maps = {path: StudentSpaceRequests(m) for path, m in self.special_token_maps.items()}
        register_vllm_replica(extract_prompt_logprobs_with_sampled_token, request_maps)

    def score_micro_batch(self, loss_fn, student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
        """D and C from the teacher rows the server wrote for this micro-batch."""
        settings = loss_fn.settings
        teacher_ids = data[TEACHER_IDS_FIELD].values().unsqueeze(0)
        teacher_logprobs = data[TEACHER_LOGPROBS_FIELD].values().unsqueeze(0)
        teacher_ids, teacher_logprobs = slice_for_sequence_parallel(teacher_ids, teacher_logprobs)
        top_ids, top_logprobs, _ = split_teacher_entries(
            teacher_ids, teacher_logprobs, loss_fn.loss_config.topk
        )
        with torch.no_grad():
            stats = token_statistics(
                student_logits,
                top_ids,
                top_logprobs,
                **settings.scoring_options(),
                student_entropy=skipped_entropy(settings.entropy_mode, student_logits),
            )
        return statistics_outputs(stats, settings.entropy_mode)
