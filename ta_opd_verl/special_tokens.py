"""Special-token map between a student and a teacher that share a BPE but not their added tokens.

`ta_opd_verl.vocab` accepts a pair whose added (chat-control) tokens differ, id by id, over the common
embedding range: DeepSeek-R1-Distill-Qwen-14B teaching Qwen2.5-3B, where the student's ``<|im_end|>``
(151,645) is the teacher's ``<｜Assistant｜>``. The teacher then scores the student's end of turn as a
token it never emits there. This module says which student ids need a teacher counterpart, derives the
map, refuses a pair it cannot cover, and maps ids both ways.

What a tokenizer uses (`read_specials`, from a loaded Hugging Face tokenizer):

- roles: ``eos``, ``end_of_turn``, ``bos``, ``pad`` (`ROLES`, in priority order). ``end_of_turn`` is found
  by rendering a probe conversation (`PROBE_PROMPT` plus an assistant turn answering `PROBE_ANSWER`) with
  the tokenizer's chat template: it is the first added token after the answer's text (Qwen:
  ``<|im_end|>``; R1-Distill: ``<｜end▁of▁sentence｜>``); none without a template or such a token.
- response ids: the added tokens the student may emit in a response: its EOS and end of turn, plus every
  added token the template renders in the assistant turn but not in the prompt (Qwen3's ``<think>``
  tags, rendered from a reasoning block).
- prompt ids: the added tokens of the rendered prompt with its generation prompt (``<|im_start|>``).

The map (`derive_special_token_map`) covers the ids whose token differs between the two (the vocabulary
report's ``special_differences``); every other id is its own counterpart:

- ``auto``: a student id with a role maps to the teacher's id for that role (first role in `ROLES` order
  that both tokenizers have), else to the teacher's id for the same string, if the teacher has it.
- an explicit mapping ``{student_id: teacher_id}``: exactly those entries.
- ``none``: no entry.

Teacher ids map back to the first student id (in the forward map's role order) that maps to them; a
differing teacher id that no student id maps to has no student counterpart (R1's ``<think>``, its
``<｜Assistant｜>``): its probability mass is the mass the student cannot place (`to_student_columns`).

Refusal (`check_special_token_map`): a response id whose token differs and that the map leaves out is
refused, naming both tokens, both ids and `SPECIAL_TOKEN_MAP_KEY`. Prompt ids that differ are reported,
not refused: a map cannot fix a prompt; the teacher's own prompt does (``ta_opd.teacher_prompt``,
`ta_opd_verl.teacher_prompts`).

How the teachers apply it (a map with entries only; ``none``, an empty map or a pair with no differing id
changes nothing and costs nothing). The teacher reads the whole sequence, prompt included, through
`student_to_teacher_ids`. Its distribution then comes back in the student's id space, column by column
(`SpecialTokenMap.student_reads`): student id s reads the teacher's log-prob at the id the teacher read
for s, when that teacher id comes back to s (``to_student``); a student id with no counterpart (unmapped,
or its teacher id claimed by another student id: Qwen2.5's ``<|endoftext|>`` beside its ``<|im_end|>``,
both the teacher's EOS) gets probability 0; teacher ids no student id reads (`unread_teacher_ids`: the
orphans, and teacher padding rows at differing ids) leave the student's distribution, and their mass is
the teacher mass the student cannot place (`to_student_columns`, `StudentSpaceBlocks`). The rest is not
renormalised: each student id keeps the teacher's own log-prob. The sampled token's log-prob is the
teacher's at the id it read (finite even where the distribution gives that student id 0). A teacher
server maps its returned top-K with `teacher_to_student_ids`, an orphan entry becoming verl's filler for a
missing entry (id 0, log-prob -inf). Prompts stay the student's own, rendered by its chat template.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

SPECIAL_TOKEN_MAP_KEY = "distillation.distillation_loss.ta_opd.special_token_map"
MODES = ("auto", "none")
ROLES = ("end_of_turn", "eos", "bos", "pad")
PROBE_PROMPT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"})
PROBE_ANSWER = "The answer is 4."
PROBE_REASONING = "<think>\nTwo plus two.\n</think>\n\n"
# An id the inverse map gives a teacher id with no student counterpart; `TeacherIdsInStudentSpace.orphan`
# marks those positions.
NO_STUDENT_ID = -1


class SpecialTokenMismatchError(ValueError):
    """The student emits an added token whose id means another token to the teacher, and no map covers it."""


def special_token_map_error(value: object) -> str | None:
    """What a ``special_token_map`` setting must be, or None if it is valid."""
    if value in MODES or (
        isinstance(value, Mapping) and all(_is_token_id(s) and _is_token_id(t) for s, t in value.items())
    ):
        return None
    return f"one of {list(MODES)} or a mapping of non-negative integer token ids student_id: teacher_id"


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TokenizerSpecials:
    """One tokenizer's added tokens and how its chat template and config use them (module docstring)."""

    added: Mapping[int, str]
    roles: Mapping[str, int]
    response_ids: frozenset[int]
    prompt_ids: frozenset[int]

    def roles_of(self, token_id: int) -> list[str]:
        return [role for role in ROLES if self.roles.get(role) == token_id]


