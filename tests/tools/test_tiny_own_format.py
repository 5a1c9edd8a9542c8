"""The tiny teacher trained on its own chat format (`ta_opd_verl.tiny.own_format`, `ta-opd build-tiny
--teacher-own-format`) on shortened builds (seconds): its folder, manifest and cache, that it starts from the
pair's teacher's initial weights, the pair check on it, and the generation it is evaluated with (prompts in
a given format, responses ended by either EOS)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ta_opd_verl.tiny.build import MANIFEST_NAME, TinyBuildError
from ta_opd_verl.tiny.evaluate import generate_responses
from ta_opd_verl.tiny.own_format import FOLDER_NAME, build_teacher_own_format
from ta_opd_verl.tiny.tokenizer import CHATML, R1_STYLE, with_chat_format
from ta_opd_verl.vocab import check_pair

# The pair's shortened build of tests/tools/test_tiny_pair.py, with no teacher training: the teacher in its
# own format must then hold the pair's teacher's initial weights exactly.
UNTRAINED = dict(
    teacher_steps=0, student_steps=2, eval_problems=8, train_rows=8, val_rows=8, teacher_eval_every=0
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_teacher_own_format(tmp_path_factory.mktemp("own-format") / "pair", quiet=True, **UNTRAINED)


def test_folder_next_to_the_pair_loads_with_its_own_format(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert built.root == built.pair.root / FOLDER_NAME
    tokenizer = AutoTokenizer.from_pretrained(built.root)
    assert tokenizer.eos_token == R1_STYLE.eos_token and tokenizer.eos_token_id == 0
    messages = [{"role": "user", "content": "say 12"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == R1_STYLE.render("say 12")
    model = AutoModelForCausalLM.from_pretrained(built.root)
    assert model.config.eos_token_id == 0 and model.generation_config.eos_token_id == 0
    assert model.config.vocab_size == len(tokenizer) == built.manifest["vocab_size"]


def test_starts_from_the_pair_teachers_initial_weights(built):
    from safetensors.torch import load_file

    own = load_file(built.root / "model.safetensors")
    pair_teacher = load_file(built.pair.teacher / "model.safetensors")
    assert own.keys() == pair_teacher.keys()
    assert all(torch.equal(own[name], pair_teacher[name]) for name in own)


def test_manifest_holds_both_accuracies_and_the_pair_teachers(built):
    manifest = json.loads((built.root / MANIFEST_NAME).read_text())
    assert manifest == built.manifest
    assert manifest["eval_problems"] == UNTRAINED["eval_problems"]
    assert {name: result["n"] for name, result in manifest["eval"].items()} == {
        "own_format": UNTRAINED["eval_problems"],
        "student_format": UNTRAINED["eval_problems"],
    }
    assert manifest["pair_teacher_eval"] == built.pair.manifest["teacher"]["eval"]
    assert manifest["special_tokens"] == list(R1_STYLE.special_tokens)


def test_second_call_is_a_cache_hit_and_force_rebuilds_the_teacher_only(built):
    weights, pair_manifest = built.root / "model.safetensors", built.pair.root / MANIFEST_NAME
    before = (weights.stat().st_mtime_ns, pair_manifest.stat().st_mtime_ns)
    again = build_teacher_own_format(built.pair.root, quiet=True, **UNTRAINED)
    assert again.manifest == built.manifest
    assert (weights.stat().st_mtime_ns, pair_manifest.stat().st_mtime_ns) == before
    forced = build_teacher_own_format(built.pair.root, force=True, quiet=True, **UNTRAINED)
    assert weights.stat().st_mtime_ns != before[0] and pair_manifest.stat().st_mtime_ns == before[1]
    assert forced.manifest["settings_hash"] == built.manifest["settings_hash"]


def test_pair_check_derives_the_eos_map(built):
    pair = check_pair(built.pair.student, built.root, "auto")
    assert pair.token_map.entries[2] == (0, "end_of_turn")


def test_cli_quiet_prints_the_teachers_folder(built):
    command = [sys.executable, "-m", "ta_opd_verl.cli.main", "build-tiny", "--teacher-own-format", "--quiet"]
    command += ["--out", str(built.pair.root)]
    command += [
        f"--{name.replace('_', '-')}={value}"
        for name, value in UNTRAINED.items()
        if name != "teacher_eval_every"
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{built.root}\n"


def test_a_foreign_folder_in_its_place_is_refused(tmp_path):
    pair = build_teacher_own_format(tmp_path / "pair", quiet=True, **UNTRAINED).pair
    foreign = pair.root / FOLDER_NAME
    (foreign / MANIFEST_NAME).write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(
        TinyBuildError, match=f"{foreign} holds a manifest.json that is not a ta_opd_tiny_teacher"
    ):
        build_teacher_own_format(pair.root, quiet=True, **UNTRAINED)


class _Scripted:
    """A causal LM stand-in whose `generate` appends ``continuation`` to every prompt and records its call."""

    training = False

    def __init__(self, continuation: list[int]):
        self.continuation, self.calls = continuation, []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        return torch.cat([input_ids, torch.tensor([self.continuation] * len(input_ids))], dim=1)


@pytest.fixture(scope="module")
def student_tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built.pair.student)


def test_the_students_format_with_either_eos_ending_a_response(student_tokenizer):
    """The teacher in the student's format: ChatML prompt ids as they are, its own EOS (0, also the pad)
    or the student's (2) ends a response and is kept."""
    word = student_tokenizer.encode("sure", add_special_tokens=False)[0]
    for end in (0, 2):
        model = _Scripted([word, word, end, 0, 0])
        assert generate_responses(model, student_tokenizer, ["say 12"], stop_ids=(2, 0)) == [
            [word, word, end]
        ]
        prompt = model.calls[0]["input_ids"][0].tolist()
        assert prompt == student_tokenizer.encode(CHATML.render("say 12"), add_special_tokens=False)
        assert model.calls[0]["eos_token_id"] == [2, 0]
    # The default stops at the tokenizer's EOS only: 0 is then padding, dropped.
    assert generate_responses(_Scripted([word, 0, 2]), student_tokenizer, ["say 12"]) == [[word]]


def test_its_own_format_keeps_the_eos_that_is_also_the_pad(student_tokenizer):
    teacher_tokenizer = with_chat_format(student_tokenizer, R1_STYLE)
    word = teacher_tokenizer.encode("sure", add_special_tokens=False)[0]
    model = _Scripted([word, 0, 0])
    assert generate_responses(model, teacher_tokenizer, ["say 12"], chat_format=R1_STYLE) == [[word, 0]]
    prompt = model.calls[0]["input_ids"][0].tolist()
    assert prompt == teacher_tokenizer.encode(R1_STYLE.render("say 12"), add_special_tokens=False)
    assert prompt[0] == 1 and prompt[-1] == 2
