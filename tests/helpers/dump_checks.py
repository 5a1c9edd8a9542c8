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


def teacher_sampled_logprobs(teacher, record: dict, teacher_prompt: list[int] | None = None) -> torch.Tensor:
    """The teacher's log-prob of each response token of a dump record, from a plain forward here after
    ``teacher_prompt`` (default: the record's own prompt, the student's)."""
    prompt, response = teacher_prompt or record["prompt_ids"], record["response_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return log_probs[positions, torch.tensor(response)]


# The system message of `with_teacher_prompt_column`: privileged context only the teacher reads.
TEACHER_SYSTEM_PROMPT = "You are the teacher."


def with_teacher_prompt_column(train_parquet: Path, out: Path) -> Path:
    """A copy of a training file with a ``teacher_prompt`` column (``ta_opd.teacher_prompt=column``): each
    row's conversation after a system message."""
    import pandas as pd

    frame = pd.read_parquet(train_parquet)
    frame["teacher_prompt"] = [
        [{"role": "system", "content": TEACHER_SYSTEM_PROMPT}, *map(dict, messages)]
        for messages in frame["prompt"]
    ]
    frame.to_parquet(out)
    return out


def teacher_prompts_by_student_prompt(
    train_parquet: Path, student_path, teacher_path
) -> dict[tuple, list[int]]:
    """For a file with a ``teacher_prompt`` column: each row's student prompt ids (its ``prompt`` in the
    student's template, as verl renders it) -> its teacher prompt ids (the column in the teacher's)."""
    import pandas as pd
    from transformers import AutoTokenizer

    student, teacher = (AutoTokenizer.from_pretrained(path) for path in (student_path, teacher_path))
    frame = pd.read_parquet(train_parquet)

    def ids(tokenizer, messages) -> list[int]:
        encoded = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)
        return list(encoded["input_ids"] if "input_ids" in encoded else encoded)

    return {
        tuple(ids(student, prompt)): ids(teacher, column)
        for prompt, column in zip(frame["prompt"], frame["teacher_prompt"], strict=True)
    }
