"""The special-token map (`ta_opd_verl.special_tokens`) and the pair check (`ta_opd_verl.vocab.check_pair`)
on the real Qwen3, Qwen2.5-Instruct and DeepSeek-R1-Distill-Qwen tokenizers, built offline once per
session (``real_tokenizer_folders`` in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from student_space import moved_columns
from transformers import AutoTokenizer

from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.special_tokens import (
    NO_STUDENT_ID,
    SPECIAL_TOKEN_MAP_KEY,
    SpecialTokenMap,
    SpecialTokenMismatchError,
    StudentSpaceBlocks,
    check_special_token_map,
    derive_special_token_map,
    read_specials,
    student_to_teacher_ids,
    teacher_to_student_ids,
)
from ta_opd_verl.teacher_head import logit_log_prob_blocks
from ta_opd_verl.vocab import APPLIED, check_pair, check_same_vocabulary

QWEN25, R1, QWEN3 = "qwen2.5-instruct", "deepseek-r1-distill-qwen", "qwen3"
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
R1_EOS, R1_USER, R1_ASSISTANT, R1_BOS, R1_THINK = 151643, 151644, 151645, 151646, 151648
QWEN3_THINK, QWEN3_END_THINK = 151667, 151668


@pytest.fixture(scope="module")
def loaded(real_tokenizer_folders):
    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in real_tokenizer_folders.items()}


@pytest.fixture(scope="module")
def specials(loaded):
    return {name: read_specials(tokenizer) for name, tokenizer in loaded.items()}


@pytest.fixture(scope="module")
def checked_map(real_tokenizer_folders, specials):
    """``checked_map(student, teacher, setting)``: what `check_pair` derives and checks, from the tokenizers
    loaded once (`check_pair` loads them on every call)."""
    differing = {}

    def derive_and_check(student, teacher, setting="auto"):
        if (student, teacher) not in differing:
            report = check_same_vocabulary(real_tokenizer_folders[student], real_tokenizer_folders[teacher])
            differing[student, teacher] = [token_id for token_id, _, _ in report.special_differences]
        ids = differing[student, teacher]
        token_map = derive_special_token_map(specials[student], specials[teacher], ids, setting)
        check_special_token_map(specials[student], specials[teacher], token_map, ids)
        return token_map

    return derive_and_check


def test_roles_and_template_tokens_of_each_family(specials):
    """End of turn: the first added token after the answer in each chat template's rendering."""
    assert dict(specials[QWEN25].roles) == {"end_of_turn": IM_END, "eos": IM_END, "pad": ENDOFTEXT}
    assert specials[QWEN25].response_ids == {IM_END}
    assert specials[QWEN25].prompt_ids == {IM_START}
    assert dict(specials[R1].roles) == {"end_of_turn": R1_EOS, "eos": R1_EOS, "bos": R1_BOS, "pad": R1_EOS}
    assert specials[R1].response_ids == {R1_EOS}
    # The generation prompt ends with "<think>\n": a prompt token for R1, a response token for Qwen3.
    assert specials[R1].prompt_ids == {R1_BOS, R1_USER, R1_ASSISTANT, R1_THINK}
    assert specials[QWEN3].response_ids == {IM_END, QWEN3_THINK, QWEN3_END_THINK}


def test_auto_map_of_the_paper_pair(real_tokenizer_folders):
    """DeepSeek-R1-Distill-Qwen teaching Qwen2.5: the student's end of turn to the teacher's end of
    sentence by role, its pad too; the teacher's own control tokens have no student counterpart."""
    pair = check_pair(real_tokenizer_folders[QWEN25], real_tokenizer_folders[R1], "auto")
    token_map = pair.token_map
    assert dict(token_map.entries) == {IM_END: (R1_EOS, "end_of_turn"), ENDOFTEXT: (R1_EOS, "pad")}
    # Two student ids reach the teacher's EOS; back, it is the student's end of turn.
    assert dict(token_map.to_student) == {R1_EOS: IM_END}
    assert token_map.teacher_orphans == set(range(R1_USER, R1_THINK + 2))
    assert token_map.unmapped_student_ids == {IM_START, 151646, 151647, 151648, 151649}
    summary = "\n".join(pair.summary())
    assert "'<|im_end|>' (151645) -> '<｜end▁of▁sentence｜>' (151643) [end_of_turn]" in summary
    assert APPLIED in summary and "the prompt is the student's own" in summary
    assert "prompt token '<|im_start|>' (id 151644) is '<｜User｜>' to the teacher" in summary
    # The teacher reading its own template reads no student prompt token: no note on them.
    own_template = "\n".join(pair.summary("teacher_template"))
    assert "the conversation in the teacher's own chat template" in own_template
    assert "<|im_start|>" not in own_template


