"""`ta-opd prepare-data` on small local copies of DAPO-Math-17k and GSM8K (tests/fixtures/, the published
columns), and the prepared rows scored by verl's own reward loop (its `naive` reward manager)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ta_opd_verl.cli.main import main as ta_opd
from ta_opd_verl.data import prepare as data_prep
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
