"""The colocated FSDP teacher (``ta_opd.teacher=fsdp``, ``ta_opd_verl/teachers/colocated.py``) without
verl's trainer: the scoring processor with the real tiny teacher on a micro-batch in verl's layout, checked
against a full softmax of the teacher computed here sequence by sequence, and the teacher rows it returns.
(Its refusals: tests/verl/test_checks.py; its driver-side stages: tests/verl/test_teachers.py.)"""

from __future__ import annotations

import pytest
import torch
from student_space import moved_columns
from tensordict import TensorDict
from verl_fixtures import compose_config, nested, run_update, selected_packed_rows, ta_opd_loss_function

from ta_opd_verl.loss import TAOPDLossFunction
from ta_opd_verl.protocol import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    SAMPLED_ID_FIELD,
    SAMPLED_LOGPROB_FIELD,
    SCORE_PHASE,
    TEACHER_ID_FIELD,
    TEACHER_LOGPROB_FIELD,
    TEACHER_ORPHAN_MASS_FIELD,
    TEACHER_PROMPT_IDS_FIELD,
    split_teacher_entries,
    stack_teacher_rows,
    teacher_entry_fields,
)
from ta_opd_verl.special_tokens import SpecialTokenMap

TOPK, K = 16, 8
LENGTHS = (7, 12, 5, 9)
# DistillationConfig validates verl's teacher entry while distillation.enabled=true; the fsdp teacher
# never loads it.
UNUSED_SERVER_TEACHER = "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher"


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair(quiet=True)


def _fsdp_overrides(teacher_path, *extra: str) -> list[str]:
    return [
        UNUSED_SERVER_TEACHER,
        "distillation.distillation_loss.ta_opd.teacher=fsdp",
        f"distillation.distillation_loss.ta_opd.teacher_path={teacher_path}",
        f"distillation.distillation_loss.topk={TOPK}",
        f"distillation.distillation_loss.ta_opd.k={K}",
        *extra,
    ]


def _loss_fn(teacher_path, compatibility: str) -> TAOPDLossFunction:
    config = compose_config(
        "ta_opd_cpu",
        _fsdp_overrides(teacher_path, f"distillation.distillation_loss.ta_opd.compatibility={compatibility}"),
    )
    return ta_opd_loss_function(config)


def _micro_batch(vocab: int, use_remove_padding: bool, seed: int = 0, planted: tuple[int, ...] = ()):
    """A scoring micro-batch as ``FSDPEngineWithLMHead.prepare_model_outputs`` hands it to the processor:
    nested ``input_ids`` / ``position_ids`` (one row per sequence, no padding) and the non-tensor flags.
    ``planted`` ids go at position 3 of the first sequences."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, vocab, (length,), generator=generator) for length in LENGTHS]
    for sequence, token_id in zip(sequences, planted, strict=False):
        sequence[3] = token_id
    data = TensorDict(
        {"input_ids": nested(sequences), "position_ids": nested([torch.arange(n) for n in LENGTHS])},
        batch_size=len(LENGTHS),
    )
    tu.assign_non_tensor(
        data, ta_opd_phase=SCORE_PHASE, use_remove_padding=use_remove_padding, pad_token_id=0, temperature=1.0
    )
    return data, sequences


def _reference(teacher, sequences, student_logits: torch.Tensor, special=None) -> dict[str, torch.Tensor]:
    """Independent float64 computation from the definitions: the teacher run on each sequence alone, full
    softmax; S = student top-k, T = teacher top-k, U = S ∪ T; exact C = Σ_S p_T; D = KL(p̄_T || p̄_S) on U.
    With ``special`` (`_SpecialTokens`) the teacher reads the sequences with the ids replaced by hand, its
    columns are moved by hand and the sampled token's log-prob is the one at the id it read."""
    read = [special.read(s) for s in sequences] if special else sequences
    with torch.no_grad():
        teacher_space = torch.cat(
            [torch.log_softmax(teacher(s.unsqueeze(0)).logits[0].double(), -1) for s in read]
        )
    teacher_log_probs, orphan_mass = special.columns(teacher_space) if special else (teacher_space, None)
    student_log_probs = torch.log_softmax(student_logits[0].double(), -1)
    sampled = torch.roll(torch.cat(sequences), -1)
    s_ids = torch.topk(student_logits[0], K, dim=-1).indices
    t_ids = torch.topk(teacher_log_probs, K, dim=-1).indices
    disagreement, compatibility = [], []
    for row in range(sampled.numel()):
        union = sorted(set(s_ids[row].tolist()) | set(t_ids[row].tolist()))
        p_t = teacher_log_probs[row, union].exp()
        p_s = student_log_probs[row, union].exp()
        p_t, p_s = p_t / p_t.sum(), p_s / p_s.sum()
        # A teacher probability of 0 (a student id without a teacher counterpart) adds no term.
        disagreement.append(torch.where(p_t > 0, p_t * (p_t.log() - p_s.clamp_min(1e-12).log()), 0.0).sum())
        compatibility.append(teacher_log_probs[row, s_ids[row]].exp().sum())
    top = torch.topk(teacher_log_probs, TOPK, dim=-1)
    return {
        "disagreement": torch.stack(disagreement),
        "compatibility": torch.stack(compatibility),
        "lower_bound": torch.stack(
            [
                teacher_log_probs[row, sorted(set(s_ids[row].tolist()) & set(top.indices[row].tolist()))]
                .exp()
                .sum()
                for row in range(sampled.numel())
            ]
        ),
        "top_ids": top.indices,
        "top_logprobs": top.values,
        "sampled_ids": sampled,
        "sampled_logprobs": teacher_space.gather(-1, torch.roll(torch.cat(read), -1)[:, None])[:, 0],
        "orphan_mass": orphan_mass,
    }


