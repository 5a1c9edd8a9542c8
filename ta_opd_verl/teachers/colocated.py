"""``ta_opd.teacher=fsdp``: the teacher model colocated in the actor's worker processes, run inside the
scoring forward on the same micro-batch, so one logits processor sees the student's and the teacher's full
logits. No teacher pool, no teacher server, one teacher forward per step.

Per position it gives everything TA-OPD needs, exactly: D and C (C from the teacher's log-probs AT THE
STUDENT's top-k ids, Eq. 10, or the lower bound Eq. 17 with ``compatibility=lower_bound``), and the rows a
teacher server would return (`ta_opd_verl.protocol`'s layout), which the driver stores as ``teacher_ids``
/ ``teacher_logprobs`` for the update. The math is `ta_opd_verl.teachability` (`teacher_entries`,
`token_statistics`).

The teacher runs at temperature 1.0, like verl's teacher servers (which force 1.0 for prompt log-probs):
its logits are never divided by the rollout temperature, while the student's arrive already divided. It is
given the student's input the way verl's engine gave it to the student (packed with ``position_ids``, or
right-padded with an attention mask; `ta_opd_verl.verl_fence.worker`), and it is FSDP2-sharded on the
actor's mesh like verl's reference policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from ta_opd_verl.config import TAOPDConfigError
from ta_opd_verl.protocol import (
    LOWER_BOUND_COMPATIBILITY_FIELD,
    LOWER_BOUND_DISAGREEMENT_FIELD,
    TEACHER_IDS_FIELD,
    TEACHER_LOGPROBS_FIELD,
    stack_teacher_rows,
    teacher_entry_fields,
    teacher_entry_outputs,
)
from ta_opd_verl.teachability import DEFAULT_PROB_FLOOR, teacher_entries, token_statistics
from ta_opd_verl.teachers.base import (
    TEACHER_KEY,
    TEACHER_PATH_KEY,
    Teacher,
    skipped_entropy,
    statistics_outputs,
)
from ta_opd_verl.verl_fence.config import disable_verl_teacher
from ta_opd_verl.verl_fence.transfer_queue import read_fields, write_fields
from ta_opd_verl.verl_fence.worker import (
    build_attention_mask_from_nested,
    non_tensor,
    sequence_parallel_size,
    shard_like_reference_policy,
)

SEQUENCE_PARALLEL_KEY = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
# verl's default attention for the student (HFModelConfig, verl/workers/config/model.py).
_VERL_DEFAULT_ATTENTION = "flash_attention_2"
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Rows of teacher log-probs per float32 block in `teacher_entries`: about 256 MiB, as in
# `teachability.token_statistics`.
_BLOCK_BYTES = 256 * 2**20


def dumps_lower_bound(settings) -> bool:
    """Whether the colocated teacher's scoring forward also returns the lower-bound D and C (``settings``:
    the ``ta_opd`` block): only the selection dump reads them, and only exact C differs from them."""
    return settings.compatibility == "exact" and bool(settings.selection_dump_dir)


class ColocatedFSDPTeacher(Teacher):
    name = "fsdp"
    colocated = True

    def __init__(self, attn_implementation: str | None = None):
        # The student's attention kernel, which the teacher uses too.
        self.attn_implementation = attn_implementation

    @classmethod
    def from_config(cls, config: DictConfig) -> ColocatedFSDPTeacher:
        override = OmegaConf.select(config, "actor_rollout_ref.model.override_config", default=None) or {}
        return cls(override.get("attn_implementation", _VERL_DEFAULT_ATTENTION))

    def model_paths(self, config: DictConfig) -> dict[str, str | None]:
        return {TEACHER_PATH_KEY: OmegaConf.select(config, TEACHER_PATH_KEY)}

    def check_config(self, config: DictConfig, loss_config) -> None:
        sequence_parallel = OmegaConf.select(config, SEQUENCE_PARALLEL_KEY, default=1) or 1
        if sequence_parallel > 1:
            raise TAOPDConfigError(
                f"{SEQUENCE_PARALLEL_KEY}={sequence_parallel}: the fsdp teacher scores whole sequences, not "
                f"Ulysses slices; accepted with {TEACHER_KEY}=fsdp: 1"
            )
        configured = OmegaConf.select(config, "distillation.teacher_models", default={}) or {}
        if len(configured) > 1:
            raise TAOPDConfigError(
                f"distillation.teacher_models has {len(configured)} teachers ({', '.join(configured)}): "
                f"multi-teacher routing needs {TEACHER_KEY}=server; {TEACHER_KEY}=fsdp runs the one teacher "
                f"at {TEACHER_PATH_KEY}"
            )

    def prepare_config(self, config: DictConfig) -> None:
        disable_verl_teacher(config)

    def install(self) -> None:
        """Nothing to install: the teacher loads in each worker on its first scoring micro-batch."""

    def score_fields(self, settings, topk: int) -> list[str]:
        return (
            [LOWER_BOUND_DISAGREEMENT_FIELD, LOWER_BOUND_COMPATIBILITY_FIELD]
            if dumps_lower_bound(settings)
            else []
        )

    def after_scoring(self, batch, topk: int):
        """The per-token teacher fields as ``teacher_ids`` / ``teacher_logprobs`` over the whole sequence
        (row t for token t + 1, as a teacher server writes them)."""
        teacher_ids, teacher_logprobs = stack_teacher_rows(
            read_fields(batch, teacher_entry_fields(topk)), topk
        )
        return write_fields(batch, {TEACHER_IDS_FIELD: teacher_ids, TEACHER_LOGPROBS_FIELD: teacher_logprobs})

    def update_leaves_out(self, topk: int) -> list[str]:
        # The rows are stacked already; the per-column copies would travel to every micro-batch.
        return teacher_entry_fields(topk)

    def score_micro_batch(self, loss_fn, student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
        """Run this process's teacher on the micro-batch, then score both models' logits."""
        if sequence_parallel_size() > 1:
            # The student's logits are then one rank's slice of the packed sequence; the teacher's are not.
            raise NotImplementedError("the fsdp teacher does not support Ulysses sequence parallelism")
        settings = loss_fn.settings
        spec = TeacherSpec(
            path=settings.teacher_path,
            dtype=settings.teacher_dtype,
            attn_implementation=self.attn_implementation,
            fsdp_size=loss_fn.actor_config.engine.fsdp_size,
        )
        teacher_logits = loaded_teacher(spec, student_logits.device).logits(data)
        sampled_ids = torch.roll(data["input_ids"].values(), shifts=-1, dims=0)
        return score_with_teacher_logits(
            student_logits,
            teacher_logits,
            sampled_ids,
            **settings.scoring_options(),
            topk=loss_fn.loss_config.topk,
            exact_compatibility=settings.compatibility == "exact",
            lower_bound_outputs=dumps_lower_bound(settings),
        )


@dataclass(frozen=True)
class TeacherSpec:
    """What identifies one loaded teacher in a worker process."""

    path: str
    dtype: str
    attn_implementation: str | None
    fsdp_size: int


class LoadedTeacher:
    """The teacher model in this worker process: loaded once, FSDP2-sharded on the actor's mesh when
    torch.distributed is up (verl's workers always initialise it), its parameter shards kept on the CPU
    between forwards on an accelerator, so the student's rollout and training get the device memory back.
    No gradients: ``torch.no_grad`` and frozen parameters."""

    def __init__(self, spec: TeacherSpec, device: torch.device):
        self.spec = spec
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            dtype=TEACHER_DTYPES[spec.dtype],
            **({"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}),
        )
        model.eval().requires_grad_(False)
        self.sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.sharded:
            shard_like_reference_policy(model, spec.fsdp_size, device)
        else:
            model.to(device)
        self.model = model

    @torch.no_grad()
    def logits(self, data) -> torch.Tensor:
        """The teacher's ``[total_nnz, V_teacher]`` logits for a verl micro-batch, in the packed order of the
        student's logits, computed in the teacher's own dtype (the forward's autocast is switched off)."""
        input_ids, position_ids = data["input_ids"], data["position_ids"]
        if position_ids.dim() == 3:
            raise NotImplementedError(
                "the fsdp teacher takes text models only (multimodal rope position_ids are not supported)"
            )
        device = input_ids.values().device
        with torch.autocast(device_type=device.type, enabled=False):
            if non_tensor(data, "use_remove_padding", default=True):
                output = self.model(
                    input_ids=input_ids.values().unsqueeze(0),
                    position_ids=position_ids.values().unsqueeze(0),
                    attention_mask=None,
                    use_cache=False,
                )
                logits = output.logits[0]
            else:
                pad_token_id = non_tensor(data, "pad_token_id", default=0)
                lengths = input_ids.offsets().diff()
                size = (input_ids.shape[0], int(lengths.max()))
                output = self.model(
                    input_ids=torch.nested.to_padded_tensor(input_ids, pad_token_id, output_size=size),
                    position_ids=torch.nested.to_padded_tensor(position_ids, 0, output_size=size),
                    attention_mask=build_attention_mask_from_nested(input_ids, max_seq_len=size[1]),
                    use_cache=False,
                )
                rows = zip(output.logits, lengths.tolist(), strict=True)
                logits = torch.cat([row[:length] for row, length in rows])
        if self.sharded:
            # FSDP2 keeps the root module's parameters gathered after a forward; free them now.
            self.model.reshard()
        return logits


_LOADED: dict[TeacherSpec, LoadedTeacher] = {}


def loaded_teacher(spec: TeacherSpec, device: torch.device) -> LoadedTeacher:
    """This process's teacher for ``spec``, loaded on first use (the first scoring micro-batch, which every
    rank reaches together, so the FSDP2 set-up's collectives line up)."""
    if spec not in _LOADED:
        _LOADED[spec] = LoadedTeacher(spec, device)
    return _LOADED[spec]


def _on_student_vocabulary(teacher_logits: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """Teacher logits over the student's ids ``[0, student_vocab)``: rows past the student's embedding
    (padding rows, teacher-only added tokens) dropped, ids the teacher lacks given -inf (probability 0).
    `ta_opd_verl.vocab.check_same_vocabulary` has checked that the ids in common mean the same tokens."""
    teacher_vocab = teacher_logits.shape[-1]
    if teacher_vocab >= student_vocab:
        return teacher_logits[:, :student_vocab]
    missing = teacher_logits.new_full((teacher_logits.shape[0], student_vocab - teacher_vocab), -math.inf)
    return torch.cat([teacher_logits, missing], dim=-1)


def score_with_teacher_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    *,
    k: int,
    topk: int,
    student_probs: str,
    entropy_mode: str,
    exact_compatibility: bool,
    lower_bound_outputs: bool = False,
    student_prob_floor: float = DEFAULT_PROB_FLOOR,
    teacher_list: str = "all",
) -> dict[str, torch.Tensor]:
    """The scoring forward's per-token outputs, each ``(1, total_nnz)``, from both models' logits.

    ``student_logits`` ``(1, N, V)`` as verl hands them to the processor; ``teacher_logits`` ``(N, V_T)`` in
    the same order; ``sampled_ids`` ``(N,)`` the next token at each position. Returns D and C, the student's
    top-k entropy with ``entropy_mode=topk``, and the teacher rows as `teacher_entry_fields`; with
    ``lower_bound_outputs`` also the lower-bound D and C, which cost one more pass over the student's
    logits."""
    vocab = student_logits.shape[-1]
    teacher_logits = _on_student_vocabulary(teacher_logits, vocab)
    student_topk_ids = torch.topk(student_logits[0], k, dim=-1).indices
    top_ids, top_logprobs, at_student_topk, at_sampled = teacher_entries(
        teacher_logits,
        student_topk_ids,
        sampled_ids,
        topk,
        chunk_rows=max(1, _BLOCK_BYTES // (4 * vocab)),
    )

    def scored(exact: torch.Tensor | None, mode: str):
        return token_statistics(
            student_logits,
            top_ids.unsqueeze(0),
            top_logprobs.unsqueeze(0),
            k=k,
            student_probs=student_probs,
            student_prob_floor=student_prob_floor,
            teacher_list=teacher_list,
            teacher_logprobs_at_student_topk=exact,
            student_topk_ids=student_topk_ids.unsqueeze(0),
            entropy_mode=mode,
            student_entropy=skipped_entropy(mode, student_logits),
        )

    stats = scored(at_student_topk.unsqueeze(0) if exact_compatibility else None, entropy_mode)
    outputs = statistics_outputs(stats, entropy_mode)
    if lower_bound_outputs:
        # H does not depend on the teacher: skip the top-k entropy pass.
        lower_bound = scored(None, "full")
        outputs[LOWER_BOUND_DISAGREEMENT_FIELD] = lower_bound.disagreement
        outputs[LOWER_BOUND_COMPATIBILITY_FIELD] = lower_bound.compatibility
    return outputs | teacher_entry_outputs(top_ids, top_logprobs, sampled_ids, at_sampled)
