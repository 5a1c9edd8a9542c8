"""Every configuration TA-OPD refuses, refused before training with a message that names the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from verl_fixtures import CONF_DIR, compose_config, teacher_with_swapped_tokens

from ta_opd_verl import verl_plugin
from ta_opd_verl.checks import TAOPDConfigError, check_model_paths, check_ta_opd_config
from ta_opd_verl.launch import cpu_environment

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
        ("distillation.distillation_loss.ta_opd.compatibility=exact", "compatibility=exact"),
        ("distillation.distillation_loss._target_=verl.workers.config.DistillationLossConfig", "_target_"),
    ],
)
def test_rejected_configuration(override, message):
    with pytest.raises((TAOPDConfigError, ValueError), match=message.replace(".", r"\.")):
        check_ta_opd_config(_config(override))


def test_a_plugin_that_failed_to_load_stops_the_run(monkeypatch):
    monkeypatch.setattr(verl_plugin, "LOAD_ERROR", "ImportError: something broke")
    with pytest.raises(RuntimeError, match="failed to load"):
        check_ta_opd_config(_config())


def test_missing_model_folder_is_named():
    with pytest.raises(TAOPDConfigError, match="actor_rollout_ref.model.path='/nonexistent/student'"):
        check_model_paths(_config("actor_rollout_ref.model.path=/nonexistent/student"))


def test_bad_config_stops_main_ppo_before_ray_starts(tmp_path):
    """The Hydra preflight callback runs in the driver before verl's main: no Ray, a clear message."""
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path",
        str(CONF_DIR),
        "--config-name",
        "ta_opd_cpu",
        "actor_rollout_ref.model.path=/",
        "distillation.teacher_models.teacher_model.model_path=/",
        "distillation.distillation_loss.ta_opd.k=64",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=cpu_environment(), cwd=tmp_path, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ta_opd.k (64) must be <=" in output
    assert "Started a local Ray instance" not in output and "TaskRunnerV1" not in output


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


def test_head_size_vllm_cpu_refuses_is_named(pair, tmp_path, monkeypatch):
    import json
    import shutil

    from ta_opd_verl.tiny.vllm_cpu import UnsupportedHeadSizeError

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    student = tmp_path / "student"
    shutil.copytree(pair.student, student)
    config = json.loads((student / "config.json").read_text())
    config.update(num_attention_heads=4, head_dim=16)
    (student / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedHeadSizeError, match="supported: 32, 64"):
        check_model_paths(_paths(student, pair.teacher))


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
