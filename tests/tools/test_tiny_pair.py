"""The tiny teacher/student pair: accuracy band, determinism, cache, loadable folders, chat template,
vLLM-CPU head size, clear errors. The first test to run builds the default pair once (a few minutes on
2 CPU cores, cached in <repo>/.cache/tiny-pair or $TA_OPD_TINY_DIR); everything else is fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from ta_opd_verl.cpu.vllm_cpu import VLLM_CPU_HEAD_SIZES, UnsupportedHeadSizeError, check_vllm_cpu_head_size
from ta_opd_verl.tiny import build as tiny_build
from ta_opd_verl.tiny.build import (
    MANIFEST_NAME,
    BuildSettings,
    TinyBuildError,
    build_tiny_pair,
    heldout_problems,
)
from ta_opd_verl.tiny.evaluate import greedy_accuracy
from ta_opd_verl.tiny.tasks import TASKS, generate_problems
from ta_opd_verl.tiny.tokenizer import EOS_TOKEN, PAD_TOKEN, render_chat

# A build shortened to a few dozen steps: seconds, not minutes (determinism and error tests).
SHORT = dict(
    teacher_steps=24, student_steps=20, eval_problems=16, train_rows=32, val_rows=24, teacher_eval_every=0
)


@pytest.fixture(scope="module")
def pair():
    return build_tiny_pair(quiet=True)


@pytest.fixture(scope="module")
def models(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair.student)
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher)
    student = AutoModelForCausalLM.from_pretrained(pair.student)
    return tokenizer, teacher, student


def test_manifest_records_accuracy_in_target_band(pair):
    manifest = pair.manifest
    assert manifest["eval_problems"] == 500 and manifest["meets_targets"]
    assert manifest["teacher"]["eval"]["accuracy"] >= 0.97
    assert 0.02 <= manifest["student"]["eval"]["accuracy"] <= 0.15
    assert manifest["student"]["stopped_at_step"] == BuildSettings().student_steps
    assert manifest["student"]["history"][-1]["step"] == BuildSettings().student_steps


def test_accuracy_on_fresh_held_out_problems(pair, models):
    tokenizer, teacher, student = models
    problems = heldout_problems(BuildSettings())[0][:100]
    assert greedy_accuracy(teacher, tokenizer, problems)["accuracy"] >= 0.95
    assert 0.01 <= greedy_accuracy(student, tokenizer, problems)["accuracy"] <= 0.2


def test_cache_hit_is_fast_and_does_not_retrain(pair):
    manifest = pair.root / MANIFEST_NAME
    weights = pair.teacher / "model.safetensors"
    before = (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    start = time.perf_counter()
    again = build_tiny_pair(quiet=True)
    assert time.perf_counter() - start < 5.0
    assert again.root == pair.root and again.manifest == pair.manifest
    assert (manifest.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before


def test_cli_cache_hit(pair, capsys):
    assert tiny_build.main(["--out", str(pair.root), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(pair.root)


def test_ta_opd_build_tiny_quiet_prints_only_the_folder(tmp_path):
    """A fresh (shortened) build through the command line: the folder on stdout, and on stderr at most the
    warning that a shortened pair misses the accuracy targets; no progress bar (transformers' tqdm writes
    one when it saves each model, terminal or not)."""
    out = tmp_path / "pair"
    shortened = ["--teacher-steps", "2", "--student-steps", "2", "--eval-problems", "4"]
    shortened += ["--train-rows", "8", "--val-rows", "8"]
    command = [sys.executable, "-m", "ta_opd_verl.cli.main", "build-tiny", "--out", str(out), "--quiet"]
    result = subprocess.run(
        [*command, *shortened],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert all(line.startswith("tiny pair: WARNING") for line in result.stderr.splitlines()), result.stderr


def test_two_fresh_shortened_builds_are_bitwise_identical(tmp_path):
    a = build_tiny_pair(tmp_path / "a", force=True, quiet=True, **SHORT)
    b = build_tiny_pair(tmp_path / "b", force=True, quiet=True, **SHORT)
    for name in ("teacher", "student"):
        assert (a.root / name / "model.safetensors").read_bytes() == (
            b.root / name / "model.safetensors"
        ).read_bytes()
        assert (a.root / name / "tokenizer.json").read_bytes() == (
            b.root / name / "tokenizer.json"
        ).read_bytes()
    assert a.train_parquet.read_bytes() == b.train_parquet.read_bytes()
    assert a.manifest["settings_hash"] == b.manifest["settings_hash"]
    # The thread pin is restored, and the shortened settings are a different cache key from the default.
    assert a.manifest["settings_hash"] != tiny_build.settings_hash(BuildSettings())
    # A changed setting is a cache miss: a fresh build replaces the folder.
    c = build_tiny_pair(tmp_path / "a", quiet=True, **{**SHORT, "teacher_steps": 25})
    assert c.manifest["settings"]["teacher_steps"] == 25


def test_thread_count_is_restored(tmp_path):
    torch.set_num_threads(2)
    build_tiny_pair(
        tmp_path / "p", force=True, quiet=True, **{**SHORT, "teacher_steps": 2, "student_steps": 10}
    )
    assert torch.get_num_threads() == 2


def test_folders_load_and_agree(pair, models):
    from transformers import GenerationConfig

    tokenizer, teacher, student = models
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for folder, model in ((pair.teacher, teacher), (pair.student, student)):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "qwen3" and config["vocab_size"] == len(tokenizer)
        assert next(model.parameters()).dtype == torch.float32
        assert GenerationConfig.from_pretrained(folder).eos_token_id == tokenizer.eos_token_id
        assert model.config.eos_token_id == tokenizer.eos_token_id
        assert (folder / "tokenizer.json").read_bytes() == (pair.student / "tokenizer.json").read_bytes()
    # Same width, so the teacher is larger in depth and FFN: 695k against 384k parameters.
    assert teacher.config.num_hidden_layers > student.config.num_hidden_layers
    assert sum(p.numel() for p in teacher.parameters()) > 1.5 * sum(p.numel() for p in student.parameters())


def test_chat_template_round_trips(models):
    tokenizer, _, _ = models
    for problem in generate_problems(50, seed=11):
        messages = [{"role": "user", "content": problem.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == render_chat(problem.prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(prompt_ids) == text
        response_ids = tokenizer(problem.response, add_special_tokens=False).input_ids
        full_ids = tokenizer(
            render_chat(problem.prompt, problem.response), add_special_tokens=False
        ).input_ids
        # verl concatenates prompt ids and generated ids: that must be the tokenisation of the full text.
        assert full_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert (
            tokenizer.decode(response_ids + [tokenizer.eos_token_id], skip_special_tokens=True)
            == problem.response
        )


def test_lengths_fit_verl_limits(models):
    tokenizer, _, _ = models
    problems = generate_problems(500, seed=12)
    prompts = tokenizer([render_chat(p.prompt) for p in problems], add_special_tokens=False).input_ids
    responses = tokenizer([p.response for p in problems], add_special_tokens=False).input_ids
    assert max(map(len, prompts)) <= 24
    assert max(len(r) + 1 for r in responses) <= 28  # + EOS


def test_parquet_files_are_held_out(pair):
    train = pd.read_parquet(pair.train_parquet)
    val = pd.read_parquet(pair.val_parquet)
    assert len(train) == BuildSettings().train_rows and len(val) == BuildSettings().val_rows
    prompt = lambda frame: set(frame["prompt"].map(lambda m: m[0]["content"]))  # noqa: E731
    evaluation = {p.prompt for p in heldout_problems(BuildSettings())[0]}
    assert not prompt(train) & prompt(val)
    assert not prompt(train) & evaluation and not prompt(val) & evaluation


def test_held_out_sets_and_parquet_files_draw_tasks_uniformly(pair):
    """Each problem's task is drawn uniformly; a prompt drawn before is redrawn (with a fresh task), which
    leaves `spell` (999 possible prompts) under its share of the 2,048 training rows. The training streams
    favour the scratchpad tasks."""
    evaluation, val = heldout_problems(BuildSettings())
    train = list(pd.read_parquet(pair.train_parquet)["extra_info"].map(lambda e: e["task"]))

    def shares(tasks):
        return {task: tasks.count(task) / len(tasks) for task in TASKS}

    for tasks in ([p.task for p in evaluation], [p.task for p in val]):
        assert all(abs(share - 1 / len(TASKS)) < 0.05 for share in shares(tasks).values()), shares(tasks)
    train_shares = shares(train)
    assert all(abs(share - 1 / len(TASKS)) < 0.05 for task, share in train_shares.items() if task != "spell")
    assert 0.1 < train_shares["spell"] < 1 / len(TASKS), train_shares
    stream = [p.task for p in generate_problems(2000, seed=12)]
    assert shares(stream)["add"] + shares(stream)["sub"] > 0.5 > train_shares["add"] + train_shares["sub"]


def test_pair_heads_fit_vllm_cpu(pair):
    assert check_vllm_cpu_head_size(pair.teacher) in VLLM_CPU_HEAD_SIZES
    assert check_vllm_cpu_head_size(pair.student) == 32


@pytest.mark.parametrize(
    ("config", "head"),
    [
        ({"hidden_size": 64, "num_attention_heads": 4}, 16),
        ({"hidden_size": 96, "num_attention_heads": 2, "head_dim": 48}, 48),
    ],
)
def test_vllm_cpu_head_size_check_refuses_bad_config(tmp_path, config, head):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedHeadSizeError, match=rf"head size {head} .*supported: 32, 64, 80"):
        check_vllm_cpu_head_size(tmp_path)
    with pytest.raises(UnsupportedHeadSizeError, match="cannot read"):
        check_vllm_cpu_head_size(tmp_path / "missing")


def test_vllm_head_size_list_matches_installed_vllm():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == VLLM_CPU_HEAD_SIZES


def test_unusable_out_folders_give_clear_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TinyBuildError, match="cannot write|not a folder"):
        build_tiny_pair(blocker / "pair", force=True, quiet=True, **SHORT)
    with pytest.raises(TinyBuildError, match="not a folder"):
        build_tiny_pair(blocker, force=True, quiet=True, **SHORT)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(TinyBuildError, match="refusing to overwrite"):
        build_tiny_pair(precious, quiet=True, **SHORT)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert tiny_build.main(["--out", str(precious), "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(TinyBuildError, match="unknown build setting"):
        build_tiny_pair(tmp_path / "x", teacher_stpes=3)
    for steps in (0, BuildSettings().student_schedule_steps + 1):
        with pytest.raises(TinyBuildError, match="student_steps"):
            build_tiny_pair(tmp_path / "x", student_steps=steps)


def test_env_var_sets_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(tiny_build.ENV_DIR, str(tmp_path / "elsewhere"))
    assert tiny_build.default_out_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(tiny_build.ENV_DIR)
    assert tiny_build.default_out_dir().parts[-2:] == (".cache", "tiny-pair")


def test_teachability_is_not_degenerate_on_the_pair(pair):
    """A small rollout batch: C must have spread and the 5% teachability pick must not be raw KL's."""
    from ta_opd_verl.tiny.measure import measure_teachability

    prompts = [p.prompt for p in generate_problems(16, seed=13)]
    figures = measure_teachability(pair.teacher, pair.student, prompts, samples=2, seed=0)
    assert figures["compatibility_exact"]["spread_q05_q95"] > 0.3
    assert figures["disagreement"]["spread_q05_q95"] > 0.3
    assert figures["compatibility_saturated_share"] < 0.5
    assert figures["jaccard"]["teachability_vs_raw_kl"] < 0.9
    assert figures["teachability_ties"]["tied_at_boundary"] < figures["teachability_ties"]["n_keep"]
