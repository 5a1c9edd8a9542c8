"""Every configuration TA-OPD refuses, refused before training with a message that names the key: the
general checks, the colocated (fsdp) teacher's and the server teacher's refusals, the model folders and
the shared vocabulary. (The CPU runtime's head-size refusal: tests/tools/test_cpu_preflight.py.)"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from omegaconf import OmegaConf, open_dict
from verl_fixtures import compose_config, refused_main_ppo, teacher_with_swapped_tokens

from ta_opd_verl import plugin_loading
from ta_opd_verl.checks import TAOPDConfigError, check_data_files, check_model_paths, check_ta_opd_config
from ta_opd_verl.vocab import VocabularyMismatchError

TEACHER = "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher"


def _config(*overrides: str):
    return compose_config("ta_opd_cpu", [TEACHER, *overrides])


def test_the_shipped_cpu_config_passes():
    check_ta_opd_config(_config())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distillation.distillation_loss.loss_mode=k1", "loss_mode=ta_opd"),
        ("distillation.enabled=false", "distillation.enabled"),
        ("actor_rollout_ref.actor.strategy=megatron", "actor_rollout_ref.actor.strategy"),
        ("algorithm.rollout_correction.bypass_mode=true", "bypass_mode"),
        ("actor_rollout_ref.model.use_fused_kernels=true", "use_fused_kernels"),
        ("distillation.teacher_models.teacher_model.inference.name=sglang", "inference.name"),
        ("distillation.distillation_loss.ta_opd.k=17", "ta_opd.k"),
        ("distillation.distillation_loss._target_=verl.workers.config.DistillationLossConfig", "_target_"),
    ],
)
def test_rejected_configuration(override, message):
    with pytest.raises((TAOPDConfigError, ValueError), match=message.replace(".", r"\.")):
        check_ta_opd_config(_config(override))


def test_a_plugin_that_failed_to_load_stops_the_run(monkeypatch):
    monkeypatch.setitem(plugin_loading.LOAD_ERRORS, "CPU runtime", "ImportError: something broke")
    with pytest.raises(RuntimeError, match="failed to load"):
        check_ta_opd_config(_config())


def test_missing_model_folder_is_named():
    with pytest.raises(TAOPDConfigError, match="actor_rollout_ref.model.path='/nonexistent/student'"):
        check_model_paths(_config("actor_rollout_ref.model.path=/nonexistent/student"))


def test_bad_config_stops_main_ppo_before_ray_starts(tmp_path):
    """The Hydra preflight callback runs in the driver before verl's main: no Ray, a clear message."""
    overrides = [
        "actor_rollout_ref.model.path=/",
        "distillation.teacher_models.teacher_model.model_path=/",
        "distillation.distillation_loss.ta_opd.k=64",
    ]
    returncode, output = refused_main_ppo("ta_opd_cpu", overrides, tmp_path)
    assert returncode != 0
    assert "ta_opd.k (64) must be <=" in output


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair()


def _paths(student, teacher):
    return _config(
        f"actor_rollout_ref.model.path={student}",
        f"distillation.teacher_models.teacher_model.model_path={teacher}",
    )