class _SpecialTokens:
    """A special-token map over the tiny vocabulary's last ids and what it does, written out by hand: the
    student's end of turn V-1 and pad V-2 are both the teacher's V-3 (the end of turn keeps it), V-4 is a
    teacher orphan and V-5 a student id without a counterpart."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.map = SpecialTokenMap(
            entries={vocab - 1: (vocab - 3, "end_of_turn"), vocab - 2: (vocab - 3, "pad")},
            teacher_orphans=frozenset({vocab - 4}),
            unmapped_student_ids=frozenset({vocab - 5}),
        )
        self.without_counterpart = [vocab - 5, vocab - 4, vocab - 3, vocab - 2]

    def read(self, sequence: torch.Tensor) -> torch.Tensor:
        return torch.where(sequence >= self.vocab - 2, self.vocab - 3, sequence)

    def columns(self, teacher_log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vocab
        return moved_columns(
            teacher_log_probs, {v - 1: v - 3}, self.without_counterpart, [v - 5, v - 4, v - 2, v - 1]
        )


@pytest.fixture(scope="module")
def teacher_model(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_scoring_processor_gives_exact_compatibility_and_the_teachers_rows(
    pair, teacher_model, use_remove_padding
):
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(1)) * 3
    outputs = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    reference = _reference(teacher_model, sequences, student_logits)

    assert set(outputs) == {DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, *teacher_entry_fields(TOPK)}
    for value in outputs.values():
        # verl's prepare_model_outputs asserts one value per packed token.
        assert value.shape == (1, sum(LENGTHS))
    assert_scores_and_rows_match(outputs, reference)
    # Exact C is not the lower bound here: the teacher puts mass on student candidates outside its top-16.
    assert (reference["compatibility"] - reference["lower_bound"]).max() > 1e-3


def assert_scores_and_rows_match(outputs: dict, reference: dict) -> None:
    """The processor's exact D and C and its teacher rows equal the reference's."""
    torch.testing.assert_close(
        outputs[COMPATIBILITY_FIELD][0].double(), reference["compatibility"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        outputs[DISAGREEMENT_FIELD][0].double(), reference["disagreement"], rtol=1e-4, atol=2e-5
    )
    top_ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][0] for i in range(TOPK)], -1)
    top_logprobs = torch.stack([outputs[TEACHER_LOGPROB_FIELD.format(i)][0] for i in range(TOPK)], -1)
    assert torch.equal(top_ids, reference["top_ids"])
    torch.testing.assert_close(top_logprobs.double(), reference["top_logprobs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[SAMPLED_ID_FIELD][0], reference["sampled_ids"])
    torch.testing.assert_close(
        outputs[SAMPLED_LOGPROB_FIELD][0].double(), reference["sampled_logprobs"], rtol=0, atol=2e-5
    )


def test_lower_bound_mode_uses_only_the_teachers_top_k(pair, teacher_model):
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding=False, seed=2)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(3)) * 3
    outputs = _loss_fn(pair.teacher, "lower_bound")(student_logits=student_logits, data=data)
    reference = _reference(teacher_model, sequences, student_logits)
    torch.testing.assert_close(
        outputs[COMPATIBILITY_FIELD][0].double(), reference["lower_bound"], rtol=0, atol=2e-5
    )


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_with_a_special_token_map_the_teacher_reads_mapped_ids_and_scores_in_the_students_ids(
    pair, teacher_model, use_remove_padding
):
    """The processor with a map equals the teacher run here on the sequences with their ids replaced, its
    log-probs moved to the student's ids by hand: D, C, the rows, the sampled token's log-prob (at the id
    the teacher read: finite for the pad, whose column the end of turn took) and the orphan mass."""
    vocab = teacher_model.config.vocab_size
    special = _SpecialTokens(vocab)
    data, sequences = _micro_batch(
        vocab, use_remove_padding, seed=9, planted=(vocab - 1, vocab - 2, vocab - 1)
    )
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(10)) * 3
    loss_fn = _loss_fn(pair.teacher, "exact")
    loss_fn.teacher.use_special_token_maps({str(pair.teacher): special.map})
    outputs = loss_fn(student_logits=student_logits, data=data)
    reference = _reference(teacher_model, sequences, student_logits, special)

    assert set(outputs) == {
        DISAGREEMENT_FIELD,
        COMPATIBILITY_FIELD,
        TEACHER_ORPHAN_MASS_FIELD,
        *teacher_entry_fields(TOPK),
    }
    assert_scores_and_rows_match(outputs, reference)
    assert torch.isfinite(outputs[SAMPLED_LOGPROB_FIELD][0]).all()
    orphan_mass = outputs[TEACHER_ORPHAN_MASS_FIELD][0].double()
    torch.testing.assert_close(orphan_mass, reference["orphan_mass"], rtol=1e-4, atol=1e-7)
    assert orphan_mass.min() > 0
    # The map changed what the teacher read: without it the rows differ.
    unmapped = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    assert not torch.equal(unmapped[SAMPLED_LOGPROB_FIELD], outputs[SAMPLED_LOGPROB_FIELD])


# Per sequence of LENGTHS: the student's prompt length, and the teacher's own prompt (longer, shorter, equal,
# one token) that the driver would have rendered for it.
STUDENT_PROMPTS = (3, 8, 2, 4)
TEACHER_PROMPTS = (6, 2, 2, 1)


@pytest.mark.parametrize(
    "use_remove_padding, with_map",
    [(True, False), (False, False), (True, True)],
    ids=["packed", "padded", "map"],
)
def test_with_teacher_prompts_the_teacher_reads_its_prompt_then_the_students_response(
    pair, teacher_model, use_remove_padding, with_map
):
    """Each sequence's teacher prompt (`TEACHER_PROMPT_IDS_FIELD`) replaces the student's prompt for the
    teacher: at every position that predicts a response token the rows and exact C equal the teacher run
    here on that prompt followed by the response (read through the map, the teacher prompt left as it is:
    it is in the teacher's ids already)."""
    vocab = teacher_model.config.vocab_size
    special = _SpecialTokens(vocab)
    data, sequences = _micro_batch(vocab, use_remove_padding, seed=11)
    generator = torch.Generator().manual_seed(12)
    teacher_prompts = [torch.randint(3, vocab, (n,), generator=generator) for n in TEACHER_PROMPTS]
    teacher_prompts[0][1] = vocab - 1  # a special id of the teacher's own: never mapped
    sequences[1][-1] = vocab - 1  # the student's end of turn in a response: mapped
    data["input_ids"] = nested(sequences)
    responses = [n - p for n, p in zip(LENGTHS, STUDENT_PROMPTS, strict=True)]
    data["response_mask"] = nested([torch.ones(n, dtype=torch.int64) for n in responses])
    data[TEACHER_PROMPT_IDS_FIELD] = nested(teacher_prompts)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(13)) * 3
    loss_fn = _loss_fn(pair.teacher, "exact")
    if with_map:
        loss_fn.teacher.use_special_token_maps({str(pair.teacher): special.map})
    outputs = loss_fn(student_logits=student_logits, data=data)
    assert all(value.shape == (1, sum(LENGTHS)) for value in outputs.values())

    start, checked = 0, 0
    for sequence, prompt_length, teacher_prompt in zip(
        sequences, STUDENT_PROMPTS, teacher_prompts, strict=True
    ):
        response = sequence[prompt_length:]
        read = torch.cat([teacher_prompt, special.read(response) if with_map else response])
        with torch.no_grad():
            teacher_space = torch.log_softmax(teacher_model(read.unsqueeze(0)).logits[0].double(), -1)
        log_probs = special.columns(teacher_space)[0] if with_map else teacher_space
        for j, token in enumerate(response.tolist()):
            row, teacher_row = start + prompt_length - 1 + j, len(teacher_prompt) - 1 + j
            expected = log_probs[teacher_row]
            top = torch.topk(expected, TOPK)
            ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][0, row] for i in range(TOPK)])
            logprobs = torch.stack([outputs[TEACHER_LOGPROB_FIELD.format(i)][0, row] for i in range(TOPK)])
            assert torch.equal(ids, top.indices), (row, j)
            torch.testing.assert_close(logprobs.double(), top.values, rtol=1e-5, atol=1e-5)
            assert int(outputs[SAMPLED_ID_FIELD][0, row]) == token
            # The sampled token's log-prob is the teacher's at the id it read.
            at_read = teacher_space[teacher_row, read[teacher_row + 1]]
            torch.testing.assert_close(
                outputs[SAMPLED_LOGPROB_FIELD][0, row].double(), at_read, rtol=0, atol=2e-5
            )
            student_top = torch.topk(student_logits[0, row], K).indices
            torch.testing.assert_close(
                outputs[COMPATIBILITY_FIELD][0, row].double(),
                expected[student_top].exp().sum(),
                rtol=1e-5,
                atol=1e-5,
            )
            checked += 1
        start += len(sequence)
    assert checked == sum(responses)
    # The teacher prompts changed what the teacher read: the student's own prompts give other rows.
    del data[TEACHER_PROMPT_IDS_FIELD]
    own_prompts = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    assert not torch.equal(own_prompts[SAMPLED_LOGPROB_FIELD], outputs[SAMPLED_LOGPROB_FIELD])


