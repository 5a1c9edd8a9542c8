"""The pre-flight special-token check inside a composed run config (`ta_opd_verl.checks.check_model_paths`)
on the paper's DeepSeek-R1-Distill-Qwen -> Qwen2.5 pair: the key read from the `ta_opd` block, the refusal
prefixed with the teacher's key, and the derived map returned once for the driver to print."""

from __future__ import annotations

import pytest
from verl_fixtures import compose_config

from ta_opd_verl.checks import (
    check_model_paths,
    check_ta_opd_config,
    checked_pairs,
    special_token_maps_to_apply,
)
from ta_opd_verl.special_tokens import SpecialTokenMismatchError

TEACHER_KEY = "distillation.teacher_models.teacher_model.model_path"


def _config(folders, *overrides: str):
    return compose_config(
        "ta_opd_cpu",
        [
            f"actor_rollout_ref.model.path={folders['qwen2.5-instruct']}",
            f"{TEACHER_KEY}={folders['deepseek-r1-distill-qwen']}",
            *overrides,
        ],
    )


def test_the_default_auto_map_is_returned_for_printing(real_tokenizer_folders):
    config = _config(real_tokenizer_folders)
    check_ta_opd_config(config)
    notes = check_model_paths(config)
    assert f"{TEACHER_KEY}: special-token map (student -> teacher):" in notes
    assert any("'<|im_end|>' (151645) -> '<｜end▁of▁sentence｜>' (151643)" in note for note in notes)


def test_none_is_refused_naming_the_teacher_key_and_the_map_key(real_tokenizer_folders):
    config = _config(real_tokenizer_folders, "distillation.distillation_loss.ta_opd.special_token_map=none")
    check_ta_opd_config(config)
    with pytest.raises(SpecialTokenMismatchError, match=rf"^{TEACHER_KEY}: the student's end_of_turn/eos "):
        check_model_paths(config)


def test_an_explicit_map_in_the_config_is_accepted(real_tokenizer_folders):
    config = _config(
        real_tokenizer_folders, "distillation.distillation_loss.ta_opd.special_token_map={151645:151643}"
    )
    check_ta_opd_config(config)
    assert any("[explicit]" in note for note in check_model_paths(config))


def test_the_map_the_teachers_apply_is_keyed_by_the_teacher_folder(real_tokenizer_folders):
    """What the trainer hands the teacher: the derived map for the paper pair, nothing for a pair whose
    tokens agree (no map, no cost)."""
    (folder, token_map), *others = special_token_maps_to_apply(
        checked_pairs(_config(real_tokenizer_folders))
    ).items()
    assert others == [] and folder == str(real_tokenizer_folders["deepseek-r1-distill-qwen"])
    assert dict(token_map.student_reads) == {151645: 151643}
    qwen3 = real_tokenizer_folders["qwen3"]
    agreeing = compose_config(
        "ta_opd_cpu", [f"actor_rollout_ref.model.path={qwen3}", f"{TEACHER_KEY}={qwen3}"]
    )
    assert special_token_maps_to_apply(checked_pairs(agreeing)) == {}