def test_tiny_pair_passes_the_model_checks(pair, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    check_model_paths(_paths(pair.student, pair.teacher))


def test_teacher_with_another_vocabulary_is_refused(pair, tmp_path):
    from ta_opd_verl.vocab import VocabularyMismatchError

    teacher = teacher_with_swapped_tokens(pair.teacher, tmp_path / "teacher")
    with pytest.raises(VocabularyMismatchError):
        check_model_paths(_paths(pair.student, teacher))


def test_verls_own_opd_losses_compose_for_the_cpu_baseline():
    from verl.utils.config import omega_conf_to_dataclass

    for overrides in (
        ["distillation.distillation_loss.loss_mode=k1"],
        [
            "distillation.distillation_loss.loss_mode=forward_kl_topk",
            "distillation.distillation_loss.use_policy_gradient=false",
        ],
    ):
        config = compose_config("opd_cpu", [TEACHER, *overrides])
        distillation = omega_conf_to_dataclass(config.distillation)
        assert distillation.distillation_loss.loss_mode == overrides[0].split("=")[1]


# ---- the colocated (fsdp) teacher ---------------------------------------------------------------------


def _fsdp_overrides(teacher_path, *extra: str) -> list[str]:
    return [
        TEACHER,
        "distillation.distillation_loss.ta_opd.teacher=fsdp",
        f"distillation.distillation_loss.ta_opd.teacher_path={teacher_path}",
        "distillation.distillation_loss.topk=16",
        "distillation.distillation_loss.ta_opd.k=8",
        *extra,
    ]


def _fsdp_config(teacher_path, *extra: str):
    return compose_config("ta_opd_cpu", _fsdp_overrides(teacher_path, *extra))


def test_fsdp_teacher_with_exact_compatibility_passes_the_checks(pair):
    config = _fsdp_config(
        pair.teacher,
        "distillation.distillation_loss.ta_opd.compatibility=exact",
        f"actor_rollout_ref.model.path={pair.student}",
    )
    check_ta_opd_config(config)
    check_model_paths(config)


@pytest.mark.parametrize(
    ("overrides", "key", "accepted"),
    [
        (["distillation.distillation_loss.ta_opd.teacher=vllm"], "ta_opd.teacher", "['server', 'fsdp']"),
        (["distillation.distillation_loss.ta_opd.teacher_path=null"], "ta_opd.teacher_path", "teacher=fsdp"),
        (
            ["distillation.distillation_loss.ta_opd.teacher=server"],
            "ta_opd.teacher_path",
            "null with teacher=server",
        ),
        (["distillation.distillation_loss.ta_opd.teacher_dtype=int8"], "ta_opd.teacher_dtype", "bfloat16"),
    ],
    ids=["teacher", "missing-path", "path-with-server", "dtype"],
)
def test_bad_teacher_keys_are_refused_with_the_key(pair, overrides, key, accepted):
    with pytest.raises(TAOPDConfigError) as info:
        check_ta_opd_config(_fsdp_config(pair.teacher, *overrides))
    assert f"distillation.distillation_loss.{key} must be" in str(info.value)
    assert accepted in str(info.value)


def test_teacher_temperature_other_than_one_is_refused(pair):
    config = _fsdp_config(pair.teacher, "distillation.distillation_loss.ta_opd.teacher_temperature=0.7")
    with pytest.raises(TAOPDConfigError, match=r"ta_opd\.teacher_temperature must be 1\.0.*got 0\.7"):
        check_ta_opd_config(config)


def test_exact_compatibility_with_server_teachers_is_still_refused():
    config = compose_config(
        "ta_opd_cpu", [TEACHER, "distillation.distillation_loss.ta_opd.compatibility=exact"]
    )
    with pytest.raises(TAOPDConfigError, match=r"compatibility=exact.*ta_opd\.teacher=fsdp"):
        check_ta_opd_config(config)


def test_full_vocabulary_reverse_kl_with_server_teachers_is_refused_naming_the_key():
    config = _config("distillation.distillation_loss.ta_opd.loss=reverse_kl_full")
    with pytest.raises(TAOPDConfigError) as info:
        check_ta_opd_config(config)
    message = str(info.value)
    assert message.startswith("distillation.distillation_loss.ta_opd.loss=reverse_kl_full needs")
    assert "reverse_kl_topk_tail" in message and "ta_opd.teacher=fsdp" in message


def test_the_new_losses_pass_the_checks_where_their_teacher_gives_them(pair):
    check_ta_opd_config(_config("distillation.distillation_loss.ta_opd.loss=reverse_kl_topk_tail"))
    for loss in ("reverse_kl_topk_tail", "reverse_kl_full"):
        check_ta_opd_config(_fsdp_config(pair.teacher, f"distillation.distillation_loss.ta_opd.loss={loss}"))


def test_several_server_teachers_are_refused_with_the_fsdp_teacher(pair):
    config = _fsdp_config(pair.teacher)
    second = OmegaConf.to_container(config.distillation.teacher_models.teacher_model)
    with open_dict(config):
        config.distillation.teacher_models["math_teacher"] = second
    with pytest.raises(TAOPDConfigError, match=r"2 teachers \(teacher_model, math_teacher\).*teacher=server"):
        check_ta_opd_config(config)


def test_sequence_parallel_actor_is_refused_with_the_fsdp_teacher(pair):
    config = _fsdp_config(pair.teacher, "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2")
    with pytest.raises(TAOPDConfigError, match=r"actor_rollout_ref\.actor\.ulysses_sequence_parallel_size=2"):
        check_ta_opd_config(config)


def test_fsdp_teacher_with_another_vocabulary_is_refused_naming_its_key(pair, tmp_path):
    from ta_opd_verl.vocab import VocabularyMismatchError

    teacher = teacher_with_swapped_tokens(pair.teacher, tmp_path / "teacher")
    config = _fsdp_config(teacher, f"actor_rollout_ref.model.path={pair.student}")
    with pytest.raises(
        VocabularyMismatchError, match=r"^distillation\.distillation_loss\.ta_opd\.teacher_path: "
    ):
        check_model_paths(config)


def test_missing_fsdp_teacher_folder_is_named(pair):
    config = _fsdp_config("/nonexistent/fsdp-teacher", f"actor_rollout_ref.model.path={pair.student}")
    with pytest.raises(TAOPDConfigError, match=r"ta_opd\.teacher_path='/nonexistent/fsdp-teacher'"):
        check_model_paths(config)


# ---- inputs beyond the ta_opd block: trainer, rollouts, dump folder, data files, weights -----------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.v1.trainer_mode=sync", r"trainer\.v1\.trainer_mode='sync': .*accepted: ta_opd"),
        ("actor_rollout_ref.rollout.n=0", r"actor_rollout_ref\.rollout\.n=0: samples per prompt"),
    ],
    ids=["trainer-mode", "no-rollouts"],
)
def test_a_trainer_or_rollout_count_ta_opd_cannot_run_is_refused(override, message):
    with pytest.raises(TAOPDConfigError, match=message):
        check_ta_opd_config(_config(override))


