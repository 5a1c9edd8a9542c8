"""The colocated FSDP teacher (issue 5, design (a)): the teacher model lives in the actor's worker process
and scores the same micro-batch inside the old-log-prob forward, so one logits processor sees the student's
and the teacher's full logits. Chosen with ``distillation.distillation_loss.ta_opd.teacher=fsdp``.

Per position it gives everything TA-OPD needs, exactly: D and C (C from the teacher's log-probs AT THE
STUDENT's top-k ids, Eq. 10, or the lower bound Eq. 17 if ``compatibility=lower_bound``), and the rows a
teacher server would return (the teacher's top-K ids and log-probs, then the sampled token), which the
trainer writes to ``teacher_ids`` / ``teacher_logprobs`` for the update. One teacher forward per step; the
math is `ta_opd_verl.teachability` (`teacher_entries`, `token_statistics`).

The teacher runs at temperature 1.0, like verl's teacher servers (``_get_teacher_sampling_params`` in
``verl/experimental/teacher_loop/teacher_manager.py`` forces 1.0 for prompt log-probs): its logits are never
divided by the rollout temperature, while the student's arrive already divided.

verl 0.9.1 internals this leans on:
- ``FSDPEngineWithLMHead.prepare_model_outputs`` (``verl/workers/engine/fsdp/transformer_impl.py``) calls the
  processor with ``student_logits`` of shape ``(1, total_nnz, V)`` in packed order (sequence after sequence,
  padding dropped) and the micro-batch whose ``input_ids`` / ``position_ids`` are nested (jagged) tensors.
  With the non-tensor flag ``use_remove_padding`` the student saw the packed sequence with ``position_ids``
  and no attention mask; without it, right-padded rows with ``build_attention_mask_from_nested``
  (``prepare_model_inputs``). The teacher is given the same input the same way. Its labels are
  ``torch.roll(input_ids.values(), -1)``, verl's ``input_ids_rmpad_rolled``.
- Every processor output must be ONE value per token (``assert v.shape == (total_nnz,)``), so the teacher's
  top-K ids and log-probs leave the worker as K fields each (`teacher_entry_fields`).
- ``create_device_mesh`` (``verl/workers/engine/fsdp/utils.py``) with the actor's ``fsdp_size`` rebuilds the
  actor's FSDP mesh (``FSDPEngine._init_device_mesh``); ``apply_fsdp2`` (``verl/utils/fsdp_utils.py``) wraps
  the decoder layers and the root with ``fully_shard``, as verl wraps its reference policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ta_opd_verl.teachability import teacher_entries, token_statistics

# Per-token fields of the scoring forward with the fsdp teacher, beside D and C (ta_opd_verl.loss).
TEACHER_ID_FIELD = "ta_opd_teacher_id_{}"
TEACHER_LOGPROB_FIELD = "ta_opd_teacher_logprob_{}"
SAMPLED_ID_FIELD = "ta_opd_teacher_sampled_id"
SAMPLED_LOGPROB_FIELD = "ta_opd_teacher_sampled_logprob"
# D and C as ``compatibility=lower_bound`` would give them from the same teacher top-K (C of Eq. 17; D
# without the teacher's mass on student ids outside its list): what a server teacher would have scored.
# Returned only with exact C and a selection dump (`dumps_lower_bound`), so the dump shows how much exact C
# changes the selection (``python -m ta_opd_verl.bench teacher``).
LOWER_BOUND_DISAGREEMENT_FIELD = "ta_opd_lower_bound_disagreement"
LOWER_BOUND_COMPATIBILITY_FIELD = "ta_opd_lower_bound_compatibility"

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Rows of teacher log-probs per float32 block in `teacher_entries`: about 256 MiB, as in
# `teachability.token_statistics` (measured there: large blocks beat one [N, V] pass on CPU).
_BLOCK_BYTES = 256 * 2**20


def teacher_entry_fields(topk: int) -> list[str]:
    """Names of the per-token fields that carry the teacher rows: K ids, K log-probs, the sampled token."""
    ids = [TEACHER_ID_FIELD.format(i) for i in range(topk)]
    logprobs = [TEACHER_LOGPROB_FIELD.format(i) for i in range(topk)]
    return [*ids, SAMPLED_ID_FIELD, *logprobs, SAMPLED_LOGPROB_FIELD]


def stack_teacher_rows(fields, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token fields of one batch (nested, one value per sequence position) as verl's
    ``teacher_ids`` / ``teacher_logprobs``: nested ``[positions, topk + 1]`` rows, the top-K entries then
    the sampled token, the layout TA-OPD's teacher server writes (``ta_opd_verl.teacher_server``)."""
    id_names = [TEACHER_ID_FIELD.format(i) for i in range(topk)] + [SAMPLED_ID_FIELD]
    logprob_names = [TEACHER_LOGPROB_FIELD.format(i) for i in range(topk)] + [SAMPLED_LOGPROB_FIELD]
    offsets = fields[SAMPLED_ID_FIELD].offsets()
    ids = torch.stack([fields[name].values() for name in id_names], dim=-1).to(torch.int32)
    logprobs = torch.stack([fields[name].values() for name in logprob_names], dim=-1).float()
    return (
        torch.nested.nested_tensor_from_jagged(ids, offsets),
        torch.nested.nested_tensor_from_jagged(logprobs, offsets),
    )