def test_stored_teacher_rows_have_the_teacher_servers_layout(pair, teacher_model):
    """What the trainer writes to ``teacher_ids`` / ``teacher_logprobs`` from the per-token fields verl
    collects (nested by sequence): top-K then the sampled token, row t for token t + 1, read back by the
    loss's ``split_teacher_entries`` exactly as a teacher server's rows."""
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding=True, seed=4)
    student_logits = torch.randn(1, sum(LENGTHS), vocab)
    outputs = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    offsets = data["input_ids"].offsets()
    collected = {
        name: torch.nested.nested_tensor_from_jagged(value[0], offsets) for name, value in outputs.items()
    }
    teacher_ids, teacher_logprobs = stack_teacher_rows(collected, TOPK)
    assert teacher_ids.dtype == torch.int32 and teacher_logprobs.dtype == torch.float32
    reference = _reference(teacher_model, sequences, student_logits)
    start = 0
    for sequence, ids, logprobs in zip(
        sequences, teacher_ids.unbind(), teacher_logprobs.unbind(), strict=True
    ):
        rows = slice(start, start + sequence.numel())
        assert ids.shape == logprobs.shape == (sequence.numel(), TOPK + 1)
        top_ids, top_logprobs, sampled = split_teacher_entries(ids, logprobs, TOPK)
        # Row t holds the next token t + 1 (the last row's is the next sequence's first: never a response).
        assert torch.equal(ids[:-1, TOPK].long(), sequence[1:])
        assert torch.equal(top_ids.long(), reference["top_ids"][rows])
        torch.testing.assert_close(
            top_logprobs.double(), reference["top_logprobs"][rows], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            sampled.double(), reference["sampled_logprobs"][rows], rtol=1e-5, atol=1e-5
        )
        start += sequence.numel()


