"""verl-format parquet files from the tiny task generator (`ta_opd_verl.tiny.tasks`).

One row per problem, in the columns verl's RL dataset reads (`verl.utils.dataset.rl_dataset`):
``data_source``, ``prompt`` (chat messages; verl applies the tokenizer's chat template with the
generation prompt), ``ability``, ``reward_model`` (``{"style": "rule", "ground_truth": answer}``) and
``extra_info`` (``{"split", "index", "task"}``). `ta_opd_verl.tiny.reward.compute_score` scores them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from ta_opd_verl.tiny.tasks import Problem, generate_problems

DATA_SOURCE = "ta_opd_tiny"
ABILITY = "arithmetic"
COLUMNS: tuple[str, ...] = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def problem_rows(problems: Sequence[Problem], split: str) -> list[dict]:
    """verl rows for ``problems`` (``index`` counts from 0 in the given order)."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.prompt}],
            "ability": ABILITY,
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "task": p.task},
        }
        for i, p in enumerate(problems)
    ]


def write_problems_parquet(path: str | os.PathLike, problems: Sequence[Problem], split: str) -> Path:
    """Write ``problems`` as a verl parquet file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(problem_rows(problems, split), columns=list(COLUMNS)).to_parquet(path, index=False)
    return path


def write_parquet(
    path: str | os.PathLike,
    n: int,
    seed: int,
    split: str,
    *,
    exclude_prompts: Iterable[str] = (),
    tasks: Sequence[str] | None = None,
) -> Path:
    """Write ``n`` distinct problems drawn with ``seed`` (none whose prompt is in ``exclude_prompts``);
    ``tasks`` as in `generate_problems` (uniform over them; the default is the weighted mixture)."""
    problems = generate_problems(n, seed, exclude_prompts=exclude_prompts, tasks=tasks)
    return write_problems_parquet(path, problems, split)
