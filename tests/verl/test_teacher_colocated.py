"""The colocated FSDP teacher (``ta_opd.teacher=fsdp``, ``ta_opd_verl/teachers/colocated.py``) without
verl's trainer: the scoring processor with the real tiny teacher on a micro-batch in verl's layout, checked
against a full softmax of the teacher computed here sequence by sequence, and the teacher rows it returns.
(Its refusals: tests/verl/test_checks.py; its driver-side stages: tests/verl/test_teachers.py.)"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from verl_fixtures import compose_config, nested, ta_opd_loss_function

from ta_opd_verl.loss import TAOPDLossFunction
from ta_opd_verl.protocol import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    SAMPLED_ID_FIELD,
    SAMPLED_LOGPROB_FIELD,
    SCORE_PHASE,
    TEACHER_ID_FIELD,
    TEACHER_LOGPROB_FIELD,
    split_teacher_entries,
    stack_teacher_rows,
    teacher_entry_fields,
)

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


def _micro_batch(vocab: int, use_remove_padding: bool, seed: int = 0):
    """A scoring micro-batch as ``FSDPEngineWithLMHead.prepare_model_outputs`` hands it to the processor:
    nested ``input_ids`` / ``position_ids`` (one row per sequence, no padding) and the non-tensor flags."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, vocab, (length,), generator=generator) for length in LENGTHS]
    data = TensorDict(
        {"input_ids": nested(sequences), "position_ids": nested([torch.arange(n) for n in LENGTHS])},
        batch_size=len(LENGTHS),
    )
    tu.assign_non_tensor(
        data, ta_opd_phase=SCORE_PHASE, use_remove_padding=use_remove_padding, pad_token_id=0, temperature=1.0
    )
    return data, sequences


def _reference(teacher, sequences, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent float64 computation from the definitions: the teacher run on each sequence alone, full
    softmax; S = student top-k, T = teacher top-k, U = S ∪ T; exact C = Σ_S p_T; D = KL(p̄_T || p̄_S) on U."""
    with torch.no_grad():
        teacher_log_probs = torch.cat(
            [torch.log_softmax(teacher(s.unsqueeze(0)).logits[0].double(), -1) for s in sequences]
        )
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
        disagreement.append((p_t * (p_t.log() - p_s.clamp_min(1e-12).log())).sum())
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
        "sampled_logprobs": teacher_log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1),
    }


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
    compatibility = outputs[COMPATIBILITY_FIELD][0].double()
    torch.testing.assert_close(compatibility, reference["compatibility"], rtol=1e-5, atol=1e-5)
    # Exact C is not the lower bound here: the teacher puts mass on student candidates outside its top-16.
    assert (reference["compatibility"] - reference["lower_bound"]).max() > 1e-3
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
    from ta_opd_verl.teachers.colocated import score_with_teacher_logits

    student_logits = torch.randn(1, 6, 10)
    wider = torch.randn(6, 13)
    wider[:, 10:] = 50.0  # teacher-only rows (padding) with large logits must not enter the top-K
    outputs = score_with_teacher_logits(
        student_logits,
        wider,
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
    outputs = score_with_teacher_logits(
        student_logits,
        narrower,
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