def test_without_a_map_the_paper_pair_is_refused_naming_tokens_ids_and_key(real_tokenizer_folders):
    with pytest.raises(SpecialTokenMismatchError) as info:
        check_pair(real_tokenizer_folders[QWEN25], real_tokenizer_folders[R1], "none")
    message = str(info.value)
    for expected in ("'<|im_end|>' (id 151645)", "'<｜Assistant｜>'", "'<｜end▁of▁sentence｜>' (id 151643)"):
        assert expected in message
    assert f"{SPECIAL_TOKEN_MAP_KEY}=auto" in message and "{151645: 151643}" in message


def test_an_explicit_map_must_cover_the_response_tokens(checked_map):
    assert dict(checked_map(QWEN25, R1, {IM_END: R1_EOS}).entries) == {IM_END: (R1_EOS, "explicit")}
    with pytest.raises(SpecialTokenMismatchError, match=r"'<\|im_end\|>' \(id 151645\)"):
        checked_map(QWEN25, R1, {ENDOFTEXT: R1_EOS})


def test_thinking_tags_map_by_exact_string(checked_map):
    """R1-Distill teaching Qwen3 and back: the tags sit at different ids; without a map every differing
    response token of the Qwen3 student is named."""
    r1_student = checked_map(R1, QWEN3)
    assert r1_student.entries[R1_THINK] == (QWEN3_THINK, "string")
    assert r1_student.entries[R1_EOS] == (IM_END, "end_of_turn")
    qwen3_student = checked_map(QWEN3, R1)
    assert qwen3_student.entries[QWEN3_END_THINK] == (R1_THINK + 1, "string")
    with pytest.raises(SpecialTokenMismatchError) as info:
        checked_map(QWEN3, R1, "none")
    assert all(f"(id {i})" in str(info.value) for i in (IM_END, QWEN3_THINK, QWEN3_END_THINK))


def test_qwen3_pairs_need_no_map(real_tokenizer_folders):
    pair = check_pair(real_tokenizer_folders[QWEN3], real_tokenizer_folders[QWEN3], "none")
    assert pair.token_map is None and pair.vocabulary.special_differences == ()
    assert pair.summary() == ["the tokenizers agree on every id in common: no special-token map needed"]


def test_a_response_round_trips_through_the_map(checked_map, loaded):
    student, teacher = loaded[QWEN25], loaded[R1]
    token_map = checked_map(QWEN25, R1)
    response = torch.tensor([student.encode("The answer is 4.<|im_end|>", add_special_tokens=False)])
    assert response[0, -1].item() == IM_END
    for_teacher = student_to_teacher_ids(response, token_map)
    assert teacher.decode(for_teacher[0]) == "The answer is 4.<｜end▁of▁sentence｜>"
    assert torch.equal(for_teacher[:, :-1], response[:, :-1])
    back = teacher_to_student_ids(for_teacher, token_map)
    assert torch.equal(back.ids, response) and not back.orphan.any()


def test_teacher_lists_map_back_with_orphans_marked_and_their_mass_counted(checked_map):
    token_map = checked_map(QWEN25, R1)
    # One position's teacher top-4: its EOS, "<think>" (no student counterpart), "The", "<｜Assistant｜>".
    teacher_ids = torch.tensor([[R1_EOS, R1_THINK, 785, R1_ASSISTANT]])
    teacher_probs = torch.tensor([[0.5, 0.2, 0.2, 0.05]])
    mapped = teacher_to_student_ids(teacher_ids, token_map)
    assert mapped.ids.tolist() == [[IM_END, NO_STUDENT_ID, 785, NO_STUDENT_ID]]
    assert mapped.orphan.tolist() == [[False, True, False, True]]
    # The teacher mass on the marked entries is what the student cannot place.
    assert (teacher_probs * mapped.orphan).sum().item() == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("auto", True),
        ("none", True),
        ({151645: 151643}, True),
        ("sometimes", False),
        ({"151645": 151643}, False),
        ({151645: -1}, False),
        ({151645: True}, False),
        (3, False),
    ],
)
def test_config_key_is_validated(value, accepted):
    if accepted:
        assert TAOPDConfig(special_token_map=value).special_token_map == value
        return
    with pytest.raises(ValueError, match=r"ta_opd\.special_token_map must be one of \['auto', 'none'\] or a"):
        TAOPDConfig(special_token_map=value)


