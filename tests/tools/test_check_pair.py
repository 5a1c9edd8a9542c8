"""`ta-opd check-pair` on the real tokenizer folders (built once per session: ``real_tokenizer_folders``
in tests/conftest.py): the map it would use and exit 0, the refusal and exit 2, bad arguments."""

from __future__ import annotations

import re

import pytest

from ta_opd_verl.cli.main import main

R1, QWEN25, QWEN3 = "deepseek-r1-distill-qwen", "qwen2.5-instruct", "qwen3"


def _check_pair(folders, student, teacher, *extra: str) -> int:
    return main(
        ["check-pair", "--teacher", str(folders[teacher]), "--student", str(folders[student]), *extra]
    )


def test_paper_pair_prints_the_auto_map(real_tokenizer_folders, capsys):
    assert _check_pair(real_tokenizer_folders, QWEN25, R1) == 0
    out = capsys.readouterr().out
    assert (
        f"student {real_tokenizer_folders[QWEN25]} and teacher {real_tokenizer_folders[R1]}: accepted" in out
    )
    assert "'<|im_end|>' (151645) -> '<｜end▁of▁sentence｜>' (151643) [end_of_turn]" in out
    assert "applied by both teachers" in out and "the prompt is the student's own" in out


def test_paper_pair_without_a_map_is_refused(real_tokenizer_folders, capsys):
    assert _check_pair(real_tokenizer_folders, QWEN25, R1, "--special-token-map", "none") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ta-opd check-pair: refused: the student's end_of_turn/eos '<|im_end|>'")
    assert "distillation.distillation_loss.ta_opd.special_token_map=auto" in captured.err


def test_an_explicit_map_is_read_as_json(real_tokenizer_folders, capsys):
    assert _check_pair(real_tokenizer_folders, QWEN25, R1, "--special-token-map", '{"151645": 151643}') == 0
    out = capsys.readouterr().out
    assert "(151645) -> '<｜end▁of▁sentence｜>' (151643) [explicit]" in out
    assert "[pad]" not in out


def test_qwen3_pair_needs_no_map(real_tokenizer_folders, capsys):
    assert _check_pair(real_tokenizer_folders, QWEN3, QWEN3, "--special-token-map", "none") == 0
    assert "no special-token map needed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--special-token-map", "sometimes"], r"'sometimes': one of \['auto', 'none'\] or a JSON object"),
        (["--special-token-map", '{"151645": "eos"}'], r"or a JSON object of token ids"),
    ],
)
def test_a_bad_map_is_refused_by_the_parser(real_tokenizer_folders, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        _check_pair(real_tokenizer_folders, QWEN25, R1, *extra)
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_folder_without_config_is_refused_by_the_parser(real_tokenizer_folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["check-pair", "--teacher", str(tmp_path), "--student", str(real_tokenizer_folders[QWEN3])])
    assert info.value.code == 2
    assert (
        f"'{tmp_path}' is not a model folder: a folder with config.json is accepted"
        in capsys.readouterr().err
    )
