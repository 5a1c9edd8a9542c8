"""`ta-opd prepare-data` on small local copies of DAPO-Math-17k and GSM8K (tests/fixtures/, the published
columns), and the prepared rows scored by verl's own reward loop (its `naive` reward manager); the
teacher-side prompt column on generated sources (`--generate`'s)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ta_opd_verl.cli.main import main as ta_opd
from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.data import prepare as data_prep
from ta_opd_verl.data.generate import write_source
from ta_opd_verl.teacher_prompts import chat_messages
from ta_opd_verl.tiny.parquet import COLUMNS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DAPO_JSONL = FIXTURES / "dapo-math-17k.jsonl"
GSM8K_DIR = FIXTURES / "gsm8k"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def dapo_snapshot(tmp_path) -> Path:
    """The fixture rows as the published dataset lays them out: one parquet file under data/."""
    folder = tmp_path / "DAPO-Math-17k"
    (folder / "data").mkdir(parents=True)
    pd.DataFrame(_jsonl(DAPO_JSONL)).to_parquet(folder / "data" / "dapo-math-17k.parquet", index=False)
    return folder


@pytest.fixture
def gsm8k_snapshot(tmp_path) -> Path:
    """GSM8K's published layout: main/train-00000-of-00001.parquet and main/test-00000-of-00001.parquet."""
    folder = tmp_path / "gsm8k"
    (folder / "main").mkdir(parents=True)
    for split in ("train", "test"):
        frame = pd.DataFrame(_jsonl(GSM8K_DIR / f"{split}.jsonl"))
        frame.to_parquet(folder / "main" / f"{split}-00000-of-00001.parquet", index=False)
    return folder


def _read(path: Path) -> list[dict]:
    frame = pd.read_parquet(path)
    assert list(frame.columns) == list(COLUMNS)
    return frame.to_dict("records")


def test_dapo_math_from_a_parquet_snapshot(dapo_snapshot, tmp_path):
    written = data_prep.prepare("dapo-math", tmp_path / "out", source=dapo_snapshot, val_size=1, log=print)
    train, val = _read(written["train"]), _read(written["val"])
    # 6 fixture rows: one repeated prompt and one empty ground truth dropped, one prompt held out.
    assert len(train) == 3 and len(val) == 1
    rows = train + val
    assert {row["data_source"] for row in rows} == {"math_dapo"}
    assert sorted(row["reward_model"]["ground_truth"] for row in rows) == ["101", "2", "24", "31"]
    for split, part in (("train", train), ("val", val)):
        assert [row["extra_info"]["index"] for row in part] == list(range(len(part)))
        assert {row["extra_info"]["split"] for row in part} == {split}
    first = next(row for row in rows if row["reward_model"]["ground_truth"] == "24")
    assert first["extra_info"]["source_id"] == "9a0c6f3e-0001"
    assert first["reward_model"]["style"] == "rule" and first["ability"] == "math"
    (message,) = first["prompt"]
    assert message["role"] == "user" and "$360$" in message["content"]
    assert message["content"].endswith('after "Answer:".')


def test_dapo_math_keeps_duplicates_on_request(tmp_path):
    written = data_prep.prepare(
        "dapo-math", tmp_path, source=DAPO_JSONL, val_size=0, deduplicate=False, log=print
    )
    assert len(_read(written["train"])) == 5 and "val" not in written


def test_gsm8k_from_a_parquet_snapshot_and_from_jsonl(gsm8k_snapshot, tmp_path):
    from_parquet = data_prep.prepare("gsm8k", tmp_path / "a", source=gsm8k_snapshot, log=print)
    from_jsonl = data_prep.prepare("gsm8k", tmp_path / "b", source=GSM8K_DIR, log=print)
    for written in (from_parquet, from_jsonl):
        train, test = _read(written["train"]), _read(written["test"])
        assert [row["reward_model"]["ground_truth"] for row in train] == ["72", "1225", "-5"]
        assert [row["reward_model"]["ground_truth"] for row in test] == ["84", "6"]
        assert train[1]["extra_info"] == {"split": "train", "index": 1, "source_id": "train-1"}
        assert train[0]["prompt"][0]["content"].endswith(data_prep.GSM8K_INSTRUCTION)
        assert {row["data_source"] for row in train + test} == {"openai/gsm8k"}


def test_gsm8k_answer_without_final_line_is_refused(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"question": "2+2?", "answer": "It is 4."}) + "\n")
    with pytest.raises(data_prep.DataPrepError, match="no '#### <number>' line"):
        data_prep.gsm8k_rows(data_prep.read_records([source]), "train")


