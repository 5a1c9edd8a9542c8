"""Scoring passes: run the models over the bank and collect per-position grids `[rollouts, L]` on the CPU.

One pass per model; the teacher is re-run with each student rather than cached, because a cache of its
full distributions would cost rollouts × L × V floats (35 GB for the paper's 57,600 Qwen3 positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ta_opd_verl.diagnose.bank import Bank
from ta_opd_verl.diagnose.models import autocast_context, bank_batches, response_logits
from ta_opd_verl.diagnose.progress import Progress
from ta_opd_verl.diagnose.scoring import divergences, support_statistics, teacher_topk_and_sampled_logprobs

# Temporaries of the V-wide math per block of rollouts: each float32 [positions, V] about this size.
_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PassSettings:
    """batch_size: rollouts per forward. vocab_size: logits beyond it (embedding padding) are dropped, so
    student and teacher distributions live on the same ids. pad_id: right padding of the inputs."""

    batch_size: int
    vocab_size: int
    pad_id: int
    device: str
    dtype: torch.dtype
    quiet: bool = False


class TeacherEntries(NamedTuple):
    """What the training losses read from the teacher at each bank position (a teacher server's answer)."""

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    sampled_logprob: torch.Tensor


def _empty_grid(bank: Bank, *trailing: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros((bank.rollouts, bank.max_response_length, *trailing), dtype=dtype)


@torch.no_grad()
def score_initial(
    student, teacher, bank: Bank, ks: tuple[int, ...], teacher_topk: int, settings: PassSettings, name: str
) -> tuple[dict[str, torch.Tensor], TeacherEntries]:
    """θ0's grids (divergences, D/C/Ĉ for every K) and the teacher's entries at every bank position."""
    responses = bank.response_tensor()
    grids: dict[str, torch.Tensor] = {}
    entries = {
        "top_ids": _empty_grid(bank, teacher_topk, dtype=torch.long),
        "top_logprobs": _empty_grid(bank, teacher_topk),
        "sampled_logprob": _empty_grid(bank),
    }
    progress = Progress(name, settings.quiet)
    for rows in bank_batches(bank, settings.batch_size):
        student_logits, teacher_logits = _logits_pair(student, teacher, bank, rows, settings)
        sampled = responses[rows].to(teacher_logits.device)
        parts: dict[str, list[torch.Tensor]] = {}
        for block in _position_blocks(student_logits):
            values = divergences(student_logits[block], teacher_logits[block])
            values.update(
                support_statistics(student_logits[block], teacher_logits[block], ks, values["entropy"])
            )
            top_ids, top_logprobs, sampled_logprob = teacher_topk_and_sampled_logprobs(
                teacher_logits[block], sampled[block], teacher_topk
            )
            values.update(top_ids=top_ids, top_logprobs=top_logprobs, sampled_logprob=sampled_logprob)
            for key, value in values.items():
                parts.setdefault(key, []).append(value.cpu())
        for key, blocks in parts.items():
            store = entries if key in entries else grids
            store.setdefault(key, _empty_grid(bank))[rows] = torch.cat(blocks)
        progress(rows.stop, bank.rollouts, "rollouts")
    return grids, TeacherEntries(**entries)


@torch.no_grad()
def score_trained(student, teacher, bank: Bank, settings: PassSettings, name: str) -> dict[str, torch.Tensor]:
    """A trained student's full-vocabulary forward and reverse KL from the teacher at every bank position."""
    grids = {"forward_kl": _empty_grid(bank), "reverse_kl": _empty_grid(bank)}
    progress = Progress(name, settings.quiet)
    for rows in bank_batches(bank, settings.batch_size):
        student_logits, teacher_logits = _logits_pair(student, teacher, bank, rows, settings)
        parts = [
            divergences(student_logits[block], teacher_logits[block])
            for block in _position_blocks(student_logits)
        ]
        for key in grids:
            grids[key][rows] = torch.cat([part[key].cpu() for part in parts])
        progress(rows.stop, bank.rollouts, "rollouts")
    return grids


def _position_blocks(logits: torch.Tensor) -> list[tuple[slice]]:
    """Index blocks of `[rollouts, L, V]` logits, whole rollouts each, with about `_BLOCK_BYTES` of float32
    `[positions, V]` per temporary (at least one rollout): the V-wide math allocates several of them."""
    rollouts, length, vocab = logits.shape
    per_block = max(1, _BLOCK_BYTES // (4 * vocab * length))
    return [(slice(start, min(start + per_block, rollouts)),) for start in range(0, rollouts, per_block)]


def _logits_pair(student, teacher, bank: Bank, rows: slice, settings: PassSettings):
    with autocast_context(settings.device, settings.dtype):
        student_logits = response_logits(student, bank, rows, settings.pad_id)[..., : settings.vocab_size]
        teacher_logits = response_logits(teacher, bank, rows, settings.pad_id)[..., : settings.vocab_size]
    return student_logits, teacher_logits