def dumps_lower_bound(settings) -> bool:
    """Whether the scoring forward also returns the lower-bound D and C (``settings``: the ``ta_opd``
    block): only the selection dump reads them, and only exact C differs from them."""
    return (
        settings.teacher == "fsdp" and settings.compatibility == "exact" and bool(settings.selection_dump_dir)
    )


@dataclass(frozen=True)
class TeacherSpec:
    """What identifies one loaded teacher in a worker process."""

    path: str
    dtype: str
    attn_implementation: str | None
    fsdp_size: int


class ColocatedTeacher:
    """The teacher model in this worker process: loaded once, FSDP2-sharded on the actor's mesh when
    torch.distributed is up (verl's workers always initialise it), its parameter shards kept on the CPU
    between forwards on an accelerator (FSDP2 ``CPUOffloadPolicy``: each layer is copied in for its forward
    and freed after), so the student's rollout and training get the device memory back. On CPU the
    offload is a no-op. No gradients: ``torch.no_grad`` and frozen parameters."""

    def __init__(self, spec: TeacherSpec, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            dtype=TEACHER_DTYPES[spec.dtype],
            **({"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}),
        )
        model.eval().requires_grad_(False)
        self.sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.sharded:
            self._shard(model, device)
        else:
            model.to(device)
        self.model = model

    def _shard(self, model, device: torch.device) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
        from verl.utils.fsdp_utils import apply_fsdp2
        from verl.workers.engine.fsdp.utils import create_device_mesh

        world_size = torch.distributed.get_world_size()
        mesh = create_device_mesh(world_size=world_size, fsdp_size=self.spec.fsdp_size)
        offload = CPUOffloadPolicy(pin_memory=True) if device.type != "cpu" else OffloadPolicy()
        apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True, "offload_policy": offload}, {})

    @torch.no_grad()
    def logits(self, data) -> torch.Tensor:
        """The teacher's ``[total_nnz, V_teacher]`` logits for a verl micro-batch, in the packed order of the
        student's logits, computed in the teacher's own dtype (the forward's autocast is switched off)."""
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import build_attention_mask_from_nested

        input_ids, position_ids = data["input_ids"], data["position_ids"]
        if position_ids.dim() == 3:
            raise NotImplementedError(
                "the fsdp teacher takes text models only (multimodal rope position_ids are not supported)"
            )
        device = input_ids.values().device
        with torch.autocast(device_type=device.type, enabled=False):
            if tu.get_non_tensor_data(data=data, key="use_remove_padding", default=True):
                output = self.model(
                    input_ids=input_ids.values().unsqueeze(0),
                    position_ids=position_ids.values().unsqueeze(0),
                    attention_mask=None,
                    use_cache=False,
                )
                logits = output.logits[0]
            else:
                pad_token_id = tu.get_non_tensor_data(data=data, key="pad_token_id", default=0)
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


_TEACHERS: dict[TeacherSpec, ColocatedTeacher] = {}