def test_a_selection_dump_folder_that_cannot_be_written_is_refused(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    override = f"distillation.distillation_loss.ta_opd.selection_dump_dir={blocked / 'dump'}"
    with pytest.raises(TAOPDConfigError, match=r"ta_opd\.selection_dump_dir=.*cannot be written"):
        check_ta_opd_config(_config(override))


def _data_config(pair, train, *extra):
    return _config(
        f"actor_rollout_ref.model.path={pair.student}",
        f"data.train_files={train}",
        f"data.val_files={pair.val_parquet}",
        *extra,
    )


def test_the_tiny_pairs_data_passes_without_notes(pair):
    assert check_data_files(_data_config(pair, pair.train_parquet)) == []


@pytest.mark.parametrize("problem", ["missing", "not-parquet", "no-prompt-column", "no-rows"])
def test_an_unusable_data_file_is_refused_naming_its_key_and_file(pair, tmp_path, problem):
    path = tmp_path / "train.parquet"
    frame = pd.read_parquet(pair.train_parquet)
    expected = {
        "missing": r"does not exist",
        "not-parquet": r"is not a readable parquet file",
        "no-prompt-column": r"has no column 'prompt' \(data\.prompt_key\)",
        "no-rows": r"has no rows",
    }[problem]
    if problem == "not-parquet":
        path.write_text("a,b\n1,2\n")
    elif problem == "no-prompt-column":
        frame.drop(columns="prompt").to_parquet(path)
    elif problem == "no-rows":
        frame.head(0).to_parquet(path)
    with pytest.raises(TAOPDConfigError, match=rf"^data\.train_files: .*{expected}"):
        check_data_files(_data_config(pair, path))


def test_prompts_longer_than_the_limit_are_counted_or_refused(pair, tmp_path):
    path = tmp_path / "train.parquet"
    frame = pd.read_parquet(pair.train_parquet).head(4)
    frame.at[0, "prompt"] = [{"role": "user", "content": "seven plus eight " * 20}]
    frame.to_parquet(path)
    (note,) = check_data_files(_data_config(pair, path))
    assert note.startswith("data.train_files: 1 of 4 prompts of ") and "max_prompt_length=32" in note
    with pytest.raises(
        TAOPDConfigError, match=r"every prompt of .* \(4\) is longer than data\.max_prompt_length=3 "
    ):
        check_data_files(_data_config(pair, path, "data.max_prompt_length=3"))


def test_a_config_vocab_size_the_weights_do_not_have_is_refused(pair, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(pair.teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] += 64
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(VocabularyMismatchError, match=r"config\.json says vocab_size=495 but the weights'"):
        check_model_paths(_paths(pair.student, teacher))
