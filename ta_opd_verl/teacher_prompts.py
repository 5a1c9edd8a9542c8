"""Teacher-side prompts (``distillation.distillation_loss.ta_opd.teacher_prompt``): the prompt the teacher
scores the student's response after.

- ``student`` (default): the student's prompt ids, as verl sends them.
- ``teacher_template``: the same conversation (verl's dataset gives each sample's chat messages as
  ``raw_prompt``) rendered with the TEACHER's tokenizer and chat template, with the generation prompt: a
  teacher trained on another chat format (DeepSeek-R1-Distill teaching Qwen2.5) reads its own format.
- ``column``: per sample, the chat messages of a dataset column (``teacher_prompt_column``) rendered with
  the teacher's template: a system prompt, a hint or the reference solution that only the teacher sees
  (on-policy self-distillation, context distillation).

The response is the student's, token for token (through the special-token map where the teacher's added
tokens differ), so only the prompt part differs in length. `teacher_positions` lines the teacher's rows up
with the student's sequence: every row that predicts a response token (from the last prompt position on)
is the teacher's row for the same response token; the student's earlier prompt positions, which nothing
downstream reads (verl cuts every per-token field to the response), take the teacher's prompt rows counted
from its end. Both teachers use it: the server teacher on the rows a server returns
(`ta_opd_verl.teachers.server`), the colocated teacher on its hidden states
(`ta_opd_verl.teachers.colocated`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

TEACHER_PROMPT_KEY = "distillation.distillation_loss.ta_opd.teacher_prompt"
# verl's dataset (``RLHFDataset.__getitem__``) gives each sample's conversation as chat messages here.
CONVERSATION_FIELD = "raw_prompt"


class TeacherPromptError(ValueError):
    """A sample's teacher-side prompt cannot be built (missing or malformed chat messages)."""


@dataclass(frozen=True)
class TeacherPrompts:
    """How the teacher's prompt is built for each sample (``mode``: ``teacher_template`` or ``column``)."""

    mode: str
    column: str
    # ``data.apply_chat_template_kwargs``, which verl passes to the student's template: the teacher's too.
    chat_template_kwargs: tuple[tuple[str, object], ...] = ()

    @classmethod
    def from_config(cls, config) -> TeacherPrompts | None:
        """For a composed verl config; None with ``teacher_prompt=student`` (the default)."""
        from omegaconf import OmegaConf

        mode = OmegaConf.select(config, TEACHER_PROMPT_KEY, default="student")
        if mode == "student":
            return None
        column = OmegaConf.select(config, f"{TEACHER_PROMPT_KEY}_column", default="teacher_prompt")
        kwargs = OmegaConf.select(config, "data.apply_chat_template_kwargs", default=None)
        return cls(mode, column, tuple((OmegaConf.to_container(kwargs) if kwargs else {}).items()))

    @property
    def source_field(self) -> str:
        """The per-sample field holding the chat messages to render."""
        return CONVERSATION_FIELD if self.mode == "teacher_template" else self.column

    def messages(self, sample: Mapping) -> list[dict]:
        """The chat messages of one sample (a mapping of its dataset fields), as plain dictionaries."""
        if self.source_field not in sample:
            raise TeacherPromptError(
                f"{TEACHER_PROMPT_KEY}={self.mode}: the sample has no field {self.source_field!r} "
                f"(its fields: {', '.join(sorted(map(str, sample)))})"
            )
        return chat_messages(sample[self.source_field], self.source_field)

    def prompt_ids(self, teacher_path: str, messages: Sequence[Mapping]) -> list[int]:
        """``messages`` in the chat template of the teacher at ``teacher_path``, with the generation
        prompt."""
        ids = teacher_tokenizer(teacher_path).apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, **dict(self.chat_template_kwargs)
        )
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def chat_messages(value, field: str) -> list[dict]:
    """A field's chat messages as a list of ``{"role", "content"}`` dictionaries (parquet and TransferQueue
    hand them over as numpy arrays of dictionaries)."""
    messages = list(value) if isinstance(value, Sequence) or hasattr(value, "tolist") else None
    if not messages or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in messages):
        raise TeacherPromptError(
            f"field {field!r} holds {type(value).__name__} {str(value)[:80]!r}: a non-empty list of chat "
            "messages ({'role': ..., 'content': ...}) is accepted"
        )
    return [dict(message) for message in messages]


@functools.cache
def teacher_tokenizer(path: str):
    """The teacher's tokenizer, loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def teacher_positions(
    student_prompt_length: int, teacher_prompt_length: int, response_length: int
) -> torch.Tensor:
    """For each position of the student's sequence (its prompt, then the response), the position in the
    teacher's sequence (the teacher's prompt, then the same response) whose row stands for it.

    Row t describes token t + 1, so the rows that matter start at the last prompt position: student position
    ``Sp - 1 + j`` takes teacher position ``Tp - 1 + j`` (j = 0 .. R). The student's earlier prompt positions
    take the teacher's prompt positions counted from the end, the first one repeated when the teacher's prompt
    is the shorter: real rows of the teacher, finite, read by nothing."""
    if min(student_prompt_length, teacher_prompt_length) < 1:
        raise ValueError("both prompts need a token at least: the first response token is predicted from it")
    positions = torch.arange(student_prompt_length + response_length)
    return (positions + teacher_prompt_length - student_prompt_length).clamp(min=0)
