"""The driver's batch-level selection: global top-n over the whole batch, stable sample order, metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ta_opd_verl.batch_selection import (
    load_selection_dump,
    load_selection_header,
    load_trained_positions,
    select_rollout_batch,
    selection_dump,
    selection_from_records,
    selection_records,
    stable_sample_ids,
    stable_sample_order,
    trained_position_records,
    write_selection_dump,
    write_trained_positions,
)
from ta_opd_verl.teachability import SelectionRules, TokenStatistics, select_from_scores

SETTINGS = dict(rules=SelectionRules(), seed=3, global_step=1)


def _stats(b: int, t: int, seed: int = 0) -> TokenStatistics:
    generator = torch.Generator().manual_seed(seed)
    return TokenStatistics(*(torch.rand(b, t, generator=generator) for _ in range(3)))


def test_selection_is_the_global_top_n_over_all_valid_positions():
    stats = _stats(6, 10)
    valid = torch.ones(6, 10, dtype=torch.bool)
    valid[2, 7:] = False
    valid[5] = False  # a padding row added by verl's batch balancing
    mask, metrics = select_rollout_batch(
        stats, valid, [f"k{i}" for i in range(6)], selector="raw_kl", ratio=0.1, **SETTINGS
    )
    n_valid = int(valid.sum())
    n = math.ceil(0.1 * n_valid)
    assert int(mask.sum()) == n and not (mask & ~valid).any()
    threshold = stats.disagreement[mask].min()
    assert (stats.disagreement[valid & ~mask] <= threshold).all()
    assert metrics["actor/ta_opd/kept_fraction"] == n / n_valid


def test_tie_rule_follows_stable_ids_not_the_balanced_row_order():
    ties = TokenStatistics(*(torch.ones(4, 3) for _ in range(3)))
    valid = torch.ones(4, 3, dtype=torch.bool)
    ids = ["c_0_0", "a_0_0", "d_0_0", "b_0_0"]  # rows as batch balancing reordered them
    mask, _ = select_rollout_batch(ties, valid, ids, selector="raw_kl", ratio=2 / 12, **SETTINGS)
    # Every score ties: earliest position first, then the lowest stable id: samples "a" and "b" at t = 0.
    assert mask.nonzero().tolist() == [[1, 0], [3, 0]]
    assert stable_sample_order(ids) == [1, 3, 0, 2]


def test_stable_ids_survive_a_new_uid_but_tell_prompts_and_rollouts_apart():
    prompts = [[5, 6, 7], [5, 6, 7], [9]]
    first_run = stable_sample_ids(["0_0", "0_1", "0_0"], prompts)
    # A resumed run sees the same prompts and rollouts; verl's batch balancing may reorder rows.
    resumed = stable_sample_ids(["0_1", "0_0", "0_0"], [prompts[1], prompts[0], prompts[2]])
    assert resumed == [first_run[1], first_run[0], first_run[2]]
    assert len(set(first_run)) == 3
    assert first_run[0].endswith("_0_0") and first_run[1].endswith("_0_1")


def test_selection_records_list_each_real_samples_selection_and_scores():
    stats = _stats(3, 4)
    valid = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # row 1: padding
    mask = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    records = selection_records(
        ["b", "p", "a"], [[1], [2], [3, 3]], [[11, 12, 13, 0], [0] * 4, [21, 22, 23, 24]], stats, valid, mask
    )
    assert [r["sample_id"] for r in records] == ["a", "b"]
    assert records[0]["selected"] == [0, 3] and records[1]["selected"] == [1]  # invalid positions dropped
    assert records[1]["response_ids"] == [11, 12, 13] and records[0]["prompt_ids"] == [3, 3]
    assert torch.equal(torch.tensor(records[1]["disagreement"]), stats.disagreement[0, :3])
    assert len(records[0]["entropy"]) == 4


def test_a_dump_read_back_recomputes_the_trainers_selection(tmp_path):
    stats = _stats(5, 9, seed=4)
    valid = torch.ones(5, 9, dtype=torch.bool)
    valid[1, 5:] = False
    valid[3] = False  # a padding row: not dumped
    ids = ["e", "c", "a", "x", "b"]
    mask, _ = select_rollout_batch(stats, valid, ids, selector="teachability", ratio=0.2, **SETTINGS)
    records = selection_records(ids, [[1]] * 5, [[7] * 9] * 5, stats, valid, mask)
    (tmp_path / "step_4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    read_back = load_selection_dump(tmp_path)[4]
    assert read_back == json.loads(json.dumps(records))
    assert selection_from_records(read_back, "teachability", 0.2) == [r["selected"] for r in records]
    assert sum(map(len, selection_from_records(read_back, "teachability", 0.2))) == math.ceil(
        0.2 * int(valid.sum())
    )
    # Another selector gives another selection: the recomputation reads the scores, not `selected`.
    assert selection_from_records(read_back, "entropy", 0.2) != [r["selected"] for r in records]


def test_same_step_and_seed_give_the_same_random_selection():
    stats, valid = _stats(3, 8), torch.ones(3, 8, dtype=torch.bool)
    ids = ["x", "y", "z"]
    first, _ = select_rollout_batch(stats, valid, ids, selector="random", ratio=0.25, **SETTINGS)
    again, _ = select_rollout_batch(stats, valid, ids, selector="random", ratio=0.25, **SETTINGS)
    other_step, _ = select_rollout_batch(
        stats, valid, ids, selector="random", ratio=0.25, **{**SETTINGS, "global_step": 2}
    )
    assert torch.equal(first, again) and not torch.equal(first, other_step)


def test_metrics_compare_selected_with_unselected_positions():
    stats, valid = _stats(4, 16), torch.ones(4, 16, dtype=torch.bool)
    sampled_kl = torch.randn(4, 16)
    mask, metrics = select_rollout_batch(
        stats, valid, list("abcd"), selector="raw_kl", ratio=0.25, sampled_kl=sampled_kl, **SETTINGS
    )
    prefix = "actor/ta_opd/"
    assert metrics[prefix + "disagreement_selected_mean"] > metrics[prefix + "disagreement_unselected_mean"]
    assert abs(metrics[prefix + "sampled_kl_selected_mean"] - float(sampled_kl[mask].mean())) < 1e-6
    assert all(math.isfinite(value) for value in metrics.values())


def test_selection_records_write_extra_fields_only_when_given():
    stats = TokenStatistics(
        torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.0]]), torch.ones(1, 3)
    )
    valid = torch.tensor([[True, True, False]])
    mask = torch.tensor([[False, True, False]])
    (plain,) = selection_records(["s"], [[1, 2]], [[7, 8, 9]], stats, valid, mask)
    assert set(plain) == {
        "sample_id",
        "prompt_ids",
        "response_ids",
        "selected",
        "disagreement",
        "compatibility",
        "entropy",
    }
    extra = {"lower_bound_compatibility": torch.tensor([[0.25, 0.5, 0.0]])}
    (record,) = selection_records(["s"], [[1, 2]], [[7, 8, 9]], stats, valid, mask, extra)
    assert record["lower_bound_compatibility"] == [0.25, 0.5]
    assert record["selected"] == [1] and record["response_ids"] == [7, 8] and record["prompt_ids"] == [1, 2]
    assert math.isclose(record["compatibility"][1], 0.6, rel_tol=1e-6)


def test_the_updates_trained_positions_are_written_per_worker_and_read_back(tmp_path):
    responses = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    trained = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    records = trained_position_records(responses, trained, valid)
    assert records == [{"response_ids": [5, 6, 7], "trained": [1]}, {"response_ids": [8, 9], "trained": [0]}]
    write_trained_positions(tmp_path, 2, records[:1])
    write_trained_positions(tmp_path, 2, records[1:])
    assert load_trained_positions(tmp_path, 2) == records
    assert load_trained_positions(tmp_path, 3) == []


def test_the_dumped_scores_are_what_the_selector_ranked_by_and_the_header_counts_the_selection(tmp_path):
    stats = _stats(4, 7, seed=5)
    valid = torch.ones(4, 7, dtype=torch.bool)
    valid[1, 4:] = False
    valid[2] = False  # a padding row: not dumped
    ids = ["d", "b", "x", "a"]
    selection = dict(selector="random", ratio=0.25, **SETTINGS)
    mask, _ = select_rollout_batch(stats, valid, ids, **selection)
    records, header = selection_dump(ids, [[1]] * 4, [[7] * 7] * 4, stats, valid, mask, **selection)
    write_selection_dump(tmp_path, 1, records, header)
    (read_back,) = load_selection_dump(tmp_path).values()
    assert read_back == json.loads(json.dumps(records))
    # The random draws are the selection's own: the dumped scores' top-n is the selection.
    score = torch.zeros(4, 7, dtype=torch.float64)
    by_id = {record["sample_id"]: record for record in read_back}
    for row, sample_id in enumerate(ids):
        if sample_id in by_id:
            score[row, : len(by_id[sample_id]["score"])] = torch.tensor(by_id[sample_id]["score"])
    assert torch.equal(select_from_scores("random", score, valid, 0.25), mask)
    # D̃ is Eq. 11 over the valid positions: q_low of D maps to 0, q_high to 1, clipped between.
    levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    low, median, high = torch.quantile(stats.disagreement[valid].double(), levels).tolist()
    expected = ((stats.disagreement[0].double() - low) / (high - low + 1e-12)).clamp(0, 1)
    assert torch.allclose(torch.tensor(by_id["d"]["disagreement_norm"], dtype=torch.float64), expected)
    saved = load_selection_header(tmp_path, 1)
    assert saved == json.loads(json.dumps(header))
    assert (saved["selector"], saved["ratio"], saved["step"]) == ("random", 0.25, 1)
    assert saved["kept_positions"] == int(mask.sum()) == math.ceil(0.25 * int(valid.sum()))
    assert saved["kept_fraction"] == saved["kept_positions"] / int(valid.sum())
    assert saved["quantiles"]["disagreement"] == pytest.approx([low, median, high], rel=1e-12)
    assert load_selection_header(tmp_path, 2) is None