def test_teacher_rows_cover_the_students_vocabulary_when_embeddings_differ():
    from ta_opd_verl.teacher_head import logit_log_prob_blocks
    from ta_opd_verl.teachers.colocated import score_with_teacher

    student_logits = torch.randn(1, 6, 10)
    wider = torch.randn(6, 13)
    wider[:, 10:] = 50.0  # teacher-only rows (padding) with large logits must not enter the top-K
    outputs = score_with_teacher(
        student_logits,
        logit_log_prob_blocks(wider, vocab=10, block_rows=4),
        torch.arange(6),
        k=3,
        topk=4,
        student_probs="exact",
        entropy_mode="full",
        exact_compatibility=True,
    )
    ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][0] for i in range(4)], -1)
    assert int(ids.max()) < 10
    expected = torch.log_softmax(wider[:, :10], -1).gather(-1, torch.arange(6).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(outputs[SAMPLED_LOGPROB_FIELD][0], expected)

    narrower = torch.randn(6, 8)  # ids 8, 9 exist only in the student's embedding: teacher probability 0
    outputs = score_with_teacher(
        student_logits,
        logit_log_prob_blocks(narrower, vocab=10, block_rows=4),
        torch.full((6,), 9),
        k=3,
        topk=4,
        student_probs="exact",
        entropy_mode="full",
        exact_compatibility=True,
    )
    assert torch.isinf(outputs[SAMPLED_LOGPROB_FIELD]).all()


# ---- configuration --------------------------------------------------------------------------------------


def test_the_update_loss_reads_the_colocated_teachers_rows(pair, teacher_model):
    """The rows the colocated teacher returns, stored as ``teacher_ids`` / ``teacher_logprobs``, are what the
    update's reverse-KL loss is taken against: it equals a reverse KL computed here from the teacher's full
    softmax on the selected positions, and perturbing or zeroing the rows changes it."""
    from verl.utils import tensordict_utils as tu
    from verl_fixtures import synthetic_micro_batch

    from ta_opd_verl.protocol import REVERSE_KL_FIELD, TRAIN_PHASE

    vocab = teacher_model.config.vocab_size
    prompt_lengths, response_lengths = [3, 4], [5, 4]
    selection = [[0, 3], [2]]
    data, _, _ = synthetic_micro_batch(
        prompt_lengths, response_lengths, vocab=vocab, topk=TOPK, selection=selection
    )
    sequences = [
        torch.cat([p, r]) for p, r in zip(data["prompts"].unbind(), data["responses"].unbind(), strict=True)
    ]
    offsets = torch.tensor([0, *torch.tensor([s.numel() for s in sequences]).cumsum(0).tolist()])
    scoring = TensorDict(
        {
            "input_ids": nested(sequences),
            "position_ids": nested([torch.arange(s.numel()) for s in sequences]),
        },
        batch_size=len(sequences),
    )
    tu.assign_non_tensor(scoring, ta_opd_phase=SCORE_PHASE, use_remove_padding=True, pad_token_id=0)
    student_logits = torch.randn(1, int(offsets[-1]), vocab, generator=torch.Generator().manual_seed(7)) * 2
    loss_fn = _loss_fn(pair.teacher, "exact")
    outputs = loss_fn(student_logits=student_logits, data=scoring)
    collected = {name: torch.nested.nested_tensor_from_jagged(v[0], offsets) for name, v in outputs.items()}
    rows = stack_teacher_rows(collected, TOPK)
    tu.assign_non_tensor(data, ta_opd_phase=TRAIN_PHASE)

    def update_loss(teacher_ids, teacher_logprobs) -> float:
        data["teacher_ids"], data["teacher_logprobs"] = teacher_ids, teacher_logprobs
        per_token = loss_fn(student_logits=student_logits, data=data)[REVERSE_KL_FIELD]
        model_output = {REVERSE_KL_FIELD: torch.nested.nested_tensor_from_jagged(per_token[0], offsets)}
        return loss_fn(data=data, model_output=model_output)[0].item()

    reference = _reference(teacher_model, sequences, student_logits)
    terms = []
    for sample, positions in enumerate(selection):
        for t in positions:
            row = int(offsets[sample]) + prompt_lengths[sample] + t - 1
            student = torch.log_softmax(student_logits[0, row].double(), -1)[reference["top_ids"][row]]
            student = student - torch.logsumexp(student, -1)
            teacher = reference["top_logprobs"][row] - torch.logsumexp(reference["top_logprobs"][row], -1)
            terms.append((student.exp() * (student - teacher)).sum())
    expected = torch.stack(terms).mean().item()
    assert update_loss(*rows) == pytest.approx(expected, rel=1e-4)
    ids, logprobs = rows
    shifted = torch.nested.nested_tensor_from_jagged(logprobs.values().flip(-1), logprobs.offsets())
    assert abs(update_loss(ids, shifted) - expected) > 1e-2
    zeros = torch.nested.nested_tensor_from_jagged(torch.zeros_like(logprobs.values()), logprobs.offsets())
    assert abs(update_loss(ids, zeros) - expected) > 1e-2


# ---- the teacher's output layer in blocks -----------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [1, 5, 1000], ids=["1-row", "5-rows", "more-rows-than-tokens"])
@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_scoring_in_blocks_of_any_size_equals_the_unblocked_computation(
    pair, teacher_model, use_remove_padding, block_rows, monkeypatch
):
    """The processor stops the teacher at its final hidden states and runs the output layer ``block_rows``
    rows at a time; the unblocked computation takes the teacher's whole ``[N, V]`` logits."""
    from ta_opd_verl.teacher_head import logit_log_prob_blocks
    from ta_opd_verl.teachers import colocated

    monkeypatch.setattr(colocated, "rows_per_block", lambda vocab: block_rows)
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding, seed=5)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(6)) * 3
    outputs = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    with torch.no_grad():
        logits = torch.cat([teacher_model(s.unsqueeze(0)).logits[0] for s in sequences])
    unblocked = colocated.score_with_teacher(
        student_logits,
        logit_log_prob_blocks(logits, vocab=vocab, block_rows=logits.shape[0]),
        torch.roll(torch.cat(sequences), -1),
        k=K,
        topk=TOPK,
        student_probs="exact",
        entropy_mode="full",
        exact_compatibility=True,
    )
    assert set(outputs) == set(unblocked)
    for name, value in unblocked.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(outputs[name], value, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(outputs[name], value), name


def test_a_model_without_a_base_model_and_a_linear_output_layer_is_refused():
    from ta_opd_verl.teachers.colocated import TeacherStructureError, body_and_head

    with pytest.raises(TeacherStructureError, match=r"model\.base_model, model\.get_output_embeddings"):
        body_and_head(torch.nn.Linear(2, 3))

    class WithoutLogitsToKeep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model, self.lm_head = torch.nn.Identity(), torch.nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids):
            return self.lm_head(self.base_model(input_ids))

    with pytest.raises(TeacherStructureError, match="WithoutLogitsToKeep.forward takes no logits_to_keep"):
        body_and_head(WithoutLogitsToKeep())


