"""The shrunken real models (`ta_opd_verl.shapes.models`, `.build`) and the generated recipe data."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from safetensors import safe_open

from ta_opd_verl.cpu.vllm_cpu import VLLM_CPU_HEAD_SIZES, model_head_dim
from ta_opd_verl.data.generate import dapo_math_record, word_problems
from ta_opd_verl.data.prepare import main as prepare_main
from ta_opd_verl.data.prepare import scores_as_correct
from ta_opd_verl.shapes import build, models
from ta_opd_verl.shapes.tokenizers import family

# teacher -> student, the recipes' pairs
PAIRS = [
    ("Qwen3-4B", "Qwen3-1.7B"),
    ("Qwen3-8B", "Qwen3-4B"),
    ("Qwen3-14B", "Qwen3-4B"),
    ("DeepSeek-R1-Distill-Qwen-14B", "Qwen2.5-3B"),
]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_each_model_keeps_what_its_published_config_says(name):
    model = models.MODELS[name]
    tokens = family(model.tokenizer)
    config = model.config_dict()
    # The tokenizer fits the embedding, which has the published row count, not the tokenizer's.
    assert tokens.size < config["vocab_size"] == (152_064 if "R1" in name else 151_936)
    # BOS/EOS/pad are the family's own special tokens, by text.
    deepseek = model.tokenizer.startswith("deepseek")
    eos_text = "<｜end▁of▁sentence｜>" if deepseek else "<|im_end|>"
    pad_text = "<｜end▁of▁sentence｜>" if deepseek else "<|endoftext|>"
    assert config["eos_token_id"] == tokens.token_id(eos_text)
    assert config["pad_token_id"] == tokens.token_id(pad_text)
    # Shrunken: 2 layers, a head size vLLM-CPU runs, grouped-query attention kept.
    assert config["num_hidden_layers"] == 2
    assert model_head_dim(config) in VLLM_CPU_HEAD_SIZES
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] == (name in ("Qwen3-1.7B", "Qwen3-4B", "Qwen2.5-3B"))


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_every_teacher_is_wider_and_trains_longer_than_its_student(teacher, student):
    t, s = models.MODELS[teacher], models.MODELS[student]
    assert t.shrunken_layout()["hidden_size"] > s.shrunken_layout()["hidden_size"]
    assert t.train_steps > s.train_steps


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_tensor_parallelism_splits_the_shrunken_heads_as_it_splits_the_real_ones(name):
    model = models.MODELS[name]
    layout, tp = model.shrunken_layout(), model.tensor_parallel
    assert layout["num_key_value_heads"] == tp and layout["num_attention_heads"] % tp == 0
    group = model.published.num_heads // model.published.num_kv_heads
    # The published grouping where the width allows it (a Qwen2 model with one key/value head has
    # width / 32 query heads: module docstring).
    if model.model_type == "qwen3" or tp > 1:
        assert layout["num_attention_heads"] == group * tp


def test_an_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(models.UnknownModelError, match="Qwen3-1.7B"):
        models.real_model("Qwen3-0.6B")


@pytest.fixture(scope="module")
def two_step_qwen3(tmp_path_factory, monkeypatch_module):
    """Qwen3-1.7B's stand-in trained 2 steps, built twice into two folders."""
    short = dataclasses.replace(models.MODELS["Qwen3-1.7B"], train_steps=2)
    monkeypatch_module.setitem(models.MODELS, "Qwen3-1.7B", short)
    roots = [tmp_path_factory.mktemp(f"shapes{i}") for i in range(2)]
    return [build.build_model("Qwen3-1.7B", root, quiet=True) for root in roots]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_builder_is_deterministic_and_writes_a_loadable_real_shape_folder(two_step_qwen3):
    from transformers import AutoConfig, AutoTokenizer

    first, second = two_step_qwen3
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    config = AutoConfig.from_pretrained(first)
    assert (config.model_type, config.vocab_size, config.tie_word_embeddings) == ("qwen3", 151_936, True)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert len(tokenizer) == 151_669 and tokenizer.eos_token == "<|im_end|>"
    with safe_open(str(first / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [151_936, 64]
    generation = json.loads((first / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151_645, 151_643]
    losses = json.loads((first / "train_log.json").read_text())["losses"]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_a_second_build_is_a_cache_hit_and_a_foreign_folder_is_refused(two_step_qwen3, tmp_path, capsys):
    folder = two_step_qwen3[0]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    build.build_model("Qwen3-1.7B", folder.parent)
    assert "cache hit" in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "Qwen3-1.7B").mkdir()
    (tmp_path / "Qwen3-1.7B" / "notes.txt").write_text("mine")
    with pytest.raises(build.ShapeBuildError, match="not a shrunken model"):
        build.build_model("Qwen3-1.7B", tmp_path, quiet=True)


@pytest.mark.parametrize("name", ["Qwen3-1.7B", "Qwen2.5-3B", "DeepSeek-R1-Distill-Qwen-14B"])
def test_training_text_is_each_familys_answer_and_verl_scores_it_correct(name):
    model = models.MODELS[name]
    problem = word_problems(1, seed=3)[0]
    text = build.response_text(model, problem)
    assert text.endswith(f"Answer: {problem.answer}")
    assert ("<think>" in text) == (model.tokenizer == "qwen3")
    assert ("</think>" in text) == (model.tokenizer != "qwen2.5-instruct")
    row = dapo_math_record(problem, 0)
    assert scores_as_correct(row, text)


def test_generated_problems_are_seeded():
    assert word_problems(5, seed=1) == word_problems(5, seed=1) != word_problems(5, seed=2)


@pytest.mark.parametrize(
    ("dataset", "files"), [("dapo-math", ("train", "val")), ("gsm8k", ("train", "test"))]
)
def test_prepare_data_generate_writes_the_published_format_and_prepares_it(dataset, files, tmp_path):
    out = tmp_path / dataset
    assert prepare_main([dataset, "--generate", "40", "--val-size", "8", "--out", str(out)]) == 0
    assert sorted(path.name for path in (out / "source").iterdir())[0] in ("test.jsonl", "train.jsonl")
    frames = {split: pd.read_parquet(out / f"{split}.parquet") for split in files}
    assert sum(len(frame) for frame in frames.values()) == 40  # every generated problem is scorable
    source = "math_dapo" if dataset == "dapo-math" else "openai/gsm8k"
    assert set(frames["train"]["data_source"]) == {source}


def test_prepare_data_generate_refuses_too_few_problems(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_main(["gsm8k", "--generate", "1", "--out", str(tmp_path)])
    assert "--generate 1" in capsys.readouterr().err
