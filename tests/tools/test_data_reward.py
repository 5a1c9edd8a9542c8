"""The verl parquet files and the exact-match reward for the tiny task mixture (fast, no models)."""

from __future__ import annotations

import inspect
import random

import pandas as pd
import pytest

from ta_opd_verl.tiny import tasks, tokenizer
from ta_opd_verl.tiny.parquet import COLUMNS, DATA_SOURCE, problem_rows, write_parquet
from ta_opd_verl.tiny.reward import compute_score
from ta_opd_verl.tiny.tasks import (
    MARKERS,
    TASKS,
    generate_problem,
    generate_problems,
    is_correct,
    number_words,
    parse_answer,
)


def test_parquet_round_trips_verl_columns(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", 40, seed=3, split="train")
    frame = pd.read_parquet(path)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 40
    row = frame.iloc[0]
    assert row["data_source"] == DATA_SOURCE
    messages = list(row["prompt"])
    assert len(messages) == 1 and messages[0]["role"] == "user" and isinstance(messages[0]["content"], str)
    assert row["reward_model"]["style"] == "rule"
    assert isinstance(row["reward_model"]["ground_truth"], str)
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == 0
    assert row["extra_info"]["task"] in TASKS
    assert frame["extra_info"].map(lambda e: e["index"]).tolist() == list(range(40))
    # The ground truth must be the answer to the prompt, row by row.
    problems = generate_problems(40, seed=3)
    assert frame["prompt"].map(lambda m: m[0]["content"]).tolist() == [p.prompt for p in problems]
    assert frame["reward_model"].map(lambda r: r["ground_truth"]).tolist() == [p.answer for p in problems]


def test_parquet_is_deterministic_and_respects_exclusions(tmp_path):
    a = pd.read_parquet(write_parquet(tmp_path / "a.parquet", 30, seed=7, split="val"))
    b = pd.read_parquet(write_parquet(tmp_path / "b.parquet", 30, seed=7, split="val"))
    pd.testing.assert_frame_equal(a, b)
    excluded = {p.prompt for p in generate_problems(30, seed=7)}
    c = pd.read_parquet(
        write_parquet(tmp_path / "c.parquet", 30, seed=7, split="val", exclude_prompts=excluded)
    )
    assert not excluded & set(c["prompt"].map(lambda m: m[0]["content"]))


def test_reward_signature_fits_verl_call():
    # verl's reward managers call compute_score(data_source=..., solution_str=..., ground_truth=...,
    # extra_info=..., **reward_kwargs) by keyword.
    params = inspect.signature(compute_score).parameters
    assert list(params)[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert params["extra_info"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    score = compute_score(
        data_source=DATA_SOURCE,
        solution_str="ok answer 12",
        ground_truth="12",
        extra_info={"num_turns": None},
        reward_router_address=None,
    )
    assert score == 1.0 and isinstance(score, float)


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("ok 78015,68115,04105 total 555", "555", 1.0),
        ("78015;68115;04105 result 555", "555", 1.0),
        ("now answer twenty  seven", "twenty seven", 1.0),
        ("answer 555 final 554", "554", 1.0),  # the LAST marker counts
        ("ok total 555<|im_end|>", "555", 1.0),  # decoded with special tokens: trailing EOS dropped
        ("ok total 556", "555", 0.0),
        ("ok total 5555", "555", 0.0),
        ("ok total twenty seven", "twenty", 0.0),
        ("ok 555", "555", 0.0),  # no marker: malformed
        ("ok total", "555", 0.0),  # nothing after the marker
        ("", "555", 0.0),
        ("ok total 555<|im_start|>", "555", 0.0),  # a stray control token is part of the answer
        (None, "555", 0.0),
    ],
)
def test_reward_right_wrong_malformed(response, truth, expected):
    assert compute_score(DATA_SOURCE, response, truth) == expected


def test_every_generated_response_is_rewarded_and_mutations_are_not():
    rng = random.Random(0)
    for _ in range(300):
        problem = generate_problem(rng)
        assert compute_score(DATA_SOURCE, problem.response, problem.answer) == 1.0
        assert parse_answer(problem.response) == problem.answer
        assert compute_score(DATA_SOURCE, problem.response + " 0", problem.answer) == 0.0


def test_task_answers_are_right():
    rng = random.Random(1)
    for task in TASKS:
        for _ in range(50):
            p = generate_problem(rng, task)
            words = p.prompt.split()
            if task == "add":
                assert int(p.answer) == int(words[1]) + int(words[3])
            elif task == "sub":
                assert int(p.answer) == int(words[3]) - int(words[1]) >= 0
            elif task == "say":
                assert p.answer == " ".join(number_words(int(d)) for d in words[1])
            elif task == "reverse":
                assert p.answer == words[1][::-1]
            else:
                assert p.answer == number_words(int(words[1]))
            assert sum(word in MARKERS for word in p.response.split()) == 1


def test_number_words():
    assert number_words(7) == "seven"
    assert number_words(13) == "thirteen"
    assert number_words(40) == "forty"
    assert number_words(347) == "three hundred forty seven"
    assert number_words(900) == "nine hundred"
    with pytest.raises(ValueError):
        number_words(1000)


def test_is_correct_normalises_ground_truth_whitespace():
    assert is_correct("answer twenty seven", " twenty   seven ")
    assert not is_correct("answer twenty seven", "twenty")


def test_parser_trailing_specials_match_tokenizer():
    assert set(tasks._TRAILING_SPECIALS) == {tokenizer.EOS_TOKEN, tokenizer.PAD_TOKEN}


def test_held_out_generation_is_distinct():
    problems = generate_problems(200, seed=5)
    assert len({p.prompt for p in problems}) == 200
    with pytest.raises(RuntimeError, match="distinct"):
        generate_problems(2000, seed=5, tasks=["spell"])
    assert problem_rows(problems[:2], "val")[1]["extra_info"] == {
        "split": "val",
        "index": 1,
        "task": problems[1].task,
    }
