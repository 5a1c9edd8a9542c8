"""Do a student and a teacher share a vocabulary? On-policy distillation feeds the student's token ids to
the teacher and compares the two models' logits id by id, so it needs the same id -> token mapping.

The rule `check_same_vocabulary` applies, id by id over the common embedding range
``[0, min(student vocab_size, teacher vocab_size))`` (``config.vocab_size``, the embedding rows):

1. Regular tokens (the tokenizer model's own vocabulary: BPE ranks, word pieces) must be identical.
2. Added tokens (``added_tokens`` in tokenizer.json: chat-control and special tokens such as
   ``<|im_end|>`` or ``<｜Assistant｜>``) may differ, or exist on one side only, where BOTH sides hold an
   added token or one side holds nothing (an embedding padding row). Each model's chat template renders
   its own control tokens, so the text the student samples maps to the same regular ids; the differing
   ids are returned in `VocabularyReport.special_differences` for the caller to mask or map (the
   student's EOS, for one, is usually among them). A regular token facing an added token is a mismatch.
3. Embedding sizes may differ (padding rows): logits are then compared on the common range. Every
   student token id must lie inside the teacher's embedding, or the teacher could not score it; teacher
   tokens beyond the student's embedding are outside the common range and only counted.

This accepts the paper's DeepSeek-R1-Distill-Qwen-14B -> Qwen2.5-3B pair (one Qwen2 BPE of 151,643
regular tokens, different added tokens from id 151,643 on, embeddings of 152,064 vs 151,936 rows) and
refuses unrelated tokenizers with `VocabularyMismatchError`. `check_pair`, the pre-flight check of a pair,
adds the special-token map over the differing ids (`ta_opd_verl.special_tokens`), which refuses a pair
whose differing ids the student emits in its responses when no map covers them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ta_opd_verl.special_tokens import (
    SpecialTokenMap,
    TokenizerSpecials,
    check_special_token_map,
    derive_special_token_map,
    describe_map,
    read_specials,
)

APPLIED = (
    "applied by both teachers: they read the student's sequence through the map and score in the student's "
    "ids"
)
# What the teacher's prompt is, by ``ta_opd.teacher_prompt``.
PROMPT_READ = {
    "student": "the prompt is the student's own, rendered by its chat template (ta_opd.teacher_prompt="
    "teacher_template renders it in the teacher's)",
    "teacher_template": "the prompt is the conversation in the teacher's own chat template "
    "(ta_opd.teacher_prompt=teacher_template)",
    "column": "the prompt is each sample's teacher prompt column in the teacher's own chat template "
    "(ta_opd.teacher_prompt=column)",
}
# The input embedding's parameter name in Hugging Face causal-LM checkpoints (Qwen2/3, Llama, ...).
EMBEDDING_SUFFIX = "embed_tokens.weight"


class VocabularyMismatchError(ValueError):
    """The student and teacher do not share a vocabulary (see the module docstring for the rule)."""


@dataclass(frozen=True)
class Vocabulary:
    """One model folder's id -> token mapping, which ids are added tokens, and its embedding rows."""

    path: Path
    id_to_token: dict[int, str]
    added_ids: frozenset[int]
    embedding_rows: int

    @property
    def size(self) -> int:
        return len(self.id_to_token)


@dataclass(frozen=True)
class VocabularyReport:
    """What `check_same_vocabulary` found for a compatible pair.

    common_size: ids ``[0, common_size)`` have logits in both models (the smaller embedding).
    special_differences: ``(id, student token or None, teacher token or None)`` for every added-token id
        in the common range whose token differs or exists on one side only.
    teacher_only_ids: teacher tokens at ids ``>= common_size`` (outside the common logit range).
    """

    student: Vocabulary
    teacher: Vocabulary
    common_size: int
    special_differences: tuple[tuple[int, str | None, str | None], ...]
    teacher_only_ids: int


def load_vocabulary(model_path: str | os.PathLike) -> Vocabulary:
    """Read a model folder's tokenizer (tokenizer.json, else via AutoTokenizer) and config.vocab_size."""
    path = Path(model_path)
    if not path.is_dir():
        raise VocabularyMismatchError(f"{path}: not a model folder")
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        token_to_id = tokenizer.get_vocab(with_added_tokens=True)
        added_ids = frozenset(tokenizer.get_added_tokens_decoder())
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        token_to_id = tokenizer.get_vocab()
        added_ids = frozenset(tokenizer.added_tokens_decoder)
    id_to_token = {i: token for token, i in token_to_id.items()}
    embedding_rows = _config_vocab_size(path)
    return Vocabulary(
        path=path,
        id_to_token=id_to_token,
        added_ids=added_ids,
        embedding_rows=embedding_rows if embedding_rows is not None else max(id_to_token, default=-1) + 1,
    )