def colocated_teacher(spec: TeacherSpec, device: torch.device) -> ColocatedTeacher:
    """This process's teacher for ``spec``, loaded on first use (the first scoring micro-batch, which every
    rank reaches together, so the FSDP2 set-up's collectives line up)."""
    if spec not in _TEACHERS:
        _TEACHERS[spec] = ColocatedTeacher(spec, device)
    return _TEACHERS[spec]


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
) -> dict[str, torch.Tensor]:
    """The scoring forward's per-token outputs, each ``(1, total_nnz)``, from both models' logits.

    ``student_logits`` ``(1, N, V)`` as verl hands them to the processor; ``teacher_logits`` ``(N, V_T)`` in
    the same order; ``sampled_ids`` ``(N,)`` the next token at each position. Returns D and C (keys of
    ``ta_opd_verl.loss``), the student's top-k entropy with ``entropy_mode=topk``, and the teacher rows as
    `teacher_entry_fields`; with ``lower_bound_outputs`` also the lower-bound D and C
    (``LOWER_BOUND_*_FIELD``), which cost one more pass over the student's logits."""
    from ta_opd_verl.loss import COMPATIBILITY_FIELD, DISAGREEMENT_FIELD, TOPK_ENTROPY_FIELD

    rows, vocab = student_logits.shape[1], student_logits.shape[-1]
    teacher_logits = _on_student_vocabulary(teacher_logits, vocab)
    student_topk_ids = torch.topk(student_logits[0], k, dim=-1).indices
    top_ids, top_logprobs, at_student_topk, at_sampled = teacher_entries(
        teacher_logits,
        student_topk_ids,
        sampled_ids,
        topk,
        chunk_rows=max(1, _BLOCK_BYTES // (4 * vocab)),
    )
    topk_entropy = entropy_mode == "topk"

    def scored(exact: torch.Tensor | None, mode: str):
        return token_statistics(
            student_logits,
            top_ids.unsqueeze(0),
            top_logprobs.unsqueeze(0),
            k=k,
            student_probs=student_probs,
            teacher_logprobs_at_student_topk=exact,
            student_topk_ids=student_topk_ids.unsqueeze(0),
            entropy_mode=mode,
            # As in the server path: the full-vocabulary H is verl's own entropy output of this forward.
            student_entropy=None if mode == "topk" else torch.zeros((1, rows), device=student_logits.device),
        )

    stats = scored(at_student_topk.unsqueeze(0) if exact_compatibility else None, entropy_mode)
    outputs = {DISAGREEMENT_FIELD: stats.disagreement, COMPATIBILITY_FIELD: stats.compatibility}
    if topk_entropy:
        outputs[TOPK_ENTROPY_FIELD] = stats.entropy
    if lower_bound_outputs:
        # H does not depend on the teacher: skip the top-k entropy pass.
        lower_bound = scored(None, "full")
        outputs[LOWER_BOUND_DISAGREEMENT_FIELD] = lower_bound.disagreement
        outputs[LOWER_BOUND_COMPATIBILITY_FIELD] = lower_bound.compatibility
    for i in range(topk):
        outputs[TEACHER_ID_FIELD.format(i)] = top_ids[:, i].unsqueeze(0)
        outputs[TEACHER_LOGPROB_FIELD.format(i)] = top_logprobs[:, i].unsqueeze(0)
    outputs[SAMPLED_ID_FIELD] = sampled_ids.unsqueeze(0)
    outputs[SAMPLED_LOGPROB_FIELD] = at_sampled.unsqueeze(0)
    return outputs


def score_micro_batch(loss_fn, student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    """The processor of the scoring forward with the fsdp teacher (called by
    ``TAOPDLossFunction.process_logits``): run this process's teacher on the micro-batch, then score."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size

    if get_ulysses_sequence_parallel_world_size() > 1:
        # The student's logits are then one rank's slice of the packed sequence; the teacher is not sliced.
        raise NotImplementedError("the fsdp teacher does not support Ulysses sequence parallelism")
    settings = loss_fn.settings
    spec = TeacherSpec(
        path=settings.teacher_path,
        dtype=settings.teacher_dtype,
        attn_implementation=loss_fn.teacher_attn_implementation,
        fsdp_size=loss_fn.actor_config.engine.fsdp_size,
    )
    teacher = colocated_teacher(spec, student_logits.device)
    teacher_logits = teacher.logits(data)
    sampled_ids = torch.roll(data["input_ids"].values(), shifts=-1, dims=0)
    return score_with_teacher_logits(
        student_logits,
        teacher_logits,
        sampled_ids,
        k=settings.k,
        topk=loss_fn.loss_config.topk,
        student_probs=settings.student_probs,
        entropy_mode=settings.entropy_mode,
        exact_compatibility=settings.compatibility == "exact",
        lower_bound_outputs=dumps_lower_bound(settings),
    )