def test_missing_column_and_missing_source_are_named(tmp_path):
    with pytest.raises(data_prep.DataPrepError, match="no 'question' column"):
        data_prep.gsm8k_rows([{"problem": "x", "answer": "#### 1"}], "train")
    with pytest.raises(data_prep.DataPrepError, match="no such file or folder"):
        data_prep.prepare("gsm8k", tmp_path, source=tmp_path / "absent", log=print)


def test_cli_subcommand_writes_the_files(tmp_path, capsys):
    assert ta_opd(["prepare-data", "gsm8k", "--source", str(GSM8K_DIR), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "train.parquet").is_file() and (tmp_path / "test.parquet").is_file()
    assert ta_opd(["prepare-data", "gsm8k", "--source", str(tmp_path / "absent"), "--out", "x"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


class _CharTokenizer:
    """Token id = Unicode code point: verl's reward manager only decodes responses."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(char) for char in text]

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def _reward_loop_score(row: dict, response: str) -> float:
    """Score ``response`` to ``row`` with verl's naive reward-loop manager, as its reward workers do."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    tokenizer = _CharTokenizer()
    prompt = torch.tensor([tokenizer.encode(row["prompt"][0]["content"][:16])])
    response_ids = torch.tensor([tokenizer.encode(response)])
    data = DataProto.from_dict(
        tensors={
            "prompts": prompt,
            "responses": response_ids,
            "attention_mask": torch.ones(1, prompt.shape[1] + response_ids.shape[1], dtype=torch.long),
        },
        non_tensors={
            "data_source": np.array([row["data_source"]], dtype=object),
            "reward_model": np.array([row["reward_model"]], dtype=object),
            "extra_info": np.array([dict(row["extra_info"])], dtype=object),
        },
    )
    manager = NaiveRewardManager(config=None, tokenizer=tokenizer, compute_score=None)
    return manager.loop.run_until_complete(manager.run_single(data))["reward_score"]


def test_prepared_rows_are_scored_by_verls_reward_loop(dapo_snapshot, gsm8k_snapshot, tmp_path):
    dapo = _read(data_prep.prepare("dapo-math", tmp_path / "d", source=dapo_snapshot, val_size=0)["train"])
    gsm8k = _read(data_prep.prepare("gsm8k", tmp_path / "g", source=gsm8k_snapshot)["test"])
    row = next(row for row in dapo if row["reward_model"]["ground_truth"] == "31")
    # verl's math_dapo scorer: 1.0 for the right final "Answer:" line, -1.0 otherwise.
    assert _reward_loop_score(row, "50 = a + b, 12 = a - b, so a = 31.\nAnswer: 31") == 1.0
    assert _reward_loop_score(row, "Answer: 19") == -1.0
    # verl's strict gsm8k scorer: 1.0 for the right "#### <number>", 0.0 otherwise.
    assert _reward_loop_score(gsm8k[0], "7*12 = 84\n#### 84") == 1.0
    assert _reward_loop_score(gsm8k[0], "The answer is 84.") == 0.0


@pytest.mark.parametrize("ground_truth", ["", "3\n4"])
def test_unscorable_ground_truth_is_dropped(ground_truth):
    record = json.loads(DAPO_JSONL.read_text().splitlines()[0])
    record["reward_model"]["ground_truth"] = ground_truth
    (row,), _ = data_prep.dapo_rows([record])
    assert data_prep.keep_scorable([row], [data_prep.reference_answer(row)]) == ([], 1)
    record["reward_model"]["ground_truth"] = "24"
    (row,), _ = data_prep.dapo_rows([record])
    assert data_prep.keep_scorable([row], [data_prep.reference_answer(row)]) == ([row], 0)


def test_an_output_folder_that_cannot_be_made_is_named_before_any_work(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        ta_opd(["prepare-data", "gsm8k", "--source", str(FIXTURES / "gsm8k"), "--out", str(blocked / "out")])
    assert exit_info.value.code == 2
    assert f"--out {blocked / 'out'}: cannot create the output folder" in capsys.readouterr().err


TEACHER_SYSTEM_PROMPT = "You are a patient math teacher."
REFERENCE_SOLUTION = ["--teacher-prompt", "reference-solution"]


@pytest.fixture(scope="module")
def generated_sources(tmp_path_factory) -> dict[str, Path]:
    """Offline generated sources (`--generate`'s), one per dataset, written once for the module."""
    folder = tmp_path_factory.mktemp("generated")
    return {name: write_source(name, folder / name, 12, seed=0) for name in ("gsm8k", "dapo-math")}


def _own_solutions(dataset: str, source: Path) -> dict[str, str]:
    """Each source record's reference solution by the ``source_id`` its prepared row carries, read from the
    source files (GSM8K: the worked solution of record ``<split>-<number>``; DAPO: its ground truth)."""
    if dataset == "gsm8k":
        return {
            f"{split}-{number}": record["answer"]
            for split in ("train", "test")
            for number, record in enumerate(_jsonl(source / f"{split}.jsonl"))
        }
    return {
        record["extra_info"]["index"]: f"Answer: {record['reward_model']['ground_truth']}"
        for record in _jsonl(source / "train.jsonl")
    }


def _teacher_rows(path: Path, column: str) -> list[tuple[dict, list[dict]]]:
    """(row, its teacher messages as `chat_messages` accepts them) for each row of ``path``."""
    frame = pd.read_parquet(path)
    assert list(frame.columns) == [*COLUMNS, column]
    return [(row, chat_messages(row[column], column)) for row in frame.to_dict("records")]


@pytest.mark.parametrize("dataset", ["gsm8k", "dapo-math"])
def test_teacher_prompt_column_carries_each_rows_own_reference_solution(dataset, generated_sources, tmp_path):
    source = generated_sources[dataset]
    teacher_prompt = data_prep.TeacherPromptColumn(
        system_prompt=TEACHER_SYSTEM_PROMPT, reference_solution=True
    )
    plain = data_prep.prepare(dataset, tmp_path / "plain", source=source, val_size=3, log=print)
    written = data_prep.prepare(
        dataset, tmp_path / "teacher", source=source, val_size=3, teacher_prompt=teacher_prompt, log=print
    )
    assert written.keys() == plain.keys() and len(written) == 2  # gsm8k: train, test; dapo-math: train, val
    solutions = _own_solutions(dataset, source)
    seen = []
    for split, path in written.items():
        # The student's side of every row, its prompt included, is what the plain run writes.
        assert pq.read_table(path).select(list(COLUMNS)).equals(pq.read_table(plain[split]))
        for row, messages in _teacher_rows(path, data_prep.DEFAULT_TEACHER_PROMPT_COLUMN):
            (student,) = row["prompt"]
            solution = solutions[row["extra_info"]["source_id"]]
            assert messages == [
                {"role": "system", "content": TEACHER_SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": student["content"]
                    + f"\n\nA reference solution follows; use it to check your reasoning, but do not mention "
                    f"it.\n<reference_solution>\n{solution}\n</reference_solution>",
                },
            ]
            seen.append(solution)
    # Distinct solutions, so a row holding another row's solution would fail above.
    assert len(set(seen)) > len(seen) // 2


def test_system_prompt_alone_under_a_chosen_column_passes_the_preflight_reading(generated_sources, tmp_path):
    teacher_prompt = data_prep.TeacherPromptColumn(column="privileged", system_prompt=TEACHER_SYSTEM_PROMPT)
    written = data_prep.prepare(
        "gsm8k", tmp_path, source=generated_sources["gsm8k"], teacher_prompt=teacher_prompt, log=print
    )
    for path in written.values():
        # The pre-flight check (`check_teacher_prompts`) reads the column as pyarrow lists of dictionaries.
        table = pq.read_table(path)
        assert table.column_names == [*COLUMNS, "privileged"]
        for value, student in zip(
            table.column("privileged").to_pylist(), table.column("prompt").to_pylist(), strict=True
        ):
            assert chat_messages(value, "privileged") == [
                {"role": "system", "content": TEACHER_SYSTEM_PROMPT},
                *student,
            ]


def test_default_column_is_the_config_default():
    assert data_prep.DEFAULT_TEACHER_PROMPT_COLUMN == TAOPDConfig.teacher_prompt_column


def test_cli_writes_the_reference_solution_without_a_system_prompt(tmp_path):
    argv = ["prepare-data", "dapo-math", "--generate", "4", "--val-size", "1", "--out", str(tmp_path)]
    assert ta_opd([*argv, *REFERENCE_SOLUTION, "--teacher-prompt-column", "hinted"]) == 0
    for split in ("train", "val"):
        for row, messages in _teacher_rows(tmp_path / f"{split}.parquet", "hinted"):
            (user,) = messages
            block = (
                f"<reference_solution>\nAnswer: {row['reward_model']['ground_truth']}\n</reference_solution>"
            )
            assert user["role"] == "user" and user["content"].startswith(row["prompt"][0]["content"])
            assert user["content"].endswith(block)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--teacher-prompt-column", "teacher_prompt"], "give --teacher-prompt reference-solution and/or"),
        (["--teacher-system-prompt", " "], "--teacher-system-prompt: an empty text"),
        ([*REFERENCE_SOLUTION, "--teacher-prompt-column", "prompt"], "a new column name"),
        ([*REFERENCE_SOLUTION, "--teacher-prompt-column", ""], "a new column name"),
        (["--teacher-prompt", "hint"], "choose from 'reference-solution'"),
    ],
)
def test_bad_teacher_prompt_options_are_refused_before_any_work(options, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ta_opd(["prepare-data", "gsm8k", "--generate", "4", "--out", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
