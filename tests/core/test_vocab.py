"""`check_same_vocabulary` on tokenizers built here: identical, Qwen-like (same BPE, different added
tokens and embedding padding), and unrelated or tampered ones (fast, no models)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from ta_opd_verl.tiny.tasks import generate_problems
from ta_opd_verl.tiny.tokenizer import train_tokenizer
from ta_opd_verl.vocab import VocabularyMismatchError, check_same_vocabulary, load_vocabulary


@pytest.fixture(scope="module")
def base_tokenizer_json() -> dict:
    """A byte-level BPE with no added tokens, as tokenizer.json content."""
    problems = generate_problems(200, seed=0)
    fast = train_tokenizer([p.prompt for p in problems] + [p.response for p in problems])
    data = json.loads(fast.backend_tokenizer.to_str())
    data["added_tokens"] = []
    # train_tokenizer puts its three special tokens at ids 0-2 of the model vocabulary; drop them so the
    # base is a pure BPE (ids shifted down) and each test adds its own special tokens after it.
    vocab = {tok: i for tok, i in data["model"]["vocab"].items() if not tok.startswith("<|")}
    data["model"]["vocab"] = {tok: rank for rank, tok in enumerate(sorted(vocab, key=vocab.get))}
    return data


def _write_model(folder, tokenizer_json: dict, specials: list[str], vocab_size: int | None = None) -> int:
    """A model folder with tokenizer.json (the base plus ``specials`` as added tokens) and a config.json
    whose vocab_size is ``vocab_size`` (default: the tokenizer's size). Returns the tokenizer's size."""
    folder.mkdir()
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(folder / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": vocab_size or size}))
    return size


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
R1_SPECIALS = [
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>",
    "<think>",
    "</think>",
]


def test_identical_folders_share_vocabulary(tmp_path, base_tokenizer_json):
    size = _write_model(tmp_path / "s", base_tokenizer_json, QWEN_SPECIALS)
    _write_model(tmp_path / "t", base_tokenizer_json, QWEN_SPECIALS)
    report = check_same_vocabulary(tmp_path / "s", tmp_path / "t")
    assert report.common_size == size
    assert report.special_differences == ()


def test_qwen_like_pair_is_accepted(tmp_path, base_tokenizer_json):
    """Like R1-Distill-Qwen-14B -> Qwen2.5-3B: one BPE, different added tokens after it, and embeddings
    padded to different sizes (152,064 vs 151,936 rows there)."""
    base = len(base_tokenizer_json["model"]["vocab"])
    student_size = _write_model(
        tmp_path / "student", base_tokenizer_json, QWEN_SPECIALS, vocab_size=base + 64
    )
    teacher_size = _write_model(tmp_path / "teacher", base_tokenizer_json, R1_SPECIALS, vocab_size=base + 128)
    report = check_same_vocabulary(tmp_path / "student", tmp_path / "teacher")
    assert report.common_size == base + 64
    assert report.student.embedding_rows == base + 64 and report.teacher.embedding_rows == base + 128
    assert report.student.size == student_size and report.teacher.size == teacher_size
    assert [d[0] for d in report.special_differences] == list(range(base, base + len(R1_SPECIALS)))
    assert report.special_differences[2] == (base + 2, "<|im_end|>", "<｜Assistant｜>")
    assert report.special_differences[-1] == (base + 5, None, "</think>")
    assert report.teacher_only_ids == 0
    # The other direction too (a bigger student than teacher embedding is fine while its tokens fit).
    assert check_same_vocabulary(tmp_path / "teacher", tmp_path / "student").common_size == base + 64


def test_tampered_copy_is_refused_naming_paths_and_first_difference(tmp_path, base_tokenizer_json):
    _write_model(tmp_path / "student", base_tokenizer_json, QWEN_SPECIALS)
    tampered = json.loads(json.dumps(base_tokenizer_json))
    vocab = tampered["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    first, second = by_id[100], by_id[150]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    _write_model(tmp_path / "teacher", tampered, QWEN_SPECIALS)
    with pytest.raises(VocabularyMismatchError) as info:
        check_same_vocabulary(tmp_path / "student", tmp_path / "teacher")
    message = str(info.value)
    assert str(tmp_path / "student") in message and str(tmp_path / "teacher") in message
    assert "id 100 " in message and repr(first) in message and repr(second) in message
    assert "2 of" in message


def test_unrelated_tokenizers_are_refused(tmp_path, base_tokenizer_json):
    _write_model(tmp_path / "student", base_tokenizer_json, QWEN_SPECIALS)
    words = [f"w{i}" for i in range(300)]
    random.Random(0).shuffle(words)
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_json = json.loads(other.to_str())
    _write_model(tmp_path / "teacher", other_json, [])
    (tmp_path / "teacher" / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    with pytest.raises(
        VocabularyMismatchError, match=r"id 0 is regular token .* in the student but regular token"
    ):
        check_same_vocabulary(tmp_path / "student", tmp_path / "teacher")


def test_regular_token_facing_added_token_is_refused(tmp_path, base_tokenizer_json):
    """Special tokens may differ only against special tokens (or padding rows), never against text."""
    truncated = json.loads(json.dumps(base_tokenizer_json))
    vocab = truncated["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    del vocab[last]
    truncated["model"]["merges"] = truncated["model"]["merges"][:-1]  # the merge that made `last`
    _write_model(tmp_path / "student", base_tokenizer_json, QWEN_SPECIALS)
    _write_model(
        tmp_path / "teacher", truncated, QWEN_SPECIALS, vocab_size=len(vocab) + 1 + len(QWEN_SPECIALS)
    )
    with pytest.raises(
        VocabularyMismatchError, match=r"regular token .* in the student but added token '<\|endoftext\|>'"
    ):
        check_same_vocabulary(tmp_path / "student", tmp_path / "teacher")


def test_student_token_outside_teacher_embedding_is_refused(tmp_path, base_tokenizer_json):
    base = len(base_tokenizer_json["model"]["vocab"])
    _write_model(tmp_path / "student", base_tokenizer_json, QWEN_SPECIALS)
    _write_model(tmp_path / "teacher", base_tokenizer_json, QWEN_SPECIALS[:2], vocab_size=base + 2)
    with pytest.raises(
        VocabularyMismatchError, match=rf"student token id {base + 2} .*outside the teacher's embedding"
    ):
        check_same_vocabulary(tmp_path / "student", tmp_path / "teacher")


def test_load_vocabulary_reads_added_ids_and_rows(tmp_path, base_tokenizer_json):
    base = len(base_tokenizer_json["model"]["vocab"])
    _write_model(tmp_path / "m", base_tokenizer_json, QWEN_SPECIALS, vocab_size=base + 11)
    vocab = load_vocabulary(tmp_path / "m")
    assert vocab.embedding_rows == base + 11
    assert vocab.added_ids == frozenset(range(base, base + len(QWEN_SPECIALS)))
    with pytest.raises(VocabularyMismatchError, match="not a model folder"):
        load_vocabulary(tmp_path / "missing")
