"""The tiny tokenizer's chat formats (`ta_opd_verl.tiny.tokenizer`) and the pair check on them: the R1-style
teacher tokenizer holds the student's vocabulary but for its three special tokens, each tokenizer's chat
template renders what its `ChatFormat` renders, and `ta_opd_verl.vocab.check_pair` maps the student's EOS to
the teacher's with ``auto`` and refuses ``none`` (fast: a tokenizer trained on a small corpus, no models)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ta_opd_verl.special_tokens import SpecialTokenMismatchError
from ta_opd_verl.tiny.tasks import generate_problems
from ta_opd_verl.tiny.tokenizer import CHATML, R1_STYLE, train_tokenizer, with_chat_format
from ta_opd_verl.vocab import check_pair

STUDENT_EOS, TEACHER_EOS = 2, 0


@pytest.fixture(scope="module")
def tokenizers():
    """(student, teacher): the pair's tokenizer (ChatML) and the same in `R1_STYLE`."""
    problems = generate_problems(200, seed=0)
    student = train_tokenizer([p.prompt for p in problems] + [p.response for p in problems])
    return student, with_chat_format(student, R1_STYLE)


@pytest.fixture(scope="module")
def folders(tokenizers, tmp_path_factory):
    """Model folders (tokenizer files and a config.json) of the student and the teacher."""
    root = tmp_path_factory.mktemp("tiny-chat-formats")
    for name, tokenizer in zip(("student", "teacher"), tokenizers, strict=True):
        tokenizer.save_pretrained(root / name)
        config = {"model_type": "qwen3", "vocab_size": len(tokenizer)}
        (root / name / "config.json").write_text(json.dumps(config))
    return root / "student", root / "teacher"


def test_teacher_tokenizer_is_the_student_vocabulary_but_for_the_special_tokens(tokenizers):
    student, teacher = tokenizers
    student_ids = {i: token for token, i in student.get_vocab().items()}
    teacher_ids = {i: token for token, i in teacher.get_vocab().items()}
    assert len(teacher) == len(student) and teacher_ids.keys() == student_ids.keys()
    assert [i for i in sorted(student_ids) if student_ids[i] != teacher_ids[i]] == [0, 1, 2]
    assert [teacher_ids[i] for i in range(3)] == list(R1_STYLE.special_tokens)
    assert {i: t.content for i, t in teacher.added_tokens_decoder.items()} == dict(
        enumerate(R1_STYLE.special_tokens)
    )
    assert (teacher.eos_token_id, teacher.pad_token_id) == (TEACHER_EOS, TEACHER_EOS)
    assert (student.eos_token_id, student.pad_token_id) == (STUDENT_EOS, 0)
    # The same BPE: any text without special tokens is the same ids; renaming back gives the student's.
    student_model = json.loads(student.backend_tokenizer.to_str())["model"]
    teacher_model = json.loads(teacher.backend_tokenizer.to_str())["model"]
    assert teacher_model["merges"] == student_model["merges"]
    for problem in generate_problems(20, seed=1):
        text = f"{problem.prompt}\n{problem.response}"
        assert teacher.encode(text) == student.encode(text)
    back = with_chat_format(teacher, CHATML)
    assert back.backend_tokenizer.to_str() == student.backend_tokenizer.to_str()


def test_with_chat_format_refuses_a_tokenizer_without_the_three_special_tokens(tokenizers):
    data = json.loads(tokenizers[0].backend_tokenizer.to_str())
    data["added_tokens"] = data["added_tokens"][:2]

    stub = SimpleNamespace(backend_tokenizer=SimpleNamespace(to_str=lambda: json.dumps(data)))
    with pytest.raises(ValueError, match=r"added tokens are at ids \[0, 1\], not at 0, 1, 2"):
        with_chat_format(stub, R1_STYLE)


@pytest.mark.parametrize(("side", "chat_format"), [(0, CHATML), (1, R1_STYLE)])
def test_chat_template_renders_the_format(tokenizers, side, chat_format):
    tokenizer = tokenizers[side]
    for problem in generate_problems(20, seed=2):
        prompt = [{"role": "user", "content": problem.prompt}]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert text == chat_format.render(problem.prompt)
        turn = [*prompt, {"role": "assistant", "content": problem.response}]
        full = tokenizer.apply_chat_template(turn, tokenize=False)
        # The training text ends at EOS; ChatML's template adds a newline after it.
        assert full.startswith(chat_format.render(problem.prompt, problem.response))
        assert full.removeprefix(chat_format.render(problem.prompt, problem.response)).strip() == ""
    ids = tokenizer.encode(chat_format.render("say 12", "sure result one two"), add_special_tokens=False)
    assert ids[-1] == tokenizer.eos_token_id


def test_r1_style_has_no_role_words_and_ends_turns_with_its_own_eos(tokenizers):
    _, teacher = tokenizers
    text = R1_STYLE.render("say 12", "sure result one two")
    assert text == "<｜User｜>say 12<｜Assistant｜>sure result one two<｜end▁of▁sentence｜>"
    ids = teacher.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and 2 in ids and ids[-1] == TEACHER_EOS


def test_auto_map_takes_the_student_eos_to_the_teacher_eos(folders):
    student, teacher = folders
    pair = check_pair(student, teacher, "auto")
    assert [token_id for token_id, _, _ in pair.vocabulary.special_differences] == [0, 1, 2]
    assert dict(pair.student.roles) == {"end_of_turn": STUDENT_EOS, "eos": STUDENT_EOS, "pad": 0}
    assert dict(pair.teacher.roles) == {"end_of_turn": TEACHER_EOS, "eos": TEACHER_EOS, "pad": TEACHER_EOS}
    assert dict(pair.token_map.entries) == {
        STUDENT_EOS: (TEACHER_EOS, "end_of_turn"),
        0: (TEACHER_EOS, "pad"),
    }
    # Back, the teacher's EOS is the student's end of turn; its user and assistant tokens have no counterpart.
    assert pair.token_map.to_student[TEACHER_EOS] == STUDENT_EOS
    assert pair.token_map.teacher_orphans == {1, 2}
    assert "'<|im_end|>' (2) -> '<｜end▁of▁sentence｜>' (0) [end_of_turn]" in "\n".join(pair.summary())


def test_no_map_is_refused_naming_both_tokens(folders):
    student, teacher = folders
    with pytest.raises(SpecialTokenMismatchError) as refusal:
        check_pair(student, teacher, "none")
    message = str(refusal.value)
    assert "the student's end_of_turn/eos '<|im_end|>' (id 2) is '<｜Assistant｜>' to the teacher" in message
    assert "the teacher's end_of_turn is '<｜end▁of▁sentence｜>' (id 0)" in message
    assert "special_token_map=auto, or map it explicitly: {2: 0}" in message
