"""Math word problems generated offline, written as the published DAPO-Math-17k and GSM8K files are.

No dataset hub is reachable on the CPU machines, so `ta-opd prepare-data <dataset> --generate N` makes
the source itself: N problems from ``reasoning-gym``'s ``gsm_symbolic`` generator (GSM8K-style word
problems with a worked solution and an integer answer), written as the dataset's published rows, then
prepared by the same code as a downloaded copy (`ta_opd_verl.data.prepare`):

- DAPO-Math-17k: ``data_source`` ``math_dapo``, one user message holding the question inside DAPO's
  instruction ("... The last line of your response should be of the form Answer: $Answer ..."),
  ``ability`` ``MATH``, ``reward_model`` ``{"ground_truth", "style": "rule-lighteval/MATH_v2"}``,
  ``extra_info`` ``{"index"}`` (the layout of ``tests/fixtures/dapo-math-17k.jsonl``);
- GSM8K: ``question`` and ``answer`` (the worked solution, then ``#### <number>``), split into
  ``train.jsonl`` and ``test.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

GENERATOR = "gsm_symbolic"
# DAPO-Math-17k's prompt, around each question (the published rows').
DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
DAPO_STYLE = "rule-lighteval/MATH_v2"
# GSM8K's test split is 1,319 of 8,792 problems: the same share here.
GSM8K_TEST_SHARE = 0.15


@dataclass(frozen=True)
class WordProblem:
    question: str
    solution: str  # the worked solution, without the final answer line
    answer: str


def word_problems(count: int, seed: int) -> list[WordProblem]:
    """``count`` problems of reasoning-gym's `GENERATOR`, the same for the same seed."""
    # reasoning-gym imports dozens of generators; only this command and the shape builder need it.
    import reasoning_gym

    if count < 1:
        raise ValueError(f"--generate: {count} problems; give at least 1")
    problems = []
    for item in reasoning_gym.create_dataset(GENERATOR, size=count, seed=seed):
        # Some generated solutions end in their own "#### <float>" line; the answer line is written once,
        # from the integer answer, by the formats below.
        solution = re.sub(r"(\n#### [^\n]*)+$", "", str(item["metadata"].get("answer_cot") or "").strip())
        problems.append(WordProblem(item["question"].strip(), solution, str(item["answer"]).strip()))
    return problems


def dapo_math_record(problem: WordProblem, index: int) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_PROMPT.format(question=problem.question)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": problem.answer, "style": DAPO_STYLE},
        "extra_info": {"index": f"{GENERATOR}-{index:06d}"},
    }


def gsm8k_record(problem: WordProblem) -> dict:
    return {"question": problem.question, "answer": f"{problem.solution}\n#### {problem.answer}"}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def write_source(dataset: str, folder: str | os.PathLike, count: int, seed: int) -> Path:
    """Write ``count`` generated problems as ``dataset``'s published files into ``folder``; return it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    problems = word_problems(count, seed)
    if dataset == "dapo-math":
        _write_jsonl(out / "train.jsonl", [dapo_math_record(p, i) for i, p in enumerate(problems)])
    elif dataset == "gsm8k":
        test_size = max(1, round(count * GSM8K_TEST_SHARE))
        _write_jsonl(out / "train.jsonl", [gsm8k_record(p) for p in problems[test_size:]])
        _write_jsonl(out / "test.jsonl", [gsm8k_record(p) for p in problems[:test_size]])
    else:
        raise ValueError(f"no generated source for {dataset!r}; known: dapo-math, gsm8k")
    return out
