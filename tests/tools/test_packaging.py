"""The GPU quick start from an installed wheel: the README's command composes TA-OPD's config through
``pkg://ta_opd_verl.conf`` in a folder outside the clone, with the package imported from the wheel, and
``ta-opd train`` finds the installed configs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_gpu_command() -> list[str]:
    """The ``python -m verl.trainer.main_ppo`` command of the README's "TA-OPD with verl on GPUs" block."""
    section = REPO.joinpath("README.md").read_text().split("## TA-OPD with verl on GPUs", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    command = block[block.index("python -m verl.trainer.main_ppo") :].replace("\\\n", " ")
    return shlex.split(os.path.expandvars(command))


def _source_copy(folder: Path) -> Path:
    """The project's files as a fresh clone has them (no build/ left in the clone by an earlier build)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """This project built as a wheel (no network: the set-up's setuptools) and installed into a folder."""
    source = _source_copy(tmp_path_factory.mktemp("source"))
    build = tmp_path_factory.mktemp("wheel")
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(build), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = build.glob("ta_opd_verl-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300
    )
    return target


def _outside_the_clone(command: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    # The wheel's folder first on the path: its ta_opd_verl shadows the clone's editable install.
    env = dict(os.environ, PYTHONPATH=str(site), HYDRA_FULL_ERROR="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_readme_gpu_command_composes_from_the_wheel(installed_wheel, tmp_path):
    command = readme_gpu_command()
    assert command[:3] == ["python", "-m", "verl.trainer.main_ppo"] and "pkg://ta_opd_verl.conf" in command
    # --cfg job: Hydra composes and prints the config, then stops before verl's main (no GPU here).
    result = _outside_the_clone([sys.executable, *command[1:], "--cfg", "job"], installed_wheel, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\s+loss_mode: ta_opd$", result.stdout, re.M)
    assert "_target_: ta_opd_verl.config.TAOPDDistillationLossConfig" in result.stdout
    assert re.search(r"^\s+trainer_mode: ta_opd$", result.stdout, re.M)
    assert f"model_path: {os.path.expandvars('$HOME/models/Qwen3-4B')}" in result.stdout


def test_the_wheel_is_what_runs_and_ta_opd_train_finds_its_configs(installed_wheel, tmp_path):
    probe = (
        "import ta_opd_verl, ta_opd_verl.conf; from ta_opd_verl.cli.train import config_dir; "
        "print(ta_opd_verl.__file__); print(config_dir())"
    )
    result = _outside_the_clone([sys.executable, "-c", probe], installed_wheel, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, conf = result.stdout.split()
    assert Path(package_file).is_relative_to(installed_wheel)
    assert Path(conf) == installed_wheel / "ta_opd_verl" / "conf"
    assert (Path(conf) / "ta_opd_trainer.yaml").is_file()
