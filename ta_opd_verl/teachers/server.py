"""``ta_opd.teacher=server``: verl's teacher servers (``distillation.teacher_models``, multi-teacher routing
included), with the teacher's log-prob of the sampled token kept.

vLLM's prompt log-probs list, for every position, the top-K entries plus the actual next token when it is
outside the top-K. verl's extraction drops that extra entry, so the sampled token's teacher log-prob would
be lost exactly where the teacher disagrees most; TA-OPD needs it for the sampled-token OPD loss. Our
teacher servers extract every row as ``top-K entries + [sampled token]`` (`ta_opd_verl.protocol`'s
layout); the student's rollout servers are untouched (`ta_opd_verl.verl_fence.rollout`).

C is the lower bound (Eq. 17): a server returns only the teacher's own top-K, not its log-probs at the
student's top-k ids.

A teacher with a special-token map (`ta_opd_verl.special_tokens`) or a teacher-side prompt
(`ta_opd_verl.teacher_prompts`) is sent its own sequence by verl's agent loop (`ServerTeacherRequests`,
through `ta_opd_verl.verl_fence.agent_loop`): its prompt, then the student's response read through the map;
its rows come back in the student's ids, lined up with the student's sequence. A top-K entry with no
student counterpart becomes the filler verl's extraction writes for a missing entry (id 0, log-prob -inf),
which every reader of the rows skips as no entry (`token_statistics`, the top-K losses of
`ta_opd_verl.opd_loss`, the trainer's ``sampled_outside_teacher_topk``). The teacher's mass on such ids is
then known only inside its top-K, and the rows have no column for it: the orphan-mass metric comes from
the colocated teacher only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from ta_opd_verl.config import TAOPDConfigError
from ta_opd_verl.protocol import TEACHER_IDS_FIELD, TEACHER_LOGPROBS_FIELD, split_teacher_entries
from ta_opd_verl.special_tokens import SpecialTokenMap, student_to_teacher_ids, teacher_to_student_ids
from ta_opd_verl.teachability import token_statistics
from ta_opd_verl.teacher_prompts import TeacherPrompts, teacher_positions
from ta_opd_verl.teachers.base import LOSS_KEY, TEACHER_KEY, Teacher, skipped_entropy, statistics_outputs
from ta_opd_verl.verl_fence.agent_loop import TEACHER_PROMPT_LENGTH_KEY, use_teacher_requests
from ta_opd_verl.verl_fence.rollout import register_vllm_replica
from ta_opd_verl.verl_fence.transfer_queue import read_per_sample
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
class ServerTeacherRequests:
    """What verl's agent loop sends one teacher server for a sample and how its rows come back
    (`ta_opd_verl.verl_fence.agent_loop.TeacherRequests`): the teacher's prompt (the student's prompt ids, or
    `TeacherPrompts`' rendering), then the student's response, both read through the special-token map; the
    rows returned in the student's ids, lined up with the student's sequence (`teacher_positions`)."""

    teacher_path: str
    token_map: SpecialTokenMap | None = None
    prompts: TeacherPrompts | None = None

    def _to_teacher(self, ids: list[int]) -> list[int]:
        if self.token_map is None:
            return ids
        return student_to_teacher_ids(torch.tensor(ids, dtype=torch.long), self.token_map).tolist()

    def teacher_sequence(
        self, prompt_ids: list[int], response_ids: list[int], sample: Mapping
    ) -> tuple[list[int], list[int]]:
        if self.prompts is None:
            teacher_prompt = self._to_teacher(prompt_ids)
        else:  # rendered by the teacher's own tokenizer: its ids already
            teacher_prompt = self.prompts.prompt_ids(self.teacher_path, self.prompts.messages(sample))
        return teacher_prompt, self._to_teacher(response_ids)

    def student_rows(
        self,
        rows: tuple[torch.Tensor, torch.Tensor],
        prompt_ids: list[int],
        response_ids: list[int],
        teacher_prompt_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `extract_prompt_logprobs_with_sampled_token` for the student's sequence: the top-K ids
        mapped back, an entry with no student counterpart turned into the missing-entry filler (id 0, -inf);
        the sampled column the student's own next token, with the teacher's log-prob of the id it read."""
        ids, logprobs = (rows[0].clone(), rows[1].clone())
        if self.token_map is not None:
            top = teacher_to_student_ids(ids[:-1, :-1].long(), self.token_map)  # the last row: verl's dummy
            ids[:-1, :-1] = top.ids.masked_fill(top.orphan, 0).to(ids.dtype)
            logprobs[:-1, :-1] = logprobs[:-1, :-1].masked_fill(top.orphan, float("-inf"))
        positions = teacher_positions(len(prompt_ids), teacher_prompt_length, len(response_ids))
        ids, logprobs = ids[positions], logprobs[positions]
        ids[:-1, -1] = torch.tensor((prompt_ids + response_ids)[1:], dtype=ids.dtype)
        return ids, logprobs


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
        """verl starts its teacher servers from ``distillation.teacher_models``. A teacher that reads another
        prompt or through a special-token map gets its own requests, which verl's agent loop sends it."""
        requests = {}
        for path in self.model_paths(config).values():
            token_map = self.special_token_maps.get(str(path))
            if token_map is not None or self.teacher_prompts is not None:
                requests[str(path)] = ServerTeacherRequests(str(path), token_map, self.teacher_prompts)
        if requests:
            use_teacher_requests(config, requests)

    def install(self) -> None:
        register_vllm_replica(extract_prompt_logprobs_with_sampled_token)

    def teacher_prompt_lengths(self, batch) -> torch.Tensor | None:
        if self.teacher_prompts is None:
            return None
        extra_fields = read_per_sample(batch, "extra_fields")
        return torch.tensor([fields[TEACHER_PROMPT_LENGTH_KEY] for fields in extra_fields])

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
