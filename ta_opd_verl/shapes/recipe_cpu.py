"""`ta-opd recipe-cpu recipes/<recipe>.sh [--teacher server|fsdp]`: run a GPU recipe for real on the CPU.

The recipe prints its exact command (``TA_OPD_PRINT_OVERRIDES=1``); that command runs through verl's
``main_ppo`` with every override it prints, in the same order, except what the CPU cannot hold, which
the recipe's own variables shrink and `CPU_ADJUSTMENTS` appends (later overrides win in Hydra):

- models: ``MODEL_DIR`` points at the shrunken real models (`ta_opd_verl.shapes.build`: same
  architecture, vocabulary and tokenizer, 2 layers);
- data: ``DATA_DIR`` holds DAPO-Math-format prompts generated offline and prepared by ``ta-opd
  prepare-data dapo-math --generate`` (scored by verl's own ``math_dapo`` reward function);
- GPUs: the student's pool gets one logical GPU (rollout TP 1), the teacher's one replica with the
  recipe's tensor parallelism up to 2 (one rank per core: the 14B recipes' TP 2 runs as TP 2, with
  vLLM's OpenMP threads unbound, `UNBOUND_VLLM_THREADS`), one node each; Ray gets one logical GPU per
  rank (`runtime_overrides`);
- sizes: prompts per step, PPO mini-batch and lengths are cut to `SHRINK`'s caps when the recipe's are
  larger; ``TOTAL_STEPS`` is ``--steps``; no checkpoint is saved.

Everything else is the recipe's: the loss, the selector and budget, K and the teacher's top-K, the preset,
the rollout count, dynamic batch sizes (``use_dynamic_bsz``) and packed sequences (``use_remove_padding``).
The configuration is ``conf/recipe_cpu.yaml``: the recipes' ``ta_opd_trainer`` with the CPU runtime under it.

Each run writes ``outputs/recipe-cpu/<recipe>[-fsdp]/summary.json``: the recipe, teacher, steps,
vocabulary size, tokenizer, peak memory, seconds per step, every adjusted variable and override, and
``mask_equals_global_rule`` (the selection dump's mask equals the global top-n rule recomputed from the
dumped scores at every step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from ta_opd_verl.batch_selection import load_selection_dump, selection_from_records
from ta_opd_verl.cli.train import LOG_FILE, RunResult, failure_reason, run_verl
from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.data.generate import write_source
from ta_opd_verl.data.prepare import prepare
from ta_opd_verl.shapes.build import build_models, default_root
from ta_opd_verl.shapes.models import MODELS

CONFIG_NAME = "recipe_cpu"
VERL_OPD_CONFIG_NAME = "opd_recipe_cpu"
# The `teacher` of a verl-OPD baseline's summary: verl's teacher server with verl's own loss.
VERL_OPD_TEACHER = "server, verl OPD"
MAIN_PPO = "verl.trainer.main_ppo"
REPO = Path(__file__).resolve().parents[2]
DATA_PROBLEMS = 400
DATA_VAL_SIZE = 16
TA_OPD_PREFIX = "distillation.distillation_loss.ta_opd."
STUDENT_KEY = "actor_rollout_ref.model.path"
TEACHER_KEY = "distillation.teacher_models.teacher_model.model_path"

# Recipe variables set for the CPU: name -> (value, or cap when the recipe's own is larger, or None when
# `shrink_variables` derives it; why).
SHRINK: dict[str, tuple[int | None, str]] = {
    "TRAIN_BATCH_SIZE": (4, "prompts per step (cap)"),
    "PPO_MINI_BATCH_SIZE": (2, "prompts per PPO mini-batch (cap): two updates per step"),
    "MAX_PROMPT_LENGTH": (256, "prompt tokens (cap): a generated problem under a chat template fits"),
    "MAX_RESPONSE_LENGTH": (64, "response tokens (cap)"),
    "STUDENT_GPUS": (1, "one logical GPU for the student's pool (FSDP actor + vLLM rollout)"),
    "TEACHER_TP": (2, "the recipe's teacher tensor parallelism (cap): one rank per core"),
    "TEACHER_GPUS": (None, "one teacher replica: as many logical GPUs as its tensor parallelism"),
    "NNODES": (1, "one node"),
    "TEACHER_NNODES": (1, "one node"),
    "ROLLOUT_TP": (1, "tensor parallelism 1: one logical GPU for the student's pool"),
    "SAVE_FREQ": (-1, "no checkpoint"),
}
_RECIPE_KEYS = {
    "TRAIN_BATCH_SIZE": "data.train_batch_size",
    "PPO_MINI_BATCH_SIZE": "actor_rollout_ref.actor.ppo_mini_batch_size",
    "MAX_PROMPT_LENGTH": "data.max_prompt_length",
    "MAX_RESPONSE_LENGTH": "data.max_response_length",
    "TEACHER_TP": "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size",
}
_CAPPED = set(_RECIPE_KEYS)
# vLLM-CPU binds each tensor-parallel rank's OpenMP threads to a NUMA node of its own by default and refuses
# two ranks on a one-node machine ("Not enough allowed NUMA nodes"); unbound, TP 2 runs on 2 cores.
UNBOUND_VLLM_THREADS = "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_OMP_THREADS_BIND=nobind"


class RecipeError(RuntimeError):
    """A recipe cannot be read or run on the CPU."""


def recipe_command(recipe: Path, env: dict[str, str]) -> list[str]:
    """The recipe's ``main_ppo`` arguments (after ``-m verl.trainer.main_ppo``), as it prints them."""
    printed = subprocess.run(
        ["bash", str(recipe)],
        env=env | {"TA_OPD_PRINT_OVERRIDES": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if printed.returncode != 0:
        raise RecipeError(f"{recipe}: exited with {printed.returncode}: {printed.stderr.strip()}")
    words = shlex.split(printed.stdout)
    if MAIN_PPO not in words:
        raise RecipeError(f"{recipe}: printed no '-m {MAIN_PPO}' command: {printed.stdout[:200]!r}")
    return words[words.index(MAIN_PPO) + 1 :]


def overrides_of(arguments: list[str]) -> dict[str, str]:
    """``key=value`` overrides by key (the last one wins, as in Hydra); options skipped."""
    values, skip = {}, False
    for word in arguments:
        if skip:
            skip = False
        elif word.startswith("--"):
            skip = "=" not in word
        elif "=" in word:
            key, value = word.split("=", 1)
            values[key.lstrip("+")] = value
    return values


def hydra_overrides(arguments: list[str]) -> list[str]:
    """The arguments without ``--config-path``/``--config-name`` (the CPU run names its own config)."""
    kept, skip = [], False
    for word in arguments:
        if skip:
            skip = False
        elif word in ("--config-path", "--config-name", "-cp", "-cn"):
            skip = True
        elif not word.startswith("--config-"):
            kept.append(word)
    return kept


def shrink_variables(recipe_values: dict[str, str]) -> dict[str, str]:
    """`SHRINK`'s variables for a recipe whose printed overrides are ``recipe_values``."""
    variables = {}
    for name, (value, _) in SHRINK.items():
        if name in _CAPPED:
            value = min(value, int(recipe_values[_RECIPE_KEYS[name]]))
        variables[name] = str(value)
    variables["TEACHER_GPUS"] = variables["TEACHER_TP"]  # one replica
    return variables


def runtime_overrides(variables: dict[str, str]) -> list[str]:
    """What the CPU runtime needs for the pools ``variables`` ask for: one logical GPU per training rank and
    teacher rank (Ray schedules verl's pools by that count), and vLLM's threads unbound under teacher
    tensor parallelism."""
    gpus = int(variables["STUDENT_GPUS"]) + int(variables["TEACHER_GPUS"])
    unbound = [UNBOUND_VLLM_THREADS] if int(variables["TEACHER_TP"]) > 1 else []
    return [f"ray_kwargs.ray_init.num_gpus={gpus}", *unbound]


def ensure_data(root: Path) -> Path:
    """DAPO-Math-format prompts for the recipes (generated, then prepared); the ``DATA_DIR`` to use."""
    data_dir = root / "data"
    target = data_dir / "dapo-math"
    if not (target / "train.parquet").is_file() or not (target / "val.parquet").is_file():
        source = write_source("dapo-math", target / "source", DATA_PROBLEMS, seed=0)
        prepare("dapo-math", target, source=source, val_size=DATA_VAL_SIZE, seed=0)
    return data_dir


def mask_equals_global_rule(dump_dir: Path, ta_opd: TAOPDConfig) -> tuple[bool, int]:
    """Does every dumped step's mask equal the global top-n rule recomputed from its dumped scores?
    Returns (answer, steps checked); no step dumped is False."""
    steps = load_selection_dump(dump_dir)
    rules = ta_opd.selection_rules()
    for records in steps.values():
        expected = selection_from_records(records, ta_opd.selector, ta_opd.ratio, rules=rules)
        if [record["selected"] for record in records] != expected:
            return False, len(steps)
    return bool(steps), len(steps)


def resolved_ta_opd(out_dir: Path) -> TAOPDConfig:
    """The run's ``ta_opd`` block as Hydra composed it (``hydra/.hydra/config.yaml``)."""
    composed = OmegaConf.load(out_dir / "hydra" / ".hydra" / "config.yaml")
    block = OmegaConf.to_container(composed.distillation.distillation_loss.ta_opd, resolve=True)
    block.pop("_target_", None)
    return TAOPDConfig(**block)


def dump_checks(dump_dir: Path, student_eos_id: int) -> dict:
    """What the selection dump says about the teacher's rows: its sampled-token log-prob is a real
    log-probability (finite, <= 0, not all 0) at every selected position; and at the student's
    end-of-turn token (``student_eos_id`` in a response), the teacher's mean log-prob against its mean
    elsewhere (a teacher that reads that id as another token, as R1-Distill reads Qwen's <|im_end|>,
    gives it far less)."""
    selected, at_eos, elsewhere = [], [], []
    for records in load_selection_dump(dump_dir).values():
        for record in records:
            logprobs = record["teacher_sampled_logprob"]
            selected += [logprobs[i] for i in record["selected"]]
            for token, value in zip(record["response_ids"], logprobs, strict=True):
                (at_eos if token == student_eos_id else elsewhere).append(value)
    real = (
        bool(selected) and all(math.isfinite(v) and v <= 0 for v in selected) and any(v < 0 for v in selected)
    )
    return {
        "teacher_sampled_logprob_real_at_selected": real,
        "selected_positions": len(selected),
        "student_end_of_turn_positions": len(at_eos),
        "teacher_logprob_at_student_end_of_turn": statistics.fmean(at_eos) if at_eos else None,
        "teacher_logprob_elsewhere": statistics.fmean(elsewhere) if elsewhere else None,
    }


def summarise(recipe: Path, teacher: str, result: RunResult, overrides: dict[str, str], extra: dict) -> dict:
    steps = [row["data"] for row in result.metrics() if "timing_s/step" in row["data"]]
    student = Path(overrides[STUDENT_KEY])
    student_config = json.loads((student / "config.json").read_text())
    tokenizer = json.loads((student / "manifest.json").read_text())["tokenizer"]

    def median(key: str) -> float | None:
        values = [data[key] for data in steps if key in data]
        return round(statistics.median(values), 2) if values else None

    summary = {
        "recipe": recipe.name,
        "teacher": teacher,
        "returncode": result.returncode,
        "steps": len(steps),
        "student": student.name,
        "teacher_model": Path(extra.pop("teacher_path")).name,
        "vocab_size": student_config["vocab_size"],
        "tokenizer": tokenizer,
        "peak_memory_gib": round(result.peak_memory_gib, 2),
        "seconds_per_step": median("timing_s/step"),
        # the scoring forward (verl's old-log-prob pass, where TA-OPD's processor runs), the update, rollout
        "seconds_scoring_forward": median("timing_s/old_log_prob"),
        "seconds_update": median("timing_s/update_actor"),
        "seconds_rollout": median("timing_s/gen"),
        "ta_opd_metrics": sorted({key for data in steps for key in data if key.startswith("actor/ta_opd/")}),
        "wall_seconds": round(result.wall_seconds, 1),
    }
    return summary | extra


@dataclass(frozen=True)
class RecipeRun:
    """A recipe's command for the CPU: its arguments after ``main_ppo`` with `SHRINK`'s variables, those
    arguments by key, the variables set, and the teacher model's folder."""

    arguments: list[str]
    overrides: dict[str, str]
    variables: dict[str, str]
    teacher_path: str


def prepare_recipe(recipe: Path, steps: int, out_dir: Path, shapes_root: Path) -> RecipeRun:
    """The recipe's command with the CPU's variables (module docstring), its models built and its data
    prepared."""
    env = dict(os.environ, PYTHON=sys.executable, MODEL_DIR=str(shapes_root))
    env["DATA_DIR"] = str(ensure_data(shapes_root))
    env["OUTPUT_DIR"] = str(out_dir)
    printed = overrides_of(recipe_command(recipe, env))
    variables = shrink_variables(printed) | {"TOTAL_STEPS": str(steps)}
    arguments = recipe_command(recipe, env | variables)
    overrides = overrides_of(arguments)
    teacher_path = overrides.get(f"{TA_OPD_PREFIX}teacher_path") or overrides[TEACHER_KEY]
    needed = [Path(overrides[STUDENT_KEY]).name, Path(teacher_path).name]
    unknown = [name for name in needed if name not in MODELS]
    if unknown:
        raise RecipeError(f"{recipe}: no shrunken model for {', '.join(unknown)}; known: {', '.join(MODELS)}")
    build_models(needed, shapes_root, quiet=True)
    arguments = [*hydra_overrides(arguments), *runtime_overrides(variables)]
    return RecipeRun(arguments, overrides, variables, teacher_path)


def _run_summary(config: str, prepared: RecipeRun, appended: list[str], out_dir: Path):
    """Run verl's trainer with ``config`` and the recipe's arguments, ``appended`` after them; the result
    and what the summary records of the command."""
    result = run_verl(config, [*prepared.arguments, *appended], out_dir)
    extra = {
        "teacher_path": prepared.teacher_path,
        "adjusted_variables": {
            name: f"{value} ({SHRINK[name][1]})"
            for name, value in prepared.variables.items()
            if name in SHRINK
        },
        "appended_overrides": appended,
        "command": [sys.executable, "-m", MAIN_PPO, "--config-name", config, *prepared.arguments, *appended],
    }
    if result.returncode != 0:
        extra["failure"] = failure_reason((out_dir / LOG_FILE).read_text(errors="replace"))
    return result, extra


def run_recipe(recipe: Path, teacher: str, steps: int, out_dir: Path, shapes_root: Path) -> dict:
    """Run ``recipe`` on the CPU (module docstring); write and return its summary."""
    prepared = prepare_recipe(recipe, steps, out_dir, shapes_root)
    if prepared.overrides.get(f"{TA_OPD_PREFIX}teacher") == "fsdp" and teacher == "server":
        teacher = "fsdp"  # the recipe's own choice (the single-GPU recipe)
    adjustments = [f"{TA_OPD_PREFIX}selection_dump_dir={out_dir / 'selection'}"]
    if teacher == "fsdp":
        teacher_path = f"{TA_OPD_PREFIX}teacher_path={prepared.teacher_path}"
        adjustments += [f"{TA_OPD_PREFIX}teacher=fsdp", teacher_path]
    result, extra = _run_summary(CONFIG_NAME, prepared, adjustments, out_dir)
    extra["mask_equals_global_rule"] = False
    if result.returncode == 0:
        extra["mask_equals_global_rule"], extra["steps_checked"] = mask_equals_global_rule(
            out_dir / "selection", resolved_ta_opd(out_dir)
        )
        student = Path(prepared.overrides[STUDENT_KEY])
        student_eos = json.loads((student / "config.json").read_text())["eos_token_id"]
        extra |= dump_checks(out_dir / "selection", student_eos)
    return write_summary(out_dir, summarise(recipe, teacher, result, prepared.overrides, extra))


def run_verl_opd(recipe: Path, steps: int, out_dir: Path, shapes_root: Path) -> dict:
    """verl's own OPD with the recipe's settings on the same shrunken pair and data (the baseline of the
    step-time comparison): ``conf/opd_recipe_cpu.yaml`` (k1 with the policy gradient on every response
    position, verl's teacher server) and the recipe's arguments without its TA-OPD keys."""
    prepared = prepare_recipe(recipe, steps, out_dir, shapes_root)
    if prepared.overrides.get(f"{TA_OPD_PREFIX}teacher") == "fsdp":
        raise RecipeError(f"{recipe}: verl's own OPD has no colocated teacher; give a server-teacher recipe")
    prepared = replace(prepared, arguments=verl_opd_arguments(prepared.arguments))
    result, extra = _run_summary(VERL_OPD_CONFIG_NAME, prepared, [], out_dir)
    return write_summary(out_dir, summarise(recipe, VERL_OPD_TEACHER, result, prepared.overrides, extra))


def verl_opd_arguments(arguments: list[str]) -> list[str]:
    """A recipe's Hydra overrides without its TA-OPD keys (``distillation.distillation_loss.ta_opd.*``)."""
    return [word for word in arguments if not word.lstrip("+").startswith(TA_OPD_PREFIX)]


def write_summary(out_dir: Path, summary: dict) -> dict:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def recipe_scripts(folder: Path) -> list[Path]:
    """The runnable recipes of ``folder``: the scripts that launch through ``ta_opd_run`` or run another
    recipe (the preset variants), not the sourced helpers or the sweep."""
    launches = ("\nta_opd_run ", '\nexec bash "$(dirname "${BASH_SOURCE[0]}")/')
    return sorted(path for path in folder.glob("*.sh") if any(mark in path.read_text() for mark in launches))


def markdown_table(summaries: list[dict]) -> str:
    """One row per run, for docs/recipes.md."""
    lines = [
        "| recipe | teacher | teacher → student | vocab | steps | s/step | scoring forward s | peak GiB "
        "| mask = global rule | teacher log-prob at student EOS / elsewhere |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        eos, rest = s.get("teacher_logprob_at_student_end_of_turn"), s.get("teacher_logprob_elsewhere")
        logprobs = (
            f"{eos:.2f} / {rest:.2f} ({s['student_end_of_turn_positions']} EOS)" if eos is not None else "-"
        )
        lines.append(
            f"| `{s['recipe']}` | {s['teacher']} | {s['teacher_model']} → {s['student']} | {s['vocab_size']} "
            f"| {s['steps']} | {s['seconds_per_step']} | {s['seconds_scoring_forward']} "
            f"| {s['peak_memory_gib']} | {_mask_cell(s)} | {logprobs} |"
        )
    return "\n".join(lines) + "\n"


def _mask_cell(summary: dict) -> str:
    if summary["teacher"] == VERL_OPD_TEACHER:
        return "– (no selection)"
    return "yes" if summary["mask_equals_global_rule"] else "NO"


def succeeded(summary: dict) -> bool:
    """A run ended well: rc 0 and, for TA-OPD, the mask equal to the global rule at every step."""
    return summary["returncode"] == 0 and (
        summary["teacher"] == VERL_OPD_TEACHER or summary["mask_equals_global_rule"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ta-opd recipe-cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "recipes", nargs="*", type=Path, help="recipe scripts, e.g. recipes/qwen3-4b-to-qwen3-1.7b.sh"
    )
    parser.add_argument("--all", action="store_true", help="every recipe under recipes/, both teachers")
    parser.add_argument(
        "--teacher",
        choices=("server", "fsdp", "both"),
        default="server",
        help="teacher placement (default server)",
    )
    parser.add_argument(
        "--verl-opd",
        action="store_true",
        help="after each server-teacher run, verl's own OPD with the recipe's settings on the same pair "
        "(conf/opd_recipe_cpu.yaml; outputs/recipe-cpu/<recipe>-verl-opd): the step-time baseline",
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument(
        "--out", type=Path, help="output folder of one recipe (default outputs/recipe-cpu/<recipe>[-fsdp])"
    )
    parser.add_argument("--shapes-dir", type=Path, help="shrunken models (default .cache/shapes)")
    args = parser.parse_args(argv)
    recipes = recipe_scripts(REPO / "recipes") if args.all else args.recipes
    teachers = ("server", "fsdp") if args.all or args.teacher == "both" else (args.teacher,)
    if not recipes:
        parser.error("give a recipe (recipes/*.sh) or --all")
    for recipe in recipes:
        if not recipe.is_file():
            parser.error(f"{recipe}: no such recipe; the recipes are recipes/*.sh")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1")
    if args.out and (len(recipes) * len(teachers) > 1 or args.verl_opd):
        parser.error("--out names the folder of one run: give one recipe and one teacher, without --verl-opd")
    summaries = []
    for recipe in recipes:
        for teacher in teachers:
            if teacher == "server" and "teacher=fsdp" in recipe.read_text():
                continue  # a colocated-teacher recipe runs once, with its own teacher
            out_dir = run_folder(args.out, recipe.stem + ("-fsdp" if teacher == "fsdp" else ""))
            print(f"[recipe-cpu] {recipe.name}, {teacher} teacher -> {out_dir}", flush=True)
            try:
                summary = run_recipe(
                    recipe.resolve(), teacher, args.steps, out_dir, args.shapes_dir or default_root()
                )
            except RecipeError as error:
                print(f"ta-opd recipe-cpu: {error}", file=sys.stderr)
                return 2
            print(json.dumps({k: v for k, v in summary.items() if k != "command"}, indent=2), flush=True)
            summaries.append(summary)
            if args.verl_opd and summary["teacher"] == "server":
                summaries.append(_verl_opd_after(recipe, summary, args))
    if len(summaries) > 1:
        table = REPO / "outputs" / "recipe-cpu" / "table.md"
        table.write_text(markdown_table(summaries))
        print(f"[recipe-cpu] table: {table}")
    return 0 if all(succeeded(s) for s in summaries) else 1


def run_folder(out: Path | None, name: str) -> Path:
    """One run's output folder, made: ``out`` when given, else ``outputs/recipe-cpu/<name>``."""
    folder = (out or REPO / "outputs" / "recipe-cpu" / name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _verl_opd_after(recipe: Path, ta_opd: dict, args) -> dict:
    """verl's own OPD right after the TA-OPD run ``ta_opd`` of the same recipe; prints the step times."""
    out_dir = run_folder(None, f"{recipe.stem}-verl-opd")
    print(f"[recipe-cpu] {recipe.name}, verl's own OPD -> {out_dir}", flush=True)
    summary = run_verl_opd(recipe.resolve(), args.steps, out_dir, args.shapes_dir or default_root())
    mine, theirs = ta_opd["seconds_per_step"], summary["seconds_per_step"]
    if mine and theirs:
        print(f"[recipe-cpu] median step: TA-OPD {mine} s, verl's OPD {theirs} s ({mine / theirs:.2f}x)")
    return summary


if __name__ == "__main__":
    sys.exit(main())