def _config_vocab_size(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return int(config["vocab_size"]) if config.get("vocab_size") else None


def _describe(vocab: Vocabulary, token_id: int) -> str:
    token = vocab.id_to_token.get(token_id)
    if token is None:
        return "no token"
    return f"{'added' if token_id in vocab.added_ids else 'regular'} token {token!r}"


def compare_vocabularies(student: Vocabulary, teacher: Vocabulary) -> VocabularyReport:
    """Apply the module's rule to two loaded vocabularies; raise `VocabularyMismatchError` on a mismatch."""
    common = min(student.embedding_rows, teacher.embedding_rows)
    header = f"student {student.path} and teacher {teacher.path} do not share a vocabulary"
    beyond = sorted(i for i in student.id_to_token if i >= teacher.embedding_rows)
    if beyond:
        raise VocabularyMismatchError(
            f"{header}: student token id {beyond[0]} ({_describe(student, beyond[0])}) is outside the "
            f"teacher's embedding ({teacher.embedding_rows} rows; {len(beyond)} student ids lie beyond it)"
        )
    mismatches: list[int] = []
    special: list[tuple[int, str | None, str | None]] = []
    for token_id in sorted(set(student.id_to_token) | set(teacher.id_to_token)):
        if token_id >= common:
            continue
        s_token, t_token = student.id_to_token.get(token_id), teacher.id_to_token.get(token_id)
        s_added, t_added = token_id in student.added_ids, token_id in teacher.added_ids
        if s_token == t_token and s_added == t_added:
            continue
        special_ok = (s_added or s_token is None) and (t_added or t_token is None)
        if special_ok:
            special.append((token_id, s_token, t_token))
        else:
            mismatches.append(token_id)
    if mismatches:
        first = mismatches[0]
        raise VocabularyMismatchError(
            f"{header}: id {first} is {_describe(student, first)} in the student but "
            f"{_describe(teacher, first)} in the teacher ({len(mismatches)} of {common} common ids differ; "
            "only added/special tokens may differ)"
        )
    return VocabularyReport(
        student=student,
        teacher=teacher,
        common_size=common,
        special_differences=tuple(special),
        teacher_only_ids=sum(1 for i in teacher.id_to_token if i >= common),
    )


def check_same_vocabulary(
    student_path: str | os.PathLike, teacher_path: str | os.PathLike
) -> VocabularyReport:
    """Check that the student and teacher model folders share a vocabulary (rule: module docstring).

    Returns a `VocabularyReport`; raises `VocabularyMismatchError` naming both paths and the first
    differing id with its two tokens.
    """
    return compare_vocabularies(load_vocabulary(student_path), load_vocabulary(teacher_path))


@dataclass(frozen=True)
class PairCheck:
    """What `check_pair` found for an accepted pair.

    vocabulary: the vocabulary rule's report.
    token_map: the special-token map, or None where no id differs (no map needed).
    student, teacher: each tokenizer's special tokens as read for the map (None with no map).
    notes: the prompt tokens the teacher reads as other tokens (`check_special_token_map`).
    """

    vocabulary: VocabularyReport
    token_map: SpecialTokenMap | None = None
    student: TokenizerSpecials | None = None
    teacher: TokenizerSpecials | None = None
    notes: tuple[str, ...] = ()

    def summary(self, teacher_prompt: str = "student") -> list[str]:
        """What a user is told: that no map is needed, or the map the teachers apply, then the notes (on the
        student's prompt tokens only while the teacher reads that prompt: ``teacher_prompt=student``)."""
        if self.token_map is None:
            return ["the tokenizers agree on every id in common: no special-token map needed"]
        if self.token_map.entries:
            lines = ["special-token map (student -> teacher):"]
            lines += [f"  {line}" for line in describe_map(self.student, self.teacher, self.token_map)]
            lines.append(f"  {APPLIED}; {PROMPT_READ[teacher_prompt]}")
        else:
            lines = ["special-token map: empty (no token the student emits in a response differs)"]
        notes = self.notes if teacher_prompt == "student" else ()
        return lines + [f"note: {note}" for note in notes]


def check_pair(
    student_path: str | os.PathLike, teacher_path: str | os.PathLike, special_token_map="auto"
) -> PairCheck:
    """The pre-flight check of one student/teacher pair: each folder's embedding matches its config, the
    vocabulary rule (module docstring), and, where added tokens differ, the special-token map for the
    setting ``special_token_map`` (``auto``, ``none`` or ``{student_id: teacher_id}``). Raises
    `VocabularyMismatchError` or `ta_opd_verl.special_tokens.SpecialTokenMismatchError`."""
    for path in (student_path, teacher_path):
        check_embedding_matches_config(path)
    report = check_same_vocabulary(student_path, teacher_path)
    differing = [token_id for token_id, _, _ in report.special_differences]
    if not differing:
        return PairCheck(vocabulary=report)
    student, teacher = (read_specials(AutoTokenizer.from_pretrained(p)) for p in (student_path, teacher_path))
    token_map = derive_special_token_map(student, teacher, differing, special_token_map)
    notes = check_special_token_map(student, teacher, token_map, differing)
    return PairCheck(report, token_map, student, teacher, tuple(notes))


def embedding_rows_in_weights(model_path: str | os.PathLike) -> int | None:
    """Rows of the input embedding (``*embed_tokens.weight``) in a folder's safetensors weights, read from
    the file headers without loading a tensor; None where the folder has no safetensors weights."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(
            {path / shard for name, shard in weight_map.items() if name.endswith(EMBEDDING_SUFFIX)}
        )
    else:
        shards = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    for shard in shards:
        with open(shard, "rb") as weights:
            header_length = int.from_bytes(weights.read(8), "little")
            header = json.loads(weights.read(header_length))
        for name, entry in header.items():
            if name.endswith(EMBEDDING_SUFFIX):
                return int(entry["shape"][0])
    return None


def check_embedding_matches_config(model_path: str | os.PathLike) -> None:
    """config.json's ``vocab_size`` is the embedding the weights hold (a mismatch fails only when the
    model is loaded, in a worker)."""
    configured, stored = _config_vocab_size(Path(model_path)), embedding_rows_in_weights(model_path)
    if configured is not None and stored is not None and configured != stored:
        raise VocabularyMismatchError(
            f"{model_path}: config.json says vocab_size={configured} but the weights' embedding has {stored} "
            "rows; set vocab_size to the weights' row count"
        )
