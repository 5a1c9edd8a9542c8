"""The teacher's output layer, block by block: its log-probabilities from its final hidden states (or from
logits already computed), a block of rows at a time, never an ``[N, V]`` tensor. Pure tensor math, torch
only.

The colocated teacher (`ta_opd_verl.teachers.colocated`) hands its final hidden states ``[N, H]`` and its
output layer here; the scoring's top-K and gathers (`ta_opd_verl.teachability.teacher_entries`) and the
full-vocabulary reverse KL (`ta_opd_verl.opd_loss.reverse_kl_full_from_blocks`) take the blocks one at a
time, so their working memory is one block's logits and log-probs whatever N.

Vocabulary rule, for every consumer: the teacher's log-softmax runs over the ids ``[0, min(V_T, V_S))``
both models have (V_T the teacher's output rows, V_S the student's vocabulary): its distribution restricted
to those ids and renormalised there. Rows past the student's embedding (padding rows, teacher-only added
tokens) leave the normaliser; ids only the student has are not in a block, and each consumer says what it
does with them. `ta_opd_verl.vocab.check_same_vocabulary` has checked that the ids in common mean the same
tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Rows per block: about 256 MiB of float32 log-probs, as the student's side (`teachability`) uses.
BLOCK_BYTES = 256 * 2**20

LogProbBlocks = Iterator[tuple[slice, torch.Tensor]]


def rows_per_block(vocab: int) -> int:
    """Rows of a block of about `BLOCK_BYTES` of float32 log-probs over ``vocab`` ids."""
    return max(1, BLOCK_BYTES // (4 * vocab))


def log_softmax_on_common_ids(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-softmax of ``[..., V_T]`` teacher logits over the ids ``[0, min(V_T, vocab))``, in float32 (float64
    logits stay float64)."""
    common = logits[..., : min(logits.shape[-1], vocab)]
    return torch.log_softmax(common, dim=-1, dtype=_log_prob_dtype(logits.dtype))


def head_log_prob_blocks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    vocab: int,
    block_rows: int,
) -> LogProbBlocks:
    """The teacher's log-probs from its final hidden states, ``block_rows`` rows at a time.

    Args:
        hidden: ``[N, H]`` final hidden states (after the last norm), in packed order.
        weight, bias: the output layer, ``[V_T, H]`` and ``[V_T]`` or None; logits = hidden @ weightᵀ + bias
            in their dtype (the teacher's), only for the ids in common with the student.
        vocab: the student's vocabulary size V_S.
        block_rows: rows per block (>= 1); results do not depend on it.

    Yields:
        ``(rows, log_probs)``: a slice of ``[0, N)`` and the float32 ``[len(rows), min(V_T, V_S)]`` log-probs
        (the module docstring's vocabulary rule). Both block buffers are reused from block to block (no
        fresh allocation and its page faults per block): use a block before asking for the next.
    """
    _check_block_rows(block_rows)
    common = min(weight.shape[0], vocab)
    weight_t = weight[:common].t()
    bias = None if bias is None else bias[:common]
    rows_in_block = min(block_rows, hidden.shape[0])
    logits = torch.empty(rows_in_block, common, dtype=weight.dtype, device=weight.device)
    log_probs = torch.empty(rows_in_block, common, dtype=_log_prob_dtype(weight.dtype), device=weight.device)
    for start in range(0, hidden.shape[0], block_rows):
        rows = slice(start, min(start + block_rows, hidden.shape[0]))
        size = rows.stop - rows.start
        if bias is None:
            torch.mm(hidden[rows], weight_t, out=logits[:size])
        else:
            torch.addmm(bias, hidden[rows], weight_t, out=logits[:size])
        torch.log_softmax(logits[:size], dim=-1, dtype=log_probs.dtype, out=log_probs[:size])
        yield rows, log_probs[:size]


def logit_log_prob_blocks(logits: torch.Tensor, *, vocab: int, block_rows: int) -> LogProbBlocks:
    """`head_log_prob_blocks` for ``[N, V_T]`` logits already computed: the same blocks, same rule (each a
    fresh tensor)."""
    _check_block_rows(block_rows)
    for start in range(0, logits.shape[0], block_rows):
        rows = slice(start, min(start + block_rows, logits.shape[0]))
        yield rows, log_softmax_on_common_ids(logits[rows], vocab)


def _log_prob_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(logits_dtype, torch.float32)


def _check_block_rows(block_rows: int) -> None:
    if block_rows < 1:
        raise ValueError(f"block_rows must be a positive number of rows, got {block_rows}")
