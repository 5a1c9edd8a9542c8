"""The full-vocabulary reverse KL and the top-K + tail reverse KL (`ta_opd_verl.opd_loss`) against naive
float64 references written from the definitions over the whole vocabulary: values and gradients in the
student's logits, on peaked, flat and tied logits and with teacher vocabularies larger and smaller than the
student's; the tail loss is the full KL where the partition loses nothing and below it otherwise."""

from __future__ import annotations

import math

import pytest
import torch

from ta_opd_verl.opd_loss import reverse_kl_full, reverse_kl_on_teacher_support, reverse_kl_topk_tail

ROWS, VOCAB = 6, 40


def _logits(kind: str, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64)
    if kind == "peaked":
        return base * 8.0
    if kind == "flat":
        return base * 0.01
    # ties: few distinct values, so many ids share a probability (and the top-K is ambiguous)
    return torch.round(base * 1.5)


def _naive_full(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ_v p(v) log(p(v) / q(v)) over the common ids, both softmaxes renormalised there."""
    common = min(student.shape[-1], teacher.shape[-1])
    p = torch.softmax(student[:, :common], dim=-1)
    q = torch.softmax(teacher[:, :common], dim=-1)
    return (p * torch.log(p / q)).sum(-1)


def _naive_tail(student: torch.Tensor, teacher_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The K+1 cells summed id by id over the union of both vocabularies: the teacher's ids, then the rest."""
    union = max(student.shape[-1], teacher_full.shape[-1])
    p = torch.nn.functional.pad(torch.softmax(student, -1), (0, union - student.shape[-1]))
    q = torch.nn.functional.pad(torch.softmax(teacher_full, -1), (0, union - teacher_full.shape[-1]))
    values = []
    for row in range(student.shape[0]):
        in_top = torch.zeros(union, dtype=torch.bool)
        in_top[ids[row]] = True
        cells_p = torch.cat([p[row, ids[row]], p[row, ~in_top].sum().unsqueeze(0)])
        cells_q = torch.cat([q[row, ids[row]], q[row, ~in_top].sum().unsqueeze(0)])
        terms = torch.where(cells_p > 0, cells_p * torch.log(cells_p / cells_q), 0.0)
        values.append(terms.sum())
    return torch.stack(values)


def _teacher_top(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(teacher, -1)
    top = torch.topk(log_probs, k, dim=-1)
    return top.indices, top.values


def _value_and_gradient(fn, student: torch.Tensor, *args):
    leaf = student.clone().requires_grad_(True)
    value = fn(leaf, *args)
    (value.reshape(-1) * torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype)).sum().backward()
    return value.detach(), leaf.grad


KINDS = ("peaked", "flat", "ties")
TEACHER_VOCABS = (VOCAB, VOCAB + 7, VOCAB - 5)


@pytest.mark.parametrize("teacher_vocab", TEACHER_VOCABS, ids=["same", "larger", "smaller"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_reverse_kl_and_its_gradient_equal_the_naive_float64_reference(kind, teacher_vocab):
    student = _logits(kind, VOCAB, seed=1)
    teacher = _logits(kind, teacher_vocab, seed=2)
    value, gradient = _value_and_gradient(reverse_kl_full, student, teacher)
    expected, expected_gradient = _value_and_gradient(_naive_full, student, teacher)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)
    if teacher_vocab < VOCAB:  # the student's ids the teacher lacks are left out of the loss
        assert torch.equal(gradient[:, teacher_vocab:], torch.zeros_like(gradient[:, teacher_vocab:]))


@pytest.mark.parametrize("kind", KINDS)
def test_full_reverse_kl_in_float32_is_the_float64_value_to_float32_precision(kind):
    student, teacher = _logits(kind, VOCAB, seed=3), _logits(kind, VOCAB, seed=4)
    value, gradient = _value_and_gradient(reverse_kl_full, student.float(), teacher.float())
    expected, expected_gradient = _value_and_gradient(_naive_full, student, teacher)
    assert value.dtype == gradient.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-5)


def test_full_reverse_kl_does_not_depend_on_the_block_size_and_keeps_leading_dimensions():
    student = _logits("peaked", VOCAB, seed=5).reshape(2, 3, VOCAB)
    teacher = _logits("flat", VOCAB + 3, seed=6).reshape(2, 3, VOCAB + 3)
    whole = reverse_kl_full(student, teacher)
    assert whole.shape == (2, 3)
    for block_rows in (1, 4, 100):
        torch.testing.assert_close(reverse_kl_full(student, teacher, block_rows=block_rows), whole)


def test_tail_reverse_kl_and_its_gradient_do_not_depend_on_the_block_size():
    student = _logits("peaked", VOCAB, seed=18).reshape(2, 3, VOCAB)
    ids, logprobs = _teacher_top(_logits("flat", VOCAB, seed=19), 7)
    ids, logprobs = ids.reshape(2, 3, 7), logprobs.reshape(2, 3, 7)
    whole, whole_gradient = _value_and_gradient(reverse_kl_topk_tail, student, ids, logprobs)
    assert whole.shape == (2, 3)
    for block_rows in (1, 4, 100):
        value, gradient = _value_and_gradient(
            lambda s, i, lp, rows=block_rows: reverse_kl_topk_tail(s, i, lp, block_rows=rows),
            student,
            ids,
            logprobs,
        )
        torch.testing.assert_close(value, whole, rtol=0, atol=0)
        torch.testing.assert_close(gradient, whole_gradient, rtol=0, atol=0)


def test_full_reverse_kl_is_zero_for_equal_distributions_and_infinite_where_the_teacher_has_none():
    student = _logits("peaked", VOCAB, seed=7)
    assert reverse_kl_full(student, student + 3.0).abs().max() < 1e-12  # a shift is the same softmax
    teacher = student.clone()
    teacher[0, 5] = -math.inf
    values = reverse_kl_full(student, teacher)
    assert math.isinf(values[0]) and torch.isfinite(values[1:]).all()


@pytest.mark.parametrize("teacher_vocab", TEACHER_VOCABS, ids=["same", "larger", "smaller"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_tail_reverse_kl_and_its_gradient_equal_the_naive_float64_reference(kind, teacher_vocab, k):
    student = _logits(kind, VOCAB, seed=8)
    teacher = _logits(kind, teacher_vocab, seed=9)
    if teacher_vocab > VOCAB:  # make the teacher's top-K reach its ids the student does not have
        teacher[:, VOCAB:] += 4.0
    ids, logprobs = _teacher_top(teacher, k)
    value, gradient = _value_and_gradient(reverse_kl_topk_tail, student, ids, logprobs)
    expected, expected_gradient = _value_and_gradient(_naive_tail, student, teacher, ids)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-8, atol=1e-12)
    if teacher_vocab > VOCAB:
        assert (ids >= VOCAB).any()


def test_tail_reverse_kl_in_float32_is_the_float64_value_to_float32_precision():
    student, teacher = _logits("peaked", VOCAB, seed=10), _logits("flat", VOCAB, seed=11)
    ids, logprobs = _teacher_top(teacher, 8)
    value, gradient = _value_and_gradient(reverse_kl_topk_tail, student.float(), ids, logprobs.float())
    expected, expected_gradient = _value_and_gradient(_naive_tail, student, teacher, ids)
    assert value.dtype == gradient.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_the_tail_loss_is_below_the_full_kl_when_the_teacher_has_mass_outside_its_top_k(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    vocab = int(torch.randint(8, 64, (1,), generator=generator))
    k = int(torch.randint(1, vocab - 2, (1,), generator=generator))
    scales = torch.rand(2, generator=generator) * 6 + 0.1
    student = torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64) * scales[0]
    teacher = torch.randn(ROWS, vocab, generator=generator, dtype=torch.float64) * scales[1]
    ids, logprobs = _teacher_top(teacher, k)
    tail = reverse_kl_topk_tail(student, ids, logprobs)
    full = reverse_kl_full(student, teacher)
    assert (tail >= 0).all()
    assert (tail < full - 1e-9).all(), (tail, full)


def test_the_tail_loss_is_the_full_kl_when_the_top_k_holds_all_the_mass():
    student, teacher = _logits("peaked", VOCAB, seed=12), _logits("flat", VOCAB, seed=13)
    # Every id returned: the tail is empty.
    ids, logprobs = _teacher_top(teacher, VOCAB)
    torch.testing.assert_close(
        reverse_kl_topk_tail(student, ids, logprobs), reverse_kl_full(student, teacher)
    )
    # The teacher's mass all on its top-8, and the student's too: the tail holds nothing on either side.
    ids, _ = _teacher_top(teacher, 8)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, ids, False)
    teacher, student = teacher.masked_fill(outside, -math.inf), student.masked_fill(outside, -math.inf)
    ids, logprobs = _teacher_top(teacher, 8)
    full = reverse_kl_full(student, teacher)
    assert torch.isfinite(full).all() and (full > 0.1).all()
    torch.testing.assert_close(reverse_kl_topk_tail(student, ids, logprobs), full)


def test_the_tail_loss_is_the_full_kl_when_the_teacher_follows_the_student_outside_its_top_k():
    """Equality holds exactly when p_θ / p_T is constant over the tail: here the teacher is the student
    there, scaled to leave its top-K their own mass."""
    student = _logits("peaked", VOCAB, seed=14)
    p = torch.softmax(student, -1)
    ids = torch.topk(_logits("flat", VOCAB, seed=15), 6, dim=-1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    top_mass = torch.rand(ROWS, 6, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    top_mass = top_mass / top_mass.sum(-1, keepdim=True) * 0.7
    tail_share = p.masked_fill(in_top, 0.0)
    teacher_p = (tail_share / tail_share.sum(-1, keepdim=True) * 0.3).scatter(-1, ids, top_mass)
    tail = reverse_kl_topk_tail(student, ids, top_mass.log())
    full = reverse_kl_full(student, teacher_p.log())
    torch.testing.assert_close(tail, full, rtol=1e-10, atol=1e-12)


def test_the_teachers_tail_mass_is_floored_when_its_returned_mass_rounds_to_one():
    student = _logits("flat", VOCAB, seed=17)
    ids = torch.arange(4).expand(ROWS, 4)
    rounded_to_one = torch.full((ROWS, 4), math.log(0.25 + 1e-9), dtype=torch.float64)
    values = reverse_kl_topk_tail(student, ids, rounded_to_one)
    assert torch.isfinite(values).all()
    q = torch.softmax(student, -1)
    q_tail = q[:, 4:].sum(-1)
    top_terms = (q[:, :4] * (q[:, :4].log() - rounded_to_one)).sum(-1)
    torch.testing.assert_close(values, top_terms + q_tail * (q_tail.log() - math.log(1e-12)))


def test_mismatched_shapes_are_refused():
    student = torch.zeros(2, 3, VOCAB)
    with pytest.raises(ValueError, match="leading shape"):
        reverse_kl_full(student, torch.zeros(2, 4, VOCAB))
    with pytest.raises(ValueError, match="leading shape"):
        reverse_kl_topk_tail(student, torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 5))


def test_no_positions_give_no_values_and_no_gradient():
    """A micro-batch with nothing selected computes the losses on zero rows."""
    student = torch.zeros(0, VOCAB, requires_grad=True)
    tail = reverse_kl_topk_tail(student, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    full = reverse_kl_full(student, torch.zeros(0, VOCAB + 2))
    assert tail.shape == full.shape == (0,)
    (tail.sum() + full.sum()).backward()
    assert student.grad.shape == (0, VOCAB)


@pytest.mark.parametrize("loss", [reverse_kl_on_teacher_support, reverse_kl_topk_tail])
def test_an_absent_teacher_entry_is_left_out_of_the_top_k_losses(loss):
    """An entry with log-prob -inf (verl's filler for a missing entry, id 0: where a teacher server's entry
    had no student counterpart) gives the value and gradient of the rows without it."""
    logits = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 0, 2, 3], [4, 0, 0, 5], [0, 6, 7, 8]])
    logprobs = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.1]] * 3, dtype=torch.float64))
    logprobs[0, 1] = logprobs[1, 2] = logprobs[2, 0] = float("-inf")
    kept = [[0, 2, 3], [0, 1, 3], [1, 2, 3]]
    with_absent = logits.clone().requires_grad_(True)
    values = loss(with_absent, ids, logprobs)
    values.sum().backward()
    without = logits.clone().requires_grad_(True)
    expected = torch.stack(
        [
            loss(without[row : row + 1], ids[row : row + 1, cols], logprobs[row : row + 1, cols])[0]
            for row, cols in enumerate(kept)
        ]
    )
    expected.sum().backward()
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(with_absent.grad, without.grad)
