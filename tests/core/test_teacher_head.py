"""The teacher's output layer block by block (`ta_opd_verl.teacher_head`) equals the unblocked computation
for every block size, from one row to more rows than there are, for the scoring's entries and for the
full-vocabulary reverse KL (values and gradients), with teacher vocabularies larger and smaller than the
student's."""

from __future__ import annotations

import math

import pytest
import torch

from ta_opd_verl.opd_loss import reverse_kl_full, reverse_kl_full_from_blocks
from ta_opd_verl.teachability import teacher_entries
from ta_opd_verl.teacher_head import (
    head_log_prob_blocks,
    log_softmax_on_common_ids,
    logit_log_prob_blocks,
    rows_per_block,
)

N, HIDDEN, VOCAB = 13, 16, 50
BLOCK_SIZES = (1, 4, N, N + 7)


def _teacher(teacher_vocab: int, dtype=torch.float32, bias: bool = False):
    generator = torch.Generator().manual_seed(teacher_vocab)
    hidden = torch.randn(N, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(teacher_vocab, HIDDEN, generator=generator) / 2).to(dtype)
    return hidden, weight, (torch.randn(teacher_vocab, generator=generator).to(dtype) if bias else None)


def _unblocked_log_probs(hidden, weight, bias) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return log_softmax_on_common_ids(logits, VOCAB)


@pytest.mark.parametrize("teacher_vocab", [VOCAB, VOCAB + 9, VOCAB - 6], ids=["same", "larger", "smaller"])
@pytest.mark.parametrize("block_rows", BLOCK_SIZES)
def test_blocked_head_log_probs_equal_one_log_softmax_of_all_logits(teacher_vocab, block_rows):
    hidden, weight, bias = _teacher(teacher_vocab, bias=True)
    # A block's buffer is reused by the next one: keep a copy of each.
    blocks = [
        (rows, block.clone())
        for rows, block in head_log_prob_blocks(hidden, weight, bias, vocab=VOCAB, block_rows=block_rows)
    ]
    assert [rows.start for rows, _ in blocks] == list(range(0, N, block_rows))
    log_probs = torch.cat([block for _, block in blocks])
    expected = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).double(), -1)
    if teacher_vocab > VOCAB:  # rows past the student's vocabulary leave the normaliser
        expected = torch.log_softmax(expected[:, :VOCAB], -1)
    assert log_probs.shape == (N, min(teacher_vocab, VOCAB)) and log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teacher_vocab", [VOCAB, VOCAB + 9, VOCAB - 6], ids=["same", "larger", "smaller"])
@pytest.mark.parametrize("block_rows", BLOCK_SIZES)
def test_scoring_entries_from_the_blocked_head_equal_the_unblocked_ones(teacher_vocab, block_rows):
    hidden, weight, _ = _teacher(teacher_vocab)
    generator = torch.Generator().manual_seed(1)
    student_topk_ids = torch.randn(N, VOCAB, generator=generator).topk(5, dim=-1).indices
    sampled_ids = torch.randint(0, VOCAB, (N,), generator=generator)
    sampled_ids[0] = VOCAB - 1  # an id a smaller teacher does not have
    blocked = teacher_entries(
        head_log_prob_blocks(hidden, weight, vocab=VOCAB, block_rows=block_rows),
        student_topk_ids,
        sampled_ids,
        teacher_topk=6,
    )
    # The unblocked computation: all [N, V_T] logits at once (what the teacher's forward used to return).
    logits = torch.nn.functional.linear(hidden, weight)
    unblocked = teacher_entries(
        logit_log_prob_blocks(logits, vocab=VOCAB, block_rows=N),
        student_topk_ids,
        sampled_ids,
        teacher_topk=6,
    )
    assert torch.equal(blocked[0], unblocked[0])  # the teacher's top-K ids
    for ours, theirs in zip(blocked[1:], unblocked[1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    reference = _unblocked_log_probs(hidden.double(), weight.double(), None)
    torch.testing.assert_close(blocked[1].double(), reference.topk(6, dim=-1).values, rtol=1e-5, atol=1e-5)
    assert math.isinf(blocked[3][0]) == (teacher_vocab < VOCAB)


@pytest.mark.parametrize("teacher_vocab", [VOCAB, VOCAB + 9, VOCAB - 6], ids=["same", "larger", "smaller"])
@pytest.mark.parametrize("block_rows", BLOCK_SIZES)
def test_full_reverse_kl_from_the_blocked_head_equals_the_unblocked_one(teacher_vocab, block_rows):
    hidden, weight, bias = _teacher(teacher_vocab, dtype=torch.float64, bias=True)
    student = torch.randn(N, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3

    def value_and_gradient(fn):
        leaf = student.clone().requires_grad_(True)
        value = fn(leaf)
        (value * torch.arange(1, N + 1)).sum().backward()
        return value.detach(), leaf.grad

    blocked = value_and_gradient(
        lambda s: reverse_kl_full_from_blocks(
            s, head_log_prob_blocks(hidden, weight, bias, vocab=VOCAB, block_rows=block_rows)
        )
    )
    unblocked = value_and_gradient(
        lambda s: reverse_kl_full(s, torch.nn.functional.linear(hidden, weight, bias), block_rows=N)
    )
    for ours, theirs in zip(blocked, unblocked, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_blocks_that_do_not_cover_the_rows_are_refused():
    hidden, weight, _ = _teacher(VOCAB)
    blocks = head_log_prob_blocks(hidden[:-1], weight, vocab=VOCAB, block_rows=4)
    with pytest.raises(ValueError, match="cover 12 rows"):
        reverse_kl_full_from_blocks(torch.zeros(N, VOCAB), blocks)


def test_a_block_has_about_256_mib_of_float32_log_probs_and_at_least_one_row():
    assert rows_per_block(151_936) == 441
    assert rows_per_block(2**40) == 1
    with pytest.raises(ValueError, match="block_rows must be a positive"):
        next(logit_log_prob_blocks(torch.zeros(2, 3), vocab=3, block_rows=0))
