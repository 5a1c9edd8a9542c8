"""`ta-opd recipe-cpu`'s reading of a recipe (the end-to-end run: tests/e2e/test_recipe_cpu.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ta_opd_verl.batch_selection import selection_from_records
from ta_opd_verl.config import SELECTORS, TAOPDConfig
from ta_opd_verl.shapes import recipe_cpu
from ta_opd_verl.shapes.models import MODELS

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "qwen3-14b-to-qwen3-4b.sh"


def _recipe_env() -> dict[str, str]:
    """A recipe's environment here, with the selectors this interpreter accepts handed over as a sweep hands
    them to its recipes (recipes/checks.sh), so that no recipe imports verl to ask."""
    return dict(
        os.environ,
        PYTHON=sys.executable,
        MODEL_DIR="/models",
        DATA_DIR="/data",
        OUTPUT_DIR="/out",
        TA_OPD_SELECTOR_CHOICES=" ".join(SELECTORS),
        TA_OPD_SELECTORS_FROM=sys.executable,
    )


@pytest.fixture(scope="module")
def printed():
    """The 14B recipe's command as it prints it with the CPU's variables."""
    env = _recipe_env()
    recipe_values = recipe_cpu.overrides_of(recipe_cpu.recipe_command(RECIPE, env))
    variables = recipe_cpu.shrink_variables(recipe_values)
    return recipe_values, variables, recipe_cpu.recipe_command(RECIPE, env | variables)


def test_the_cpu_variables_cap_sizes_and_keep_everything_else(printed):
    recipe_values, variables, arguments = printed
    values = recipe_cpu.overrides_of(arguments)
    assert recipe_values["data.max_response_length"] == "8192"
    assert values["data.max_response_length"] == "64" and values["data.train_batch_size"] == "4"
    # The 14B teacher's tensor parallelism stays the recipe's 2, as one replica on 2 logical GPUs.
    teacher_tp = "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size"
    assert values[teacher_tp] == recipe_values[teacher_tp] == "2"
    assert (
        values["distillation.n_gpus_per_node"] == "2" and recipe_values["distillation.n_gpus_per_node"] == "4"
    )
    assert recipe_cpu.runtime_overrides(variables) == [
        "ray_kwargs.ray_init.num_gpus=3",
        recipe_cpu.UNBOUND_VLLM_THREADS,
    ]
    # Not a size: the recipe's own value.
    for key in (
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.actor.use_dynamic_bsz",
        "actor_rollout_ref.model.use_remove_padding",
        "distillation.distillation_loss.ta_opd.ratio",
        "distillation.distillation_loss.topk",
    ):
        assert values[key] == recipe_values[key], key
    assert values["actor_rollout_ref.model.path"] == "/models/Qwen3-4B"
    assert values["distillation.teacher_models.teacher_model.model_path"] == "/models/Qwen3-14B"


def test_a_cap_never_raises_a_recipe_value():
    small = {key: "1" for key in recipe_cpu._RECIPE_KEYS.values()}
    variables = recipe_cpu.shrink_variables(small)
    assert all(variables[name] == "1" for name in recipe_cpu._RECIPE_KEYS)
    # A teacher without tensor parallelism: the CPU runtime's two logical GPUs, vLLM's threads as they are.
    assert recipe_cpu.runtime_overrides(variables) == ["ray_kwargs.ray_init.num_gpus=2"]


def test_the_run_drops_only_the_config_options(printed):
    *_, arguments = printed
    kept = recipe_cpu.hydra_overrides(arguments)
    assert "--config-name" not in kept and "--config-path" not in kept
    assert len(kept) == len(arguments) - 4 and all("=" in word for word in kept)


def test_verl_opd_baseline_keeps_the_recipes_settings_without_ta_opd(printed):
    """The step-time baseline composes into verl's own OPD loss and trainer, with everything else of the
    recipe: the models, data, sizes, dynamic batches, packing, rollouts and the teacher's top-K."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    *_, arguments = printed
    kept = recipe_cpu.hydra_overrides(arguments)
    baseline = recipe_cpu.verl_opd_arguments(kept)
    dropped = [word for word in kept if word not in baseline]
    assert dropped and all(word.startswith(recipe_cpu.TA_OPD_PREFIX) for word in dropped)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = compose(config_name=recipe_cpu.VERL_OPD_CONFIG_NAME, overrides=baseline)
        ta_opd = compose(config_name=recipe_cpu.CONFIG_NAME, overrides=kept)
    loss = omega_conf_to_dataclass(config.distillation).distillation_loss
    assert (loss.loss_mode, loss.use_policy_gradient, loss.topk) == ("k1", True, 32)
    assert "ta_opd" not in config.distillation.distillation_loss
    assert config.trainer.v1.trainer_mode != ta_opd.trainer.v1.trainer_mode == "ta_opd"
    for key in (
        "actor_rollout_ref.model.path",
        "distillation.teacher_models.teacher_model.model_path",
        "data.train_files",
        "data.train_batch_size",
        "data.max_response_length",
        "actor_rollout_ref.actor.use_dynamic_bsz",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
        "actor_rollout_ref.model.use_remove_padding",
        "actor_rollout_ref.rollout.n",
        "distillation.distillation_loss.clip_ratio_high",
        "reward.custom_reward_function.path",
    ):
        assert OmegaConf.select(config, key) == OmegaConf.select(ta_opd, key), key


