"""A teacher's distribution in the student's id space, written out by hand for the tests of the
special-token map (`ta_opd_verl.special_tokens`): the expected column moves are given explicitly, not
derived from a map."""

from __future__ import annotations

import torch


def moved_columns(
    teacher_log_probs: torch.Tensor, reads: dict[int, int], without_counterpart: list[int], orphans: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` teacher log-probs in the student's ids: student column s takes teacher column ``reads[s]``,
    the ``without_counterpart`` columns probability 0, every other column its own; and the teacher's
    probability on ``orphans`` per row, summed in float64."""
    student = teacher_log_probs.clone()
    for student_id, teacher_id in reads.items():
        student[:, student_id] = teacher_log_probs[:, teacher_id]
    student[:, without_counterpart] = float("-inf")
    return student, teacher_log_probs[:, orphans].double().exp().sum(-1)
