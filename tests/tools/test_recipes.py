"""Every recipe under recipes/ checked without a GPU: its printed trainer arguments are composed with Hydra
against our conf/ and built into verl's config classes the way verl builds them (``validate_config`` as
``main_ppo`` does before Ray starts; ``omega_conf_to_dataclass`` on the actor, rollout and distillation
nodes as its workers do), plus TA-OPD's own config checks. A key verl renamed, or a value a
``__post_init__`` rejects, fails here. Model folders are not needed: the checks that read them (the
pre-flight model-path and vocabulary check) run only when a real run starts."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from ta_opd_verl.checks import check_ta_opd_config
from ta_opd_verl.config import SELECTORS

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
PAIR_RECIPES = sorted(
    path
    for path in RECIPES.glob("*.sh")
    if path.name not in ("common.sh", "checks.sh", "sweep.sh") and "single-gpu" not in path.name
)
SINGLE_GPU_RECIPE = RECIPES / "single-gpu-qwen3-4b-to-qwen3-1.7b.sh"
SHELL_SCRIPTS = sorted(
    [*RECIPES.glob("*.sh"), *RECIPES.glob("multinode/*.sh"), RECIPES / "multinode" / "slurm.sbatch"]
)


# verl's need_critic warns that GRPO runs without a critic: TA-OPD never uses one.
pytestmark = pytest.mark.filterwarnings("ignore:Disabled critic")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_script_parses_and_passes_shellcheck_when_installed(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout


def run_recipe(recipe: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """``bash recipe extra...`` with ``env`` added to this process's environment (PYTHON: this interpreter,
    unless ``env`` names one). The interpreter check's answer is handed over as a sweep hands it to its
    recipes (recipes/checks.sh), so each call skips the seconds of importing verl; the check itself is
    tested by `test_without_python_set_the_recipe_finds_the_clones_venv_or_says_how_to_set_it`."""
    python = env.get("PYTHON", sys.executable)
    checked = {"TA_OPD_SELECTOR_CHOICES": " ".join(SELECTORS), "TA_OPD_SELECTORS_FROM": python}
    return subprocess.run(
        ["bash", str(recipe), *extra],
        env={**os.environ, "PYTHON": python, **checked, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def print_arguments(recipe: Path, *extra: str, **env: str) -> list[str]:
    """The command the recipe prints in recipes/common.sh's print mode, one shell line split by shlex
    (as a tool reading it would), checked to start with the interpreter and ``-m verl.trainer.main_ppo``;
    returns the words after that."""
    result = run_recipe(recipe, *extra, **env, TA_OPD_PRINT_OVERRIDES="1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout
    command = shlex.split(result.stdout)
    assert command[:3] == [env.get("PYTHON", sys.executable), "-m", "verl.trainer.main_ppo"], command[:3]
    return command[3:]


def compose_arguments(arguments: list[str]):
    """Compose ``--config-path P --config-name N <overrides>`` (main_ppo's arguments) like main_ppo."""
    assert arguments[0] == "--config-path" and arguments[2] == "--config-name", arguments[:4]
    config_path, config_name, overrides = arguments[1], arguments[3], arguments[4:]
    with initialize_config_dir(config_dir=config_path, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def build_like_verl(config) -> dict:
    """What verl does with the config before and while starting its workers, file checks excepted."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    built = {
        "actor": omega_conf_to_dataclass(config.actor_rollout_ref.actor),
        "rollout": omega_conf_to_dataclass(config.actor_rollout_ref.rollout),
        "distillation": omega_conf_to_dataclass(config.distillation),
    }
    check_ta_opd_config(config)
    # verl's engine worker asserts this when it builds the rollout (workers/engine_workers.py).
    trainer_gpus = config.trainer.n_gpus_per_node * config.trainer.nnodes
    assert trainer_gpus % built["rollout"].tensor_model_parallel_size == 0
    return built


@pytest.mark.parametrize("recipe", PAIR_RECIPES, ids=lambda path: path.stem)
def test_recipe_builds_into_verls_config_classes(recipe):
    config = compose_arguments(print_arguments(recipe))
    built = build_like_verl(config)
    loss = built["distillation"].distillation_loss
    # The paper's settings (arXiv 2605.26844), as the recipes promise.
    assert (loss.ta_opd.k, loss.ta_opd.ratio, loss.ta_opd.selector) == (16, 0.10, "teachability")
    assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.use_policy_gradient) == (0.2, 0.28, True)
    assert built["actor"].optim.lr == 1e-6 and built["rollout"].temperature == 1.0
    assert config.data.train_files.endswith("dapo-math/train.parquet")
    teacher = built["distillation"].teacher_models["default"]
    assert teacher.world_size == config.distillation.n_gpus_per_node * config.distillation.nnodes


def test_recipe_names_its_pair_and_trailing_overrides_win():
    recipe = RECIPES / "r1-distill-qwen-14b-to-qwen2.5-3b.sh"
    config = compose_arguments(
        print_arguments(recipe, "trainer.total_training_steps=7", MODEL_DIR="/models", RATIO="5e-2")
    )
    assert config.actor_rollout_ref.model.path == "/models/Qwen2.5-3B"
    assert (
        config.distillation.teacher_models.teacher_model.model_path == "/models/DeepSeek-R1-Distill-Qwen-14B"
    )
    assert config.trainer.total_training_steps == 7
    # The recipe accepts a ratio as Hydra reads numbers: 5e-2 arrives as 0.05, not as a string.
    assert config.distillation.distillation_loss.ta_opd.ratio == 0.05
    # The R1 teacher reads its own chat template (and the special-token map, auto by default).
    assert config.distillation.distillation_loss.ta_opd.teacher_prompt == "teacher_template"
    assert config.distillation.distillation_loss.ta_opd.special_token_map == "auto"
    student_prompt = compose_arguments(print_arguments(recipe, TEACHER_PROMPT="student"))
    assert student_prompt.distillation.distillation_loss.ta_opd.teacher_prompt == "student"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"K": "64"}, r"ta_opd\.k \(64\) must be <="),
        ({"TEACHER_TP": "3"}, "must divide the distillation resource pool"),
    ],
)
def test_a_value_verl_or_ta_opd_rejects_fails_the_check(env, message):
    arguments = print_arguments(PAIR_RECIPES[0], **env)
    with pytest.raises(Exception, match=message):
        build_like_verl(compose_arguments(arguments))


@pytest.fixture
def recording_python(tmp_path) -> tuple[Path, Path]:
    """(interpreter, argv file): a PYTHON for the recipes that runs their ``-c`` check with this Python and
    otherwise, instead of starting verl, writes the arguments it was given to the file (NUL-separated)."""
    python, argv_file = tmp_path / "python", tmp_path / "argv"
    python.write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
        f'printf "%s\\0" "$@" > {shlex.quote(str(argv_file))}\n'
    )
    python.chmod(0o755)
    return python, argv_file


def recorded_argv(argv_file: Path) -> list[str]:
    """The arguments `recording_python` recorded, the file removed for the next call."""
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    argv_file.unlink()
    return argv


def test_the_printed_command_is_the_command_the_recipe_runs(recording_python):
    """Print mode's line, split by shlex and run through `eval`, is the argv the recipe executes, awkward
    words (quotes, spaces, `$`) included."""
    python, argv_file = recording_python
    awkward = ['trainer.experiment_name=it\'s a "test" of $HOME', "data.seed=[1, 2]"]
    env = {"PYTHON": str(python), "MODEL_DIR": "/models/with space"}
    ran = run_recipe(PAIR_RECIPES[0], *awkward, **env)
    assert ran.returncode == 0, ran.stderr
    executed = recorded_argv(argv_file)
    assert executed[-2:] == awkward and "actor_rollout_ref.model.path=/models/with space/Qwen3-4B" in executed
    printed = run_recipe(PAIR_RECIPES[0], *awkward, **env, TA_OPD_PRINT_OVERRIDES="1").stdout
    assert shlex.split(printed) == [str(python), *executed]
    subprocess.run(["bash", "-c", 'eval "$1"', "eval", printed], check=True, timeout=60)
    assert recorded_argv(argv_file) == executed


@pytest.mark.parametrize("venv", [True, False], ids=["clone-venv", "no-venv"])
def test_without_python_set_the_recipe_finds_the_clones_venv_or_says_how_to_set_it(tmp_path, venv):
    """A copy of recipes/ beside a .venv whose python is this interpreter, or beside none, with a `python3`
    first on PATH that cannot import verl (site-packages off)."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    venv_python = tmp_path / ".venv" / "bin" / "python"
    path_python = tmp_path / "bin" / "python3"
    for script, flags in ((venv_python, ""), (path_python, " -I -S")):
        script.parent.mkdir(parents=True)
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{flags} "$@"\n')
        script.chmod(0o755)
    if not venv:
        shutil.rmtree(tmp_path / ".venv")
    environment = {name: value for name, value in os.environ.items() if name != "PYTHON"}
    recipe = tmp_path / "recipes" / PAIR_RECIPES[0].name
    result = subprocess.run(
        ["bash", str(recipe)],
        env={
            **environment,
            "PATH": f"{path_python.parent}:{os.environ['PATH']}",
            "TA_OPD_PRINT_OVERRIDES": "1",
            "CONF": str(REPO / "conf"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    if venv:
        assert result.returncode == 0, result.stderr
        assert Path(shlex.split(result.stdout)[0]).resolve() == venv_python.resolve()
    else:
        assert result.returncode != 0 and result.stdout == ""
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert "PYTHON=python3 (the default: no .venv in the clone)" in message
        assert "No module named 'verl'" in message
        assert f"PYTHON=/path/to/venv/bin/python bash {recipe}" in message


# (variable, value, what the message says is accepted); `selector` stands for the package's own list.
REFUSED_VALUES = [
    ("RATIO", "abc", "a number in (0, 1]"),
    ("RATIO", "0", "a number in (0, 1]"),
    ("RATIO", "1.5", "a number in (0, 1]"),
    ("RATIO", "0.1.2", "a number in (0, 1]"),
    ("SEED", "-1", "a non-negative integer"),
    ("SEED", "007", "a non-negative integer"),
    ("K", "0", "a positive integer"),
    ("TEACHER_TOPK", "32x", "a positive integer"),
    ("ROLLOUT_N", "0", "a positive integer"),
    ("TRAIN_BATCH_SIZE", "-64", "a positive integer"),
    ("PPO_MINI_BATCH_SIZE", "2.5", "a positive integer"),
    ("MAX_RESPONSE_LENGTH", "8k", "a positive integer"),
    ("TOTAL_STEPS", "0", "a positive integer"),
    ("SELECTOR", "teachabilty", "selector"),
]


@pytest.mark.parametrize("print_mode", [False, True], ids=["run", "print"])
@pytest.mark.parametrize(("variable", "value", "accepted"), REFUSED_VALUES, ids=lambda item: str(item))
def test_a_refused_variable_stops_the_recipe_before_anything_runs_or_prints(
    recording_python, variable, value, accepted, print_mode
):
    python, argv_file = recording_python
    mode = {"TA_OPD_PRINT_OVERRIDES": "1"} if print_mode else {}
    result = run_recipe(PAIR_RECIPES[0], **mode, PYTHON=str(python), **{variable: value})
    assert (result.returncode, result.stdout, argv_file.exists()) == (2, "", False), result.stderr
    if accepted == "selector":
        accepted = f"one of {' '.join(SELECTORS)}"
    assert_one_line_refusal(result.stderr, f"{PAIR_RECIPES[0]}: {variable}: {value}", accepted)


def assert_one_line_refusal(stderr: str, refused: str, accepted: str = "") -> None:
    """``stderr`` is the one line recipes/checks.sh writes for ``refused`` ("<script>: <NAME>: <value>")."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{refused} is not accepted; accepted: {accepted}"), stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SELECTORS", "teachability entropi"),
        ("RATIOS", "0.05 abc"),
        ("SEEDS", "0 -1"),
        ("BASELINE_FULL", "2"),
    ],
)
def test_the_sweep_refuses_a_bad_value_before_its_first_run(tmp_path, variable, value):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.sh"
    recipe.write_text(f"touch {shlex.quote(str(marker))}\n")
    for dry_run in (["--dry-run"], []):
        result = run_recipe(RECIPES / "sweep.sh", *dry_run, "--recipe", str(recipe), **{variable: value})
        assert (result.returncode, result.stdout, marker.exists()) == (2, "", False), result.stderr
        assert_one_line_refusal(result.stderr, f"{RECIPES / 'sweep.sh'}: {variable}: {value.split()[-1]}")


def test_a_renamed_key_fails_the_check(tmp_path):
    """A temp copy of a recipe whose shared file uses a key verl does not have."""
    shutil.copytree(RECIPES, tmp_path / "recipes")
    common = tmp_path / "recipes" / "common.sh"
    text = common.read_text()
    assert "actor_rollout_ref.rollout.temperature=" in text
    common.write_text(
        text.replace("actor_rollout_ref.rollout.temperature=", "actor_rollout_ref.rollout.temp=")
    )
    arguments = print_arguments(tmp_path / "recipes" / PAIR_RECIPES[0].name, CONF=str(REPO / "conf"))
    with pytest.raises(HydraException, match="actor_rollout_ref.rollout.temp"):
        compose_arguments(arguments)


def test_single_gpu_recipe_builds_with_the_colocated_teacher_but_does_not_launch_yet():
    result = run_recipe(SINGLE_GPU_RECIPE)
    assert result.returncode == 3 and "not yet runnable" in result.stderr
    config = compose_arguments(print_arguments(SINGLE_GPU_RECIPE, MODEL_DIR="/models"))
    loss = build_like_verl(config)["distillation"].distillation_loss
    assert (loss.ta_opd.teacher, loss.ta_opd.teacher_path) == ("fsdp", "/models/Qwen3-4B")
    assert loss.ta_opd.compatibility == "exact"


def test_sweep_dry_run_lists_every_cell_and_each_builds(tmp_path):
    result = run_recipe(
        RECIPES / "sweep.sh",
        "--dry-run",
        "--",
        "trainer.total_training_steps=3",
        SELECTORS="teachability entropy",
        RATIOS="0.01 0.20",
        SEEDS="0 1",
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    # 2 selectors x 2 budgets x 2 seeds, plus `full` once per seed.
    assert len(commands) == 2 * 2 * 2 + 2
    assert sum("SELECTOR=full" in command for command in commands) == 2
    cell = next(command for command in commands if "SELECTOR=entropy RATIO=0.20 SEED=1" in command)
    assert cell.split()[-1] == "trainer.total_training_steps=3"
    config = compose_arguments(
        print_arguments(
            PAIR_RECIPES[0], "trainer.total_training_steps=3", SELECTOR="entropy", RATIO="0.20", SEED="1"
        )
    )
    loss = build_like_verl(config)["distillation"].distillation_loss
    assert (loss.ta_opd.selector, loss.ta_opd.ratio, loss.ta_opd.seed) == ("entropy", 0.2, 1)
    assert config.trainer.experiment_name.endswith("entropy-r0.20-seed1")


def test_the_paper_and_authors_code_variants_resolve_their_presets():
    """The two variants of the Qwen3-4B -> Qwen3-1.7B recipe: each preset reaches the built config, the verl
    keys a preset cannot set are in the recipe, and the authors' script shape is kept."""
    built = {}
    for variant in ("", "-paper", "-authors-code"):
        config = compose_arguments(print_arguments(RECIPES / f"qwen3-4b-to-qwen3-1.7b{variant}.sh"))
        built[variant] = (config, build_like_verl(config))
    config, classes = built[""]
    ta_opd = classes["distillation"].distillation_loss.ta_opd
    assert (ta_opd.preset, ta_opd.min_keep_per_sample) == (None, 0)

    config, classes = built["-paper"]
    loss = classes["distillation"].distillation_loss
    assert (loss.ta_opd.preset, loss.ta_opd.student_prob_floor, loss.loss_max_clamp) == ("paper", 0.0, None)
    assert loss.topk == 32 and config.data.train_batch_size == 64  # the base recipe's settings otherwise

    config, classes = built["-authors-code"]
    loss = classes["distillation"].distillation_loss
    assert (loss.ta_opd.preset, loss.ta_opd.min_keep_per_sample, loss.ta_opd.entropy_mode) == (
        "authors_code",
        1,
        "topk",
    )
    assert (loss.topk, loss.ta_opd.k, loss.loss_max_clamp) == (16, 16, None)
    assert "note" not in "\n".join(loss.resolved_settings())  # nothing the preset leaves to verl differs
    assert (config.data.train_batch_size, config.actor_rollout_ref.rollout.n) == (4, 2)
    assert classes["actor"].ppo_mini_batch_size * classes["rollout"].n == 8  # one update per step
    assert (config.data.max_response_length, config.trainer.total_training_steps) == (64, 50)
    assert classes["actor"].optim.weight_decay == 0.1 and list(classes["actor"].optim.betas) == [0.9, 0.98]
    names = {variant: built[variant][0].trainer.experiment_name for variant in built}
    assert len(set(names.values())) == 3, names  # three checkpoint folders, not one