def test_a_model_that_changes_its_logits_after_the_output_layer_is_refused(pair, monkeypatch):
    """A logit scale (or soft-capping) after the output layer would be lost by the blocked output layer: the
    check at load compares the model's own logits with the output layer applied to its hidden states."""
    from ta_opd_verl.teachers import colocated

    load = colocated.AutoModelForCausalLM.from_pretrained

    def with_logit_scale(*args, **kwargs):
        model = load(*args, **kwargs)

        def scale(_module, _inputs, output):
            output.logits = output.logits * 2.0
            return output

        model.register_forward_hook(scale)
        return model

    monkeypatch.setattr(colocated.AutoModelForCausalLM, "from_pretrained", with_logit_scale)
    spec = colocated.TeacherSpec(str(pair.teacher), "float32", "sdpa", fsdp_size=-1)
    with pytest.raises(colocated.TeacherStructureError, match="not its output layer applied"):
        colocated.LoadedTeacher(spec, torch.device("cpu"))


# ---- loss=reverse_kl_full: the teacher again in the update -----------------------------------------------


@pytest.mark.parametrize(
    ("use_remove_padding", "mapped"),
    [(True, False), (False, False), (True, True)],
    ids=["packed", "padded", "packed-special-token-map"],
)
def test_full_reverse_kl_loss_runs_the_teacher_again_at_the_selected_positions(
    pair, teacher_model, use_remove_padding, mapped, monkeypatch
):
    """``loss=reverse_kl_full`` in the update: the processor runs the teacher on the update's micro-batch,
    takes its output layer at the selected rows only (in blocks of 2 rows here), and the loss is the mean
    over the selection of KL(p_θ || p_T) over the whole vocabulary, computed here in float64 from the
    teacher's full softmax sequence by sequence; so is its gradient in the student's logits. With a
    special-token map the teacher reads the mapped ids, its columns move by hand, and the student ids
    without a teacher counterpart leave the student's distribution (no gradient there)."""
    from verl.utils import tensordict_utils as tu
    from verl_fixtures import synthetic_micro_batch

    from ta_opd_verl.protocol import TRAIN_PHASE
    from ta_opd_verl.teachers import colocated

    monkeypatch.setattr(colocated, "rows_per_block", lambda vocab: 2)
    vocab = teacher_model.config.vocab_size
    prompt_lengths, response_lengths, selection = [3, 4, 2], [5, 4, 6], [[0, 3, 4], [2], [0, 1, 5]]
    data, _, _ = synthetic_micro_batch(
        prompt_lengths, response_lengths, vocab=vocab, topk=TOPK, selection=selection
    )
    sequences = list(data["input_ids"].unbind())
    special = _SpecialTokens(vocab) if mapped else None
    if special:
        sequences[0][1], sequences[2][3] = vocab - 1, vocab - 2  # in a prompt and in a response
        data["input_ids"] = nested(sequences)
    data["position_ids"] = nested([torch.arange(s.numel()) for s in sequences])
    tu.assign_non_tensor(
        data, ta_opd_phase=TRAIN_PHASE, use_remove_padding=use_remove_padding, pad_token_id=0
    )
    offsets = data["input_ids"].offsets()
    config = compose_config(
        "ta_opd_cpu",
        _fsdp_overrides(
            pair.teacher,
            "distillation.distillation_loss.ta_opd.loss=reverse_kl_full",
            "distillation.distillation_loss.use_policy_gradient=false",
        ),
    )
    loss_fn = ta_opd_loss_function(config)
    if special:
        loss_fn.teacher.use_special_token_maps({str(pair.teacher): special.map})
    logits = torch.randn(1, int(offsets[-1]), vocab, generator=torch.Generator().manual_seed(8)) * 2
    logits.requires_grad_(True)
    per_token, loss, _ = run_update(loss_fn, logits, data, offsets)
    loss.backward()

    rows = selected_packed_rows(offsets, prompt_lengths, selection)
    read = [special.read(s) for s in sequences] if special else sequences
    with torch.no_grad():
        teacher = torch.cat(
            [torch.log_softmax(teacher_model(s.unsqueeze(0)).logits[0].double(), -1) for s in read]
        )
    kept = torch.ones(vocab, dtype=torch.bool)
    if special:
        teacher = special.columns(teacher)[0]
        kept[special.without_counterpart] = False
    student = logits.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(student[0, rows][:, kept], -1)
    expected = (log_p.exp() * (log_p - teacher[rows][:, kept])).sum(-1).mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), student.grad, rtol=1e-4, atol=1e-7)
    if special:
        assert logits.grad[0, rows][:, ~kept].abs().max() == 0
    assert logits.grad[0, rows][:, kept].abs().min() > 0
