"""Every configuration TA-OPD refuses, refused before training with a message that names the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from verl_fixtures import CONF_DIR, compose_config

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