@pytest.mark.parametrize("recipe", recipe_cpu.recipe_scripts(REPO / "recipes"), ids=lambda path: path.stem)
def test_each_shrunken_teacher_has_the_heads_for_its_recipes_tensor_parallelism(recipe):
    values = recipe_cpu.overrides_of(recipe_cpu.recipe_command(recipe, _recipe_env()))
    teacher = (
        values.get(f"{recipe_cpu.TA_OPD_PREFIX}teacher_path") or values[recipe_cpu.TEACHER_KEY]
    ).rsplit("/", 1)[-1]
    tp = int(values["distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size"])
    assert MODELS[teacher].tensor_parallel == tp, (teacher, tp)


def test_a_failing_recipe_names_itself(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("echo nope >&2; exit 3\n")
    with pytest.raises(recipe_cpu.RecipeError, match="bad.sh: exited with 3: nope"):
        recipe_cpu.recipe_command(bad, dict(os.environ))


def test_every_runnable_recipe_is_found_and_the_helpers_are_not():
    names = {path.name for path in recipe_cpu.recipe_scripts(REPO / "recipes")}
    assert "qwen3-4b-to-qwen3-1.7b-paper.sh" in names and "single-gpu-qwen3-4b-to-qwen3-1.7b.sh" in names
    assert not names & {"common.sh", "checks.sh", "sweep.sh"}
    assert len(names) == 7


def _dump(folder: Path, selected: list[list[int]]) -> None:
    records = [
        {
            "disagreement": [0.1, 0.9, 0.5, 0.2],
            "compatibility": [0.8, 0.7, 0.1, 0.5],
            "entropy": [1.0, 2.0, 0.5, 0.1],
            "selected": selected[0],
            "response_ids": [1, 2, 3, 4],
            "teacher_sampled_logprob": [-1.0, -2.0, -0.5, -3.0],
        },
        {
            "disagreement": [0.3, 0.4],
            "compatibility": [0.9, 0.2],
            "entropy": [0.3, 0.6],
            "selected": selected[1],
            "response_ids": [4, 9],
            "teacher_sampled_logprob": [-0.1, -7.0],
        },
    ]
    folder.mkdir()
    (folder / "step_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_mask_check_recomputes_the_global_rule_and_catches_another_mask(tmp_path):
    ta_opd = TAOPDConfig(ratio=0.2)
    _dump(tmp_path / "probe", [[], []])
    records = [json.loads(line) for line in (tmp_path / "probe" / "step_1.jsonl").read_text().splitlines()]
    expected = selection_from_records(records, ta_opd.selector, ta_opd.ratio, rules=ta_opd.selection_rules())
    assert sum(map(len, expected)) == 2  # ρ = 0.2 of 6 positions
    _dump(tmp_path / "right", expected)
    assert recipe_cpu.mask_equals_global_rule(tmp_path / "right", ta_opd) == (True, 1)
    _dump(tmp_path / "wrong", [[p for p in range(4) if p not in expected[0]][:2], []])
    assert recipe_cpu.mask_equals_global_rule(tmp_path / "wrong", ta_opd) == (False, 1)
    (tmp_path / "empty").mkdir()
    assert recipe_cpu.mask_equals_global_rule(tmp_path / "empty", ta_opd) == (False, 0)


def test_the_dump_checks_read_the_teacher_log_prob_at_the_students_end_of_turn(tmp_path):
    _dump(tmp_path / "d", [[1], []])
    checks = recipe_cpu.dump_checks(tmp_path / "d", student_eos_id=4)
    assert checks["teacher_sampled_logprob_real_at_selected"] and checks["selected_positions"] == 1
    assert checks["student_end_of_turn_positions"] == 2
    assert checks["teacher_logprob_at_student_end_of_turn"] == pytest.approx((-3.0 - 0.1) / 2)
    assert checks["teacher_logprob_elsewhere"] == pytest.approx((-1.0 - 2.0 - 0.5 - 7.0) / 4)