def test_config_default_keeps_existing_runs_working():
    assert TAOPDConfig().special_token_map == "auto"


# ---- the teacher's distribution in the student's ids, block by block ---------------------------------

# A map over a 12-id vocabulary: two student ids reach teacher id 8 (the end of turn first, so it keeps
# it), student 11 reads teacher 9, student 6 is unmapped and teacher 7 an orphan.
SMALL_MAP = SpecialTokenMap(
    entries={10: (8, "end_of_turn"), 8: (8, "pad"), 11: (9, "string")},
    teacher_orphans=frozenset({7}),
    unmapped_student_ids=frozenset({6}),
)


def _student_space(log_probs: torch.Tensor, token_map, block_rows: int, read_ids=None):
    blocks = StudentSpaceBlocks(
        logit_log_prob_blocks(log_probs, vocab=log_probs.shape[-1], block_rows=block_rows),
        token_map,
        log_probs.shape[0],
        log_probs.device,
        read_ids,
    )
    return torch.cat([block.clone() for _, block in blocks]), blocks


@pytest.mark.parametrize("block_rows", [1, 3, 100])
def test_the_column_gather_per_block_equals_the_columns_moved_by_hand(block_rows):
    logits = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    read_ids = torch.tensor([8, 9, 0, 8, 7, 11, 2])
    student, blocks = _student_space(logits, SMALL_MAP, block_rows, read_ids)
    teacher = torch.log_softmax(logits, -1)
    expected, orphan = moved_columns(teacher, {10: 8, 11: 9}, [6, 7, 8, 9], [6, 7, 10, 11])
    assert torch.equal(student, expected)
    torch.testing.assert_close(blocks.orphan_mass.double(), orphan, rtol=1e-6, atol=1e-7)
    # What the teacher gave each id it read, before the columns moved (8 and 9 no longer have a column).
    torch.testing.assert_close(blocks.read_logprobs.double(), teacher.gather(-1, read_ids[:, None])[:, 0])
    # What the student cannot place is what its columns lack: together they hold all the teacher's mass.
    torch.testing.assert_close(student.exp().sum(-1) + orphan, torch.ones(7, dtype=torch.float64))


def test_an_identity_map_leaves_every_block_unchanged_bit_for_bit():
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    unchanged = torch.log_softmax(logits, -1)
    for token_map in (
        SpecialTokenMap(
            entries={5: (5, "explicit")}, teacher_orphans=frozenset(), unmapped_student_ids=frozenset()
        ),
        SpecialTokenMap(entries={}, teacher_orphans=frozenset(), unmapped_student_ids=frozenset()),
    ):
        student, blocks = _student_space(logits, token_map, block_rows=2)
        assert torch.equal(student, unchanged)
        assert torch.equal(blocks.orphan_mass, torch.zeros(5))


def test_the_paper_pairs_map_moves_the_end_of_turn_and_counts_rs_own_tokens_as_orphans(checked_map):
    """Qwen2.5 student, R1-Distill teacher: the student's <|im_end|> takes the teacher's end of sentence;
    the student's <|endoftext|> (whose teacher id the end of turn took) and its other differing tokens get
    probability 0; R1's <｜User｜> ... </think> are the mass the student cannot place."""
    token_map = checked_map(QWEN25, R1)
    logits = torch.randn(3, 151_936, generator=torch.Generator().manual_seed(2))
    student, blocks = _student_space(logits, token_map, block_rows=2)
    unread = list(range(R1_USER, R1_THINK + 2))
    expected, orphan = moved_columns(
        torch.log_softmax(logits, -1), {IM_END: R1_EOS}, [ENDOFTEXT, IM_START, *range(151646, 151650)], unread
    )
    assert torch.equal(student, expected)
    torch.testing.assert_close(blocks.orphan_mass.double(), orphan, rtol=1e-5, atol=1e-8)