def read_specials(tokenizer) -> TokenizerSpecials:
    """`TokenizerSpecials` of a loaded Hugging Face tokenizer (its chat template rendered on the probe)."""
    added = {int(i): token.content for i, token in tokenizer.added_tokens_decoder.items()}
    roles = {
        role: token_id
        for role, token_id in (
            ("eos", tokenizer.eos_token_id),
            ("bos", tokenizer.bos_token_id),
            ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    prompt_ids: frozenset[int] = frozenset()
    turn_ids: frozenset[int] = frozenset()
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(list(PROBE_PROMPT), add_generation_prompt=True, tokenize=False)
        answer = {"role": "assistant", "content": PROBE_REASONING + PROBE_ANSWER}
        conversation = tokenizer.apply_chat_template([*PROBE_PROMPT, answer], tokenize=False)
        end_of_turn = _first_added_token_after(conversation, PROBE_ANSWER, tokenizer, added)
        if end_of_turn is not None:
            roles["end_of_turn"] = end_of_turn
        prompt_ids = _added_ids(prompt, tokenizer, added)
        turn_ids = _added_ids(conversation, tokenizer, added) - prompt_ids
    own_turn = {roles[role] for role in ("eos", "end_of_turn") if role in roles}
    return TokenizerSpecials(
        added=added,
        roles=dict(sorted(roles.items(), key=lambda item: ROLES.index(item[0]))),
        response_ids=frozenset(own_turn) | turn_ids,
        prompt_ids=prompt_ids - own_turn - turn_ids,
    )


def _added_ids(text: str, tokenizer, added: Mapping[int, str]) -> frozenset[int]:
    return frozenset(i for i in tokenizer.encode(text, add_special_tokens=False) if i in added)


def _first_added_token_after(text: str, answer: str, tokenizer, added: Mapping[int, str]) -> int | None:
    """The rule for the end of turn: the first added token in the rendering after the answer's text."""
    start = text.rfind(answer)
    if start < 0:
        return None
    rest = tokenizer.encode(text[start + len(answer) :], add_special_tokens=False)
    return next((i for i in rest if i in added), None)


@dataclass(frozen=True)
class SpecialTokenMap:
    """Student id -> teacher id for the ids whose token differs; the reverse direction and what has none.

    entries: student id -> (teacher id, why: a role name or ``string`` or ``explicit``).
    teacher_orphans: differing teacher ids no student id maps to (their mass cannot be placed).
    unmapped_student_ids: differing student ids left without a teacher counterpart.

    Derived, for the teachers (module docstring): ``to_student`` (teacher id -> the first student id that
    maps to it), ``student_reads`` (student id -> the teacher id whose log-prob it takes, for the entries
    whose teacher id comes back to them), ``no_counterpart`` (the student ids the map touches that read
    none: probability 0) and ``unread_teacher_ids`` (the teacher ids the map touches that no student id
    reads: the mass the student cannot place). Every id the map does not touch reads itself. Plain
    dictionaries and sets of ints: an instance travels pickled to the workers and the teacher servers.
    """

    entries: Mapping[int, tuple[int, str]]
    teacher_orphans: frozenset[int]
    unmapped_student_ids: frozenset[int]
    to_student: Mapping[int, int] = field(init=False)
    student_reads: Mapping[int, int] = field(init=False)
    no_counterpart: frozenset[int] = field(init=False)
    unread_teacher_ids: frozenset[int] = field(init=False)

    def __post_init__(self):
        to_student: dict[int, int] = {}
        for student_id, (teacher_id, _) in self.entries.items():
            to_student.setdefault(teacher_id, student_id)
        reads = {s: t for s, (t, _) in self.entries.items() if to_student[t] == s}
        # The ids whose column the map changes, on either side.
        touched = set(self.entries) | set(to_student) | self.teacher_orphans | self.unmapped_student_ids
        object.__setattr__(self, "to_student", to_student)
        object.__setattr__(self, "student_reads", reads)
        object.__setattr__(self, "no_counterpart", frozenset(touched - set(reads)))
        object.__setattr__(self, "unread_teacher_ids", frozenset(touched - set(reads.values())))

    @property
    def to_teacher(self) -> dict[int, int]:
        return {student_id: teacher_id for student_id, (teacher_id, _) in self.entries.items()}


def derive_special_token_map(
    student: TokenizerSpecials,
    teacher: TokenizerSpecials,
    differing_ids: list[int],
    setting: str | Mapping[int, int],
) -> SpecialTokenMap:
    """The map for ``setting`` (``auto``, ``none`` or an explicit mapping; rules in the module docstring)
    over ``differing_ids``, the ids in the common range whose token differs between the two."""
    problem = special_token_map_error(setting)
    if problem is not None:
        raise SpecialTokenMismatchError(f"{SPECIAL_TOKEN_MAP_KEY} must be {problem}, got {setting!r}")
    differing = sorted(differing_ids)
    if isinstance(setting, Mapping):
        entries = {s: (t, "explicit") for s, t in setting.items()}
    elif setting == "auto":
        entries = _auto_entries(student, teacher, differing)
    else:
        entries = {}
    # Role matches first, so a teacher id shared by two roles maps back to the end of turn before the pad.
    entries = dict(sorted(entries.items(), key=lambda item: (_priority(item[1][1]), item[0])))
    targets = {teacher_id for teacher_id, _ in entries.values()}
    return SpecialTokenMap(
        entries=entries,
        teacher_orphans=frozenset(i for i in differing if i in teacher.added and i not in targets),
        unmapped_student_ids=frozenset(i for i in differing if i in student.added and i not in entries),
    )


def _priority(reason: str) -> int:
    return ROLES.index(reason) if reason in ROLES else len(ROLES)


def _auto_entries(
    student: TokenizerSpecials, teacher: TokenizerSpecials, differing: list[int]
) -> dict[int, tuple[int, str]]:
    by_string = {token: i for i, token in teacher.added.items()}
    entries = {}
    for student_id in differing:
        token = student.added.get(student_id)
        if token is None:
            continue
        role = next((r for r in student.roles_of(student_id) if r in teacher.roles), None)
        if role is not None:
            entries[student_id] = (teacher.roles[role], role)
        elif token in by_string:
            entries[student_id] = (by_string[token], "string")
    return entries


def check_special_token_map(
    student: TokenizerSpecials,
    teacher: TokenizerSpecials,
    token_map: SpecialTokenMap,
    differing_ids: list[int],
) -> list[str]:
    """Refuse a student response id whose token differs and that ``token_map`` leaves out
    (`SpecialTokenMismatchError`, naming both tokens, both ids and the key); return notes on the prompt
    ids that differ (the teacher reads them as its own tokens)."""
    differing = set(differing_ids)
    uncovered = sorted(i for i in student.response_ids & differing if i not in token_map.entries)
    if uncovered:
        raise SpecialTokenMismatchError("; ".join(_refusal(student, teacher, i) for i in uncovered))
    return [
        f"the student's prompt token {student.added[i]!r} (id {i}) is {_token(teacher, i)} to the teacher, "
        "which scores the student's prompt as is"
        for i in sorted(student.prompt_ids & differing)
    ]


def _token(specials: TokenizerSpecials, token_id: int) -> str:
    token = specials.added.get(token_id)
    return repr(token) if token is not None else "no token"


def _refusal(student: TokenizerSpecials, teacher: TokenizerSpecials, student_id: int) -> str:
    roles = student.roles_of(student_id) or ["a response token"]
    counterpart = next((r for r in roles if r in teacher.roles), None)
    if counterpart is not None:
        teacher_id = teacher.roles[counterpart]
        suggestion = (
            f"the teacher's {counterpart} is {_token(teacher, teacher_id)} (id {teacher_id}); set "
            f"{SPECIAL_TOKEN_MAP_KEY}=auto, or map it explicitly: {{{student_id}: {teacher_id}}}"
        )
    else:
        suggestion = f"map it in {SPECIAL_TOKEN_MAP_KEY}: {{{student_id}: <teacher id>}}"
    return (
        f"the student's {'/'.join(roles)} {student.added[student_id]!r} (id {student_id}) is "
        f"{_token(teacher, student_id)} to the teacher; {suggestion}"
    )


def describe_map(
    student: TokenizerSpecials, teacher: TokenizerSpecials, token_map: SpecialTokenMap
) -> list[str]:
    """One line per entry (``student token (id) -> teacher token (id) [why]``), then the orphans."""
    lines = [
        f"{student.added.get(s)!r} ({s}) -> {_token(teacher, t)} ({t}) [{why}]"
        for s, (t, why) in token_map.entries.items()
    ]
    if token_map.teacher_orphans:
        orphans = ", ".join(f"{teacher.added[i]!r} ({i})" for i in sorted(token_map.teacher_orphans))
        lines.append(
            f"teacher tokens with no student counterpart (the student cannot place their mass): {orphans}"
        )
    return lines


# ---- the mapping itself, on id tensors ----------------------------------------------------------------


def _replace(ids: torch.Tensor, table: Mapping[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with every key of ``table`` replaced by its value, and where a replacement happened."""
    if not table:
        return ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    keys = torch.tensor(list(table), dtype=ids.dtype, device=ids.device)
    values = torch.tensor(list(table.values()), dtype=ids.dtype, device=ids.device)
    matches = ids.unsqueeze(-1) == keys
    replaced = matches.any(-1)
    return torch.where(replaced, values[matches.int().argmax(-1)], ids), replaced


def student_to_teacher_ids(ids: torch.Tensor, token_map: SpecialTokenMap) -> torch.Tensor:
    """Student token ids as the teacher should read them (ids outside the map are unchanged)."""
    return _replace(ids, token_map.to_teacher)[0]


@dataclass(frozen=True)
class TeacherIdsInStudentSpace:
    """Teacher-returned ids mapped to the student's: ``ids`` (`NO_STUDENT_ID` where ``orphan``)."""

    ids: torch.Tensor
    orphan: torch.Tensor


def teacher_to_student_ids(ids: torch.Tensor, token_map: SpecialTokenMap) -> TeacherIdsInStudentSpace:
    """Teacher ids (a top-K list, a sampled id) in the student's id space: each to the student id that reads
    it (`SpecialTokenMap.student_reads`); the ids no student id reads are marked orphan."""
    mapped, _ = _replace(ids, {t: s for s, t in token_map.student_reads.items()})
    unread = torch.tensor(sorted(token_map.unread_teacher_ids), dtype=ids.dtype, device=ids.device)
    orphan = torch.isin(ids, unread)
    return TeacherIdsInStudentSpace(ids=mapped.masked_fill(orphan, NO_STUDENT_ID), orphan=orphan)


# ---- the teacher's whole distribution in the student's id space, a block of rows at a time -------------


def to_student_columns(log_probs: torch.Tensor, token_map: SpecialTokenMap) -> torch.Tensor:
    """Turn ``[n, V_C]`` teacher log-probs over the ids ``[0, V_C)`` into the student's over the same ids, in
    place: column s takes the teacher's column `SpecialTokenMap.student_reads` names for it, the
    student ids with no counterpart (also one whose teacher id lies past ``V_C``) get -inf, every other
    column stays as it is. Returns the teacher's probability on the ids no student id reads, per row
    ``[n]`` (0 where there are none). Only the touched columns are read or written."""
    width = log_probs.shape[-1]
    moves = [(s, t) for s, t in token_map.student_reads.items() if s < width and t < width and s != t]
    unread = {t for t in token_map.unread_teacher_ids if t < width}
    unread |= {t for s, t in token_map.student_reads.items() if t < width <= s}

    def index(ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=log_probs.device)

    orphan_mass_per_row = torch.logsumexp(log_probs[:, index(sorted(unread))], dim=-1).exp()
    # Every source column is read before any column is written (a source may itself lose its column).
    moved = log_probs[:, index([t for _, t in moves])]
    log_probs[:, index(student_ids_without_counterpart(token_map, width))] = float("-inf")
    log_probs[:, index([s for s, _ in moves])] = moved
    return orphan_mass_per_row


def student_ids_without_counterpart(token_map: SpecialTokenMap, width: int) -> list[int]:
    """The student ids below ``width`` whose column `to_student_columns` sets to -inf."""
    ids = {s for s in token_map.no_counterpart if s < width}
    return sorted(ids | {s for s, t in token_map.student_reads.items() if s < width <= t})


class StudentSpaceBlocks:
    """Teacher log-prob blocks ``(rows, [n, V_C])`` (`ta_opd_verl.teacher_head`) passed on in the student's id
    space (`to_student_columns`) one at a time, so the working memory stays one block. On the way it
    records per row ``orphan_mass``, and with ``read_ids`` (``[rows]``, the teacher id each row's next token
    was read as) ``read_logprobs``: the teacher's log-prob there, taken before the columns move, -inf past
    ``V_C``."""

    def __init__(
        self,
        blocks: Iterable[tuple[slice, torch.Tensor]],
        token_map: SpecialTokenMap,
        rows: int,
        device: torch.device,
        read_ids: torch.Tensor | None = None,
    ):
        self.blocks, self.token_map, self.read_ids = blocks, token_map, read_ids
        self.orphan_mass = torch.zeros(rows, dtype=torch.float32, device=device)
        self.read_logprobs = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for rows, log_probs in self.blocks:
            if self.read_ids is not None:
                ids = self.read_ids[rows].unsqueeze(-1)
                width = log_probs.shape[-1]
                read = log_probs.gather(-1, ids.clamp(max=width - 1)).masked_fill(ids >= width, -math.inf)
                self.read_logprobs[rows] = read.squeeze(-1)
            self.orphan_mass[rows] = to_student_columns(log_probs, self.token_map)
            yield rows, log_probs
