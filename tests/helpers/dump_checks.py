"""Checks of a run's selection dump (``ta_opd.selection_dump_dir``) shared by the end-to-end tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ta_opd_verl.batch_selection import load_trained_positions


def assert_the_update_trained_on_the_dumped_selection(dump_dir: Path, step: int, records: list[dict]) -> None:
    """What the actor workers' loss was taken over (recorded from each update micro-batch's own
    ``loss_mask``) is, sample by sample, the selection the driver dumped."""
    trained = load_trained_positions(dump_dir, step)
    assert trained, f"step {step}: no update micro-batch recorded what it trained on"
    dumped = Counter((tuple(r["response_ids"]), tuple(r["selected"])) for r in records)
    used = Counter((tuple(r["response_ids"]), tuple(r["trained"])) for r in trained)
    assert used == dumped, f"step {step}: the update trained on another mask than the dumped selection"


def teacher_sampled_logprobs(teacher, record: dict) -> torch.Tensor:
    """The teacher's log-prob of each response token of a dump record, from a plain forward here."""
    prompt, response = record["prompt_ids"], record["response_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return log_probs[positions, torch.tensor(response)]
