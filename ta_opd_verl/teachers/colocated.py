"""``ta_opd.teacher=fsdp``: the teacher model colocated in the actor's worker processes, run inside the
scoring forward on the same micro-batch, so one logits processor sees the student's and the teacher's full
logits. No teacher pool, no teacher server, one teacher forward per step.

Per position it gives everything TA-OPD needs, exactly: D and C (C from the teacher's log-probs AT THE
STUDENT's top-k ids, Eq. 10, or the lower bound Eq. 17 with ``compatibility=lower_bound``), and the rows a
teacher server would return (`ta_opd_verl.protocol`'s layout), which the driver stores as ``teacher_ids``
/ ``teacher_logprobs`` for the update. With ``loss=reverse_kl_full`` it runs again in the update's forward
and gives the full-vocabulary reverse KL at the selected positions. The math is
`ta_opd_verl.teachability` (`teacher_entries`, `token_statistics`) and `ta_opd_verl.opd_loss`.

The teacher's ``[N, V]`` logits are never materialised: the forward stops at the final hidden states
``[N, H]`` and the output layer runs a block of rows at a time (`ta_opd_verl.teacher_head`), so the extra
memory is the hidden states plus one block whatever N. `body_and_head` is the one place that knows how a
Hugging Face causal LM is built, and `LoadedTeacher` checks that knowledge on each model it loads.

With a special-token map (`ta_opd_verl.special_tokens`: a teacher whose added tokens differ from the
student's) the teacher reads the student's sequence through the map and its log-probs come back in the
student's id space block by block (`StudentSpaceBlocks`), before anything is computed from them: D, C,
the rows and the reverse KL are all in the student's ids. The scoring forward then also returns the
teacher's mass on ids the student cannot place (`TEACHER_ORPHAN_MASS_FIELD`), and the sampled token's
teacher log-prob is the one at the id the teacher read.

With a teacher-side prompt (`ta_opd_verl.teacher_prompts`) the driver renders each sample's teacher prompt
with the teacher's tokenizer before the scoring forward (`before_scoring`); the workers run the teacher on
its prompt followed by the student's response and take its hidden states back into the student's packed
order (`teacher_sequences`), so every row after this is lined up with the student's positions.

The teacher runs at temperature 1.0, like verl's teacher servers (which force 1.0 for prompt log-probs):
its logits are never divided by the rollout temperature, while the student's arrive already divided. It is
given the student's input the way verl's engine gave it to the student (packed with ``position_ids``, or
right-padded with an attention mask; `ta_opd_verl.verl_fence.worker`), and it is FSDP2-sharded on the
actor's mesh like verl's reference policy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM

from ta_opd_verl.config import TAOPDConfigError
from ta_opd_verl.opd_loss import reverse_kl_full_from_blocks
from ta_opd_verl.protocol import (
    LOWER_BOUND_COMPATIBILITY_FIELD,
    LOWER_BOUND_DISAGREEMENT_FIELD,
    SAMPLED_LOGPROB_FIELD,
    TEACHER_IDS_FIELD,
    TEACHER_LOGPROBS_FIELD,
    TEACHER_ORPHAN_MASS_FIELD,
    TEACHER_PROMPT_IDS_FIELD,
    stack_teacher_rows,
    teacher_entry_fields,
    teacher_entry_outputs,
)
from ta_opd_verl.special_tokens import (
    SpecialTokenMap,
    StudentSpaceBlocks,
    student_ids_without_counterpart,
    student_to_teacher_ids,
)
from ta_opd_verl.teachability import DEFAULT_PROB_FLOOR, teacher_entries, token_statistics
from ta_opd_verl.teacher_head import LogProbBlocks, head_log_prob_blocks, rows_per_block
from ta_opd_verl.teacher_prompts import chat_messages, teacher_positions
from ta_opd_verl.teachers.base import (
    TEACHER_KEY,
    TEACHER_PATH_KEY,
    Teacher,
    skipped_entropy,
    statistics_outputs,
)
from ta_opd_verl.verl_fence.config import disable_verl_teacher
from ta_opd_verl.verl_fence.transfer_queue import read_fields, read_per_sample, write_fields
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
Result = TypeVar("Result")


def dumps_lower_bound(settings) -> bool:
    """Whether the colocated teacher's scoring forward also returns the lower-bound D and C (``settings``:
    the ``ta_opd`` block): only the selection dump reads them, and only exact C differs from them."""
    return settings.compatibility == "exact" and bool(settings.selection_dump_dir)


class ColocatedFSDPTeacher(Teacher):
    name = "fsdp"
    colocated = True

    def __init__(self, attn_implementation: str | None = None, teacher_path: str | None = None):
        super().__init__()
        # The student's attention kernel, which the teacher uses too.
        self.attn_implementation = attn_implementation
        # The teacher's folder, whose tokenizer renders a teacher-side prompt in the driver.
        self.teacher_path = teacher_path

    @classmethod
    def from_config(cls, config: DictConfig) -> ColocatedFSDPTeacher:
        override = OmegaConf.select(config, "actor_rollout_ref.model.override_config", default=None) or {}
        attention = override.get("attn_implementation", _VERL_DEFAULT_ATTENTION)
        return cls(attention, OmegaConf.select(config, TEACHER_PATH_KEY))

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
        fields = (
            [LOWER_BOUND_DISAGREEMENT_FIELD, LOWER_BOUND_COMPATIBILITY_FIELD]
            if dumps_lower_bound(settings)
            else []
        )
        return fields + [TEACHER_ORPHAN_MASS_FIELD] if self._special_token_map(settings) else fields

    def _special_token_map(self, settings) -> SpecialTokenMap | None:
        return self.special_token_maps.get(settings.teacher_path)

    def before_scoring(self, batch):
        """With a teacher-side prompt: each sample's teacher prompt ids (`TEACHER_PROMPT_IDS_FIELD`), rendered
        here, in the driver, with the teacher's tokenizer."""
        prompts = self.teacher_prompts
        if prompts is None:
            return batch
        field = prompts.source_field
        ids = [
            torch.tensor(prompts.prompt_ids(self.teacher_path, chat_messages(messages, field)))
            for messages in read_per_sample(batch, field)
        ]
        nested = torch.nested.as_nested_tensor(ids, layout=torch.jagged)
        return write_fields(batch, {TEACHER_PROMPT_IDS_FIELD: nested})

    def teacher_prompt_lengths(self, batch) -> torch.Tensor | None:
        if self.teacher_prompts is None:
            return None
        return read_fields(batch, [TEACHER_PROMPT_IDS_FIELD])[TEACHER_PROMPT_IDS_FIELD].offsets().diff()

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
        """Run this process's teacher on the micro-batch and score both models, the teacher's output layer
        block by block."""
        settings = loss_fn.settings
        token_map = self._special_token_map(settings)
        vocab = student_logits.shape[-1]
        sampled_ids = torch.roll(data["input_ids"].values(), shifts=-1, dims=0)

        def score(hidden: torch.Tensor, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
            blocks = head_log_prob_blocks(
                hidden, head.weight, head.bias, vocab=vocab, block_rows=rows_per_block(vocab)
            )
            if token_map is not None:
                read_ids = student_to_teacher_ids(sampled_ids, token_map)
                blocks = StudentSpaceBlocks(blocks, token_map, len(read_ids), read_ids.device, read_ids)
            outputs = score_with_teacher(
                student_logits,
                blocks,
                sampled_ids,
                **settings.scoring_options(),
                topk=loss_fn.loss_config.topk,
                exact_compatibility=settings.compatibility == "exact",
                lower_bound_outputs=dumps_lower_bound(settings),
            )
            if token_map is not None:
                # The teacher's log-prob of the token it read: finite also for a student id that reads no
                # column of the distribution (its teacher id belongs to another student id).
                outputs[SAMPLED_LOGPROB_FIELD] = blocks.read_logprobs.unsqueeze(0)
                outputs[TEACHER_ORPHAN_MASS_FIELD] = blocks.orphan_mass.unsqueeze(0)
            return outputs

        return self._teacher(loss_fn, student_logits.device).run_with_head(data, score, token_map)

    def reverse_kl_full(self, loss_fn, student_rows: torch.Tensor, data, rows: torch.Tensor) -> torch.Tensor:
        """Run the teacher on the update's micro-batch again and take its output layer at ``rows`` only,
        block by block: KL(p_θ || p_T) over the whole vocabulary (`opd_loss.reverse_kl_full`) at each."""
        token_map = self._special_token_map(loss_fn.settings)
        vocab = student_rows.shape[-1]

        def kl(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
            blocks = head_log_prob_blocks(
                hidden[rows], head.weight, head.bias, vocab=vocab, block_rows=rows_per_block(vocab)
            )
            left_out = None
            if token_map is not None:
                blocks = StudentSpaceBlocks(blocks, token_map, len(rows), student_rows.device)
                common = min(head.weight.shape[0], vocab)
                left_out = torch.tensor(
                    student_ids_without_counterpart(token_map, common), device=student_rows.device
                )
            # The teacher's forward runs without gradients; the student's rows need one.
            with torch.enable_grad():
                return reverse_kl_full_from_blocks(student_rows, blocks, left_out)

        return self._teacher(loss_fn, student_rows.device).run_with_head(data, kl, token_map)

    def _teacher(self, loss_fn, device: torch.device) -> LoadedTeacher:
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
        return loaded_teacher(spec, device)


@dataclass(frozen=True)
class TeacherSpec:
    """What identifies one loaded teacher in a worker process."""

    path: str
    dtype: str
    attn_implementation: str | None
    fsdp_size: int


class TeacherStructureError(RuntimeError):
    """The teacher model is not built as the colocated teacher's blocked output layer assumes."""


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The teacher's body (its output's first field: the final hidden states, after the last norm) and its
    output layer, the one place that knows how a Hugging Face causal LM is built: ``model.base_model`` and
    ``model.get_output_embeddings()``, a linear layer whose output is the logits as they are (no soft-capping
    or scaling after it; `LoadedTeacher` checks this on the loaded model), and a ``forward`` that takes
    ``logits_to_keep``, so that its own output layer runs on one position only."""
    name = type(model).__name__
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is model or not isinstance(head, torch.nn.Linear):
        raise TeacherStructureError(
            f"the fsdp teacher needs a Hugging Face causal LM with a base model and a linear output layer "
            f"(model.base_model, model.get_output_embeddings()); {name} has neither or not both"
        )
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise TeacherStructureError(
            f"{name}.forward takes no logits_to_keep: the fsdp teacher cannot stop it from computing the "
            "[N, V] logits it computes block by block instead"
        )
    return body, head


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
        self.body, self.head = body_and_head(model)
        self.sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.sharded:
            shard_like_reference_policy(model, spec.fsdp_size, device)
        else:
            model.to(device)
        self.model = model
        self._check_head(device)

    @torch.no_grad()
    def run_with_head(
        self,
        data,
        use: Callable[[torch.Tensor, torch.nn.Linear], Result],
        token_map: SpecialTokenMap | None = None,
    ) -> Result:
        """Run the teacher on a verl micro-batch (`teacher_sequences`: its own prompts where the batch has
        them, the ids read through ``token_map`` when given) and return ``use(hidden, head)``: its final
        hidden states ``[total_nnz, H]`` in the packed order of the student's logits, and its output layer.

        ``use`` runs inside the teacher's forward, where FSDP2 has gathered the output layer; the model's own
        output layer runs on one position per sequence. The forward is in the teacher's own dtype (the
        forward's autocast is switched off)."""
        if data["position_ids"].dim() == 3:
            raise NotImplementedError(
                "the fsdp teacher takes text models only (multimodal rope position_ids are not supported)"
            )
        input_ids, position_ids, rows = teacher_sequences(data, token_map)
        lengths = input_ids.offsets().diff()
        if non_tensor(data, "use_remove_padding", default=True):
            inputs = {
                "input_ids": input_ids.values().unsqueeze(0),
                "position_ids": position_ids.values().unsqueeze(0),
                "attention_mask": None,
            }
        else:
            pad_token_id = non_tensor(data, "pad_token_id", default=0)
            size = (input_ids.shape[0], int(lengths.max()))
            inputs = {
                "input_ids": torch.nested.to_padded_tensor(input_ids, pad_token_id, output_size=size),
                "position_ids": torch.nested.to_padded_tensor(position_ids, 0, output_size=size),
                "attention_mask": build_attention_mask_from_nested(input_ids, max_seq_len=size[1]),
            }

        def packed(hidden: torch.Tensor) -> torch.Tensor:
            if inputs["attention_mask"] is None:
                hidden = hidden[0]
            else:
                hidden = torch.cat([row[:n] for row, n in zip(hidden, lengths.tolist(), strict=True)])
            return hidden if rows is None else hidden[rows.to(hidden.device)]

        result, _ = self._forward(inputs, lambda hidden: use(packed(hidden), self.head))
        return result

    def _forward(self, inputs: dict, use: Callable[[torch.Tensor], Result]) -> tuple[Result, torch.Tensor]:
        """``use`` of the body's output inside the forward, and the model's own logits (one position)."""
        results = []
        hook = self.body.register_forward_hook(lambda _module, _args, output: results.append(use(output[0])))
        if isinstance(self.head, FSDPModule):
            # An output layer sharded on its own (verl does so when it is not tied to the embedding) is
            # gathered only for its own forward, after the body's: gather it for ``use`` (the model's own
            # call then finds it gathered and reshards it).
            self.head.unshard()
        try:
            with torch.autocast(device_type=inputs["input_ids"].device.type, enabled=False):
                output = self.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            hook.remove()
        if self.sharded:
            # FSDP2 keeps the root module's parameters gathered after a forward; free them now.
            self.model.reshard()
        (result,) = results
        return result, output.logits

    @torch.no_grad()
    def _check_head(self, device: torch.device) -> None:
        """The model's own logits at a few positions equal its output layer applied to the hidden states
        the body hook sees (what `body_and_head` assumes): a model that transforms its logits after the
        output layer (soft-capping, a logit scale) is refused here, not silently mis-scored."""
        ids = torch.arange(4, device=device).unsqueeze(0)
        inputs = {"input_ids": ids, "position_ids": ids, "attention_mask": None}
        ours, logits = self._forward(inputs, lambda hidden: self.head(hidden[:, -1:]).float())
        if not torch.allclose(ours, logits.float(), rtol=1e-3, atol=1e-3):
            raise TeacherStructureError(
                f"{type(self.model).__name__}'s logits are not its output layer applied to its final hidden "
                f"states (largest difference {(ours - logits.float()).abs().max().item():.3g}): the fsdp "
                "teacher's blocked output layer cannot score this model"
            )


def teacher_sequences(data, token_map: SpecialTokenMap | None):
    """The teacher's input for a verl micro-batch: ``(input_ids, position_ids, rows)``, the first two nested
    by sequence in the teacher's ids.

    Without teacher prompts it is the student's input (read through ``token_map``) and ``rows`` is None.
    With `TEACHER_PROMPT_IDS_FIELD` each sequence is the teacher's prompt, then the student's response (its
    last ``len(response_mask)`` tokens) read through ``token_map``, at positions 0, 1, ...; ``rows`` then
    indexes the teacher's packed rows into the student's packed order (`teacher_positions`)."""
    input_ids = data["input_ids"]
    if TEACHER_PROMPT_IDS_FIELD not in data.keys():
        if token_map is not None:
            teacher_ids = student_to_teacher_ids(input_ids.values(), token_map)
            input_ids = torch.nested.nested_tensor_from_jagged(teacher_ids, input_ids.offsets())
        return input_ids, data["position_ids"], None
    sequences, rows, start = [], [], 0
    response_lengths = data["response_mask"].offsets().diff().tolist()
    for student, teacher_prompt, response_length in zip(
        input_ids.unbind(), data[TEACHER_PROMPT_IDS_FIELD].unbind(), response_lengths, strict=True
    ):
        prompt_length = len(student) - response_length
        response = student[prompt_length:]
        if token_map is not None:
            response = student_to_teacher_ids(response, token_map)
        sequences.append(torch.cat([teacher_prompt.to(student), response]))
        rows.append(start + teacher_positions(prompt_length, len(teacher_prompt), response_length))
        start += len(sequences[-1])
    teacher_ids = torch.nested.as_nested_tensor(sequences, layout=torch.jagged)
    positions = [torch.arange(len(sequence), device=sequence.device) for sequence in sequences]
    return teacher_ids, torch.nested.as_nested_tensor(positions, layout=torch.jagged), torch.cat(rows)


_LOADED: dict[TeacherSpec, LoadedTeacher] = {}


def loaded_teacher(spec: TeacherSpec, device: torch.device) -> LoadedTeacher:
    """This process's teacher for ``spec``, loaded on first use (the first scoring micro-batch, which every
    rank reaches together, so the FSDP2 set-up's collectives line up)."""
    if spec not in _LOADED:
        _LOADED[spec] = LoadedTeacher(spec, device)
    return _LOADED[spec]


def score_with_teacher(
    student_logits: torch.Tensor,
    teacher_log_probs: LogProbBlocks,
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
    """The scoring forward's per-token outputs, each ``(1, total_nnz)``, from both models.

    ``student_logits`` ``(1, N, V)`` as verl hands them to the processor; ``teacher_log_probs`` the
    teacher's log-probs in the same order, block by block (`ta_opd_verl.teacher_head`: from its hidden
    states, or ``logit_log_prob_blocks`` of its logits); ``sampled_ids`` ``(N,)`` the next token at each
    position. Returns D and C, the student's top-k entropy with ``entropy_mode=topk``, and the teacher rows
    as `teacher_entry_fields`; with ``lower_bound_outputs`` also the lower-bound D and C, which cost one
    more pass over the student's logits."""
    student_topk_ids = torch.topk(student_logits[0], k, dim=-1).indices
    top_ids, top_logprobs, at_student_topk, at_sampled = teacher_entries(
        teacher_log_probs, student_topk_ids, sampled_ids, topk
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
