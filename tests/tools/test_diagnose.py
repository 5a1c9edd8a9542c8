"""`ta-opd diagnose`: the statistics on banks whose answer is known by construction, the prompt-clustered
bootstrap, the bank's round trip to disk, the bank forwards and training loop on the tiny pair, the
checkpoint errors, and one small end-to-end run of the command."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from ta_opd_verl.cli.main import main as ta_opd
from ta_opd_verl.diagnose import analysis, diagnostic
from ta_opd_verl.diagnose.bank import Bank, BankError, load_bank, read_prompts, sample_bank, save_bank
from ta_opd_verl.diagnose.main import main as diagnose
from ta_opd_verl.diagnose.models import CheckpointError, check_trained_checkpoint, response_logits
from ta_opd_verl.diagnose.passes import PassSettings, score_initial
from ta_opd_verl.diagnose.scoring import bank_scores, divergences, statistics_at, support_statistics
from ta_opd_verl.diagnose.train import TrainSettings, train_on_bank
from ta_opd_verl.teachability import select_positions
from ta_opd_verl.tiny.build import build_tiny_pair

K = 4


# ---- statistics against hand-computed cases ------------------------------------------------------


def test_spearman_hand_computed():
    # No ties: 1 - 6 Σd² / (n(n² - 1)) with d = (0, 1, -1, 0): 1 - 12 / 60.
    assert analysis.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    # Ties take average ranks: x ranks (1.5, 1.5, 3, 4), y ranks (1, 2, 3, 4); Pearson of those.
    x_ranks, y_ranks = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([1.0, 2, 3, 4])
    xc, yc = x_ranks - x_ranks.mean(), y_ranks - y_ranks.mean()
    expected = float((xc * yc).sum() / (xc.norm() * yc.norm()))
    assert analysis.spearman(
        torch.tensor([5.0, 5, 7, 9]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    ) == pytest.approx(expected)
    assert math.isnan(analysis.spearman(torch.ones(4), torch.arange(4.0)))


def test_weighted_statistics_equal_the_resample_written_out():
    """A weight w on a row must give exactly the statistic of the data with that row repeated w times."""
    generator = torch.Generator().manual_seed(0)
    n = 30
    x = torch.randint(0, 6, (n,), generator=generator).double()  # ties on purpose
    y = x + torch.randn(n, generator=generator, dtype=torch.float64)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    weights = torch.randint(0, 4, (n,), generator=generator)
    expanded = torch.repeat_interleave(torch.arange(n), weights)
    w = weights.double().unsqueeze(0)

    assert float(analysis.weighted_spearman(x, y)(w)[0]) == pytest.approx(
        analysis.spearman(x[expanded], y[expanded])
    )
    regression = analysis.standardised_regression(y, {"x": x, "z": z})
    expected = analysis.standardised_regression(y[expanded], {"x": x[expanded], "z": z[expanded]})
    ones = torch.ones(1, expanded.numel(), dtype=torch.float64)
    torch.testing.assert_close(regression(w), expected(ones))
    group = x > 2
    means = analysis.group_means(y, {"high": group})(w)
    assert float(means[0, 0]) == pytest.approx(float(y[expanded][group[expanded]].mean()))


def test_standardised_regression_recovers_coefficients():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, generator=generator), torch.randn(2000, generator=generator)
    target = 3.0 * a - 1.0 * b  # noiseless: standardised betas 3/√10 and -1/√10, R² = 1
    result = analysis.standardised_regression(target, {"a": a, "b": b})(
        torch.ones(1, 2000, dtype=torch.float64)
    )
    torch.testing.assert_close(
        result[0],
        torch.tensor([3 / math.sqrt(10), -1 / math.sqrt(10), 1.0], dtype=torch.float64),
        atol=0.02,
        rtol=0,
    )


def _synthetic_bank(gain_of, seed: int = 0, rollouts: int = 80, length: int = 12):
    """Random D, C, H on a bank with ragged responses; the gain is `gain_of(D̃, C̃)` plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (rollouts,), generator=generator)
    valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    shape = (rollouts, length)
    disagreement = 3 * torch.rand(shape, generator=generator)
    compatibility = torch.rand(shape, generator=generator)
    grids = {
        f"disagreement@{K}": disagreement,
        f"compatibility@{K}": compatibility,
        f"compatibility_lower_bound@{K}": 0.9 * compatibility,
        "entropy": 2 * torch.rand(shape, generator=generator),
        "teacher_entropy": torch.rand(shape, generator=generator),
        "reverse_kl": torch.rand(shape, generator=generator),
    }
    scores = bank_scores(grids, valid, K)
    gain = gain_of(scores["D_norm"], scores["C_norm"]) + 0.01 * torch.randn(shape, generator=generator)
    grids["forward_kl"] = gain + 1.0 + torch.rand(shape, generator=generator)  # KL0 > G: KLτ stays positive
    view = diagnostic.BankView.of(valid, torch.arange(rollouts) // 2)  # 2 rollouts per prompt
    return view, grids, gain


SETTINGS = dict(q_low=0.05, q_high=0.95, resamples=200, seed=0)


def test_teachability_wins_when_the_gain_is_learnable_disagreement():
    view, grids, gain = _synthetic_bank(lambda d, c: d * c)
    spearman = diagnostic.correlations(view, grids, gain, (K,), **SETTINGS)["by_k"][str(K)]
    assert spearman["teachability"]["estimate"] > 0.95
    assert spearman["teachability"]["estimate"] > spearman["raw_kl"]["estimate"] + 0.1
    assert spearman["teachability_minus_raw_kl"]["low"] > 0
    regression = diagnostic.regressions(view, grids, gain, (K,), **SETTINGS)[str(K)]
    assert regression["beta_l_minus_beta_i"]["low"] > 0
    assert regression["delta_r2"]["low"] > 0
    q3 = diagnostic.q3_gaps(view, grids, gain, (K,), **SETTINGS)[str(K)]
    assert q3["gap"]["low"] > 0 and q3["top_third_mean_c"] > q3["bottom_third_mean_c"]


def test_raw_kl_wins_when_the_gain_ignores_compatibility():
    view, grids, gain = _synthetic_bank(lambda d, c: d, seed=1)
    spearman = diagnostic.correlations(view, grids, gain, (K,), **SETTINGS)["by_k"][str(K)]
    assert spearman["raw_kl"]["estimate"] > 0.95
    assert spearman["teachability_minus_raw_kl"]["high"] < 0
    # C is irrelevant to this gain: inside Q3 the top and bottom thirds by C gain alike.
    q3 = diagnostic.q3_gaps(view, grids, gain, (K,), **SETTINGS)[str(K)]
    assert q3["gap"]["low"] < 0 < q3["gap"]["high"]


def test_matched_top_n_and_masked_run_are_the_means_over_the_mask():
    view, grids, gain = _synthetic_bank(lambda d, c: d * c, seed=2)
    stats_mask = select_positions("teachability", _statistics(grids), view.valid, 0.1)
    table = diagnostic.masked_means(
        view, gain, grids["forward_kl"], {"teachability@0.1": stats_mask}, resamples=50, seed=0
    )
    cell = table["teachability@0.1"]
    assert cell["positions"] == math.ceil(0.1 * view.size)
    assert cell["mean_gain"]["estimate"] == pytest.approx(float(gain[stats_mask].double().mean()))
    relative = float(gain[stats_mask].double().sum() / grids["forward_kl"][stats_mask].double().sum())
    assert cell["relative_gain"]["estimate"] == pytest.approx(relative)

    kl_trained = grids["forward_kl"] - gain
    run = diagnostic.masked_training_run(
        view, grids["forward_kl"], kl_trained, stats_mask, [1.0, 0.5], resamples=50, seed=0
    )
    assert run["kept"] == cell["positions"] and run["keep_ratio"] == pytest.approx(run["kept"] / view.size)
    assert run["gain_per_kept_token"] == pytest.approx(float(gain[view.valid].double().sum()) / run["kept"])
    assert run["mean_gain"]["estimate"] == pytest.approx(float(gain[view.valid].double().mean()))


def _statistics(grids):
    return statistics_at(grids, K)


# ---- the prompt-clustered bootstrap --------------------------------------------------------------


def test_bootstrap_resamples_whole_prompts():
    clusters = torch.tensor([7, 7, 7, 3, 3, 9])
    for weights in analysis.cluster_weights(clusters, 50, torch.Generator().manual_seed(0), chunk=20):
        assert torch.equal(weights[:, 0], weights[:, 1]) and torch.equal(weights[:, 1], weights[:, 2])
        assert torch.equal(weights[:, 3], weights[:, 4])
        # As many prompts are drawn as there are: the weights of one row per prompt sum to 3.
        assert torch.all(weights[:, [0, 3, 5]].sum(-1) == 3)
    # Two prompts of two rows, one all 0, one all 1: drawing prompts, a mean can only be 0, 1/2 or 1
    # (drawing rows would also give 1/4 and 3/4).
    values = torch.tensor([0.0, 0.0, 1.0, 1.0])
    statistic = analysis.group_means(values, {"all": torch.ones(4, dtype=torch.bool)})
    draws = analysis.clustered_bootstrap(statistic, torch.tensor([0, 0, 1, 1]), resamples=100).draws
    assert set(draws[:, 0].tolist()) <= {0.0, 0.5, 1.0}


def test_duplicating_a_prompts_rows_does_not_shrink_the_interval():
    generator = torch.Generator().manual_seed(3)
    prompts, rows_per_prompt = 40, 5
    clusters = torch.arange(prompts).repeat_interleave(rows_per_prompt)
    values = torch.randn(prompts, generator=generator).repeat_interleave(rows_per_prompt) + 0.3 * torch.randn(
        prompts * rows_per_prompt, generator=generator
    )

    def interval(vals, clus):
        result = analysis.clustered_bootstrap(
            analysis.group_means(vals, {"all": torch.ones_like(vals, dtype=torch.bool)}),
            clus,
            resamples=400,
            seed=1,
        )
        return float(result.low[0]), float(result.high[0])

    original = interval(values, clusters)
    duplicated_values, duplicated_clusters = values.repeat_interleave(2), clusters.repeat_interleave(2)
    assert interval(duplicated_values, duplicated_clusters) == pytest.approx(original)
    # Treating each duplicated row as its own unit pretends to twice the data: a much narrower interval.
    naive = interval(duplicated_values, torch.arange(duplicated_values.numel()))
    assert naive[1] - naive[0] < 0.6 * (original[1] - original[0])


# ---- scoring math --------------------------------------------------------------------------------


def test_divergences_and_support_statistics_by_hand():
    student = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    teacher = torch.log(torch.tensor([[0.1, 0.2, 0.6, 0.1]]))
    p, q = student.exp()[0], teacher.exp()[0]
    values = divergences(student, teacher)
    assert float(values["forward_kl"][0]) == pytest.approx(float((q * (q / p).log()).sum()), rel=1e-5)
    assert float(values["reverse_kl"][0]) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert float(values["entropy"][0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert float(values["teacher_entropy"][0]) == pytest.approx(float(-(q * q.log()).sum()), rel=1e-5)
    support = support_statistics(student, teacher, (2,), values["entropy"])
    # Student top-2 = {0, 1}: exact C = 0.1 + 0.2; teacher top-2 = {2, 1}: lower bound counts only id 1.
    assert float(support["compatibility@2"][0]) == pytest.approx(0.3, rel=1e-5)
    assert float(support["compatibility_lower_bound@2"][0]) == pytest.approx(0.2, rel=1e-5)
    # U = {0, 1, 2}: D = KL(teacher renormalised on U || student renormalised on U).
    t_u, s_u = q[:3] / q[:3].sum(), p[:3] / p[:3].sum()
    assert float(support["disagreement@2"][0]) == pytest.approx(
        float((t_u * (t_u / s_u).log()).sum()), rel=1e-5
    )


# ---- bank, forwards and training on the tiny pair ------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    pair = build_tiny_pair(quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(pair.student)
    student = AutoModelForCausalLM.from_pretrained(pair.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher).eval()
    prompts = read_prompts(pair.train_parquet, 3)
    bank = sample_bank(
        student, tokenizer, prompts, samples_per_prompt=2, response_tokens=8, seed=0, batch_size=4
    )
    return pair, tokenizer, student, teacher, bank


def test_bank_round_trips_to_disk(tmp_path):
    bank = Bank(
        prompt_index=(0, 0, 5),
        sample=(0, 1, 0),
        prompts=(({"role": "user", "content": "say 4071 — ü"},),) * 2
        + (({"role": "user", "content": "x"},),),
        prompt_ids=((1, 2, 3), (1, 2, 3), (4,)),
        response_ids=((9, 8), (7,), (6, 5, 4)),
        settings={"format": 1, "response_tokens": 3, "seed": 0},
    )
    assert load_bank(save_bank(bank, tmp_path / "bank.parquet")) == bank
    assert bank.valid_mask().tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_bank_file_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(BankError, match="does not exist"):
        load_bank(tmp_path / "missing.parquet")
    plain = tmp_path / "plain.parquet"
    pd.DataFrame(
        {"prompt_index": [0], "sample": [0], "prompt": ["[]"], "prompt_ids": [[1]], "response_ids": [[2]]}
    ).to_parquet(plain)
    with pytest.raises(BankError, match=f"{plain}.*ta_opd_bank"):
        load_bank(plain)
    no_prompt = tmp_path / "data.parquet"
    pd.DataFrame({"question": ["hi"]}).to_parquet(no_prompt)
    with pytest.raises(BankError, match=f"{no_prompt}.*'prompt'"):
        read_prompts(no_prompt, 4)


def test_sampled_bank_round_trips_and_keeps_its_settings(tiny, tmp_path):
    _, tokenizer, _, _, bank = tiny
    assert bank.prompt_index == (0, 0, 1, 1, 2, 2) and bank.sample == (0, 1) * 3
    assert all(1 <= len(r) <= 8 for r in bank.response_ids)
    assert bank.settings["response_tokens"] == 8 and bank.settings["samples_per_prompt"] == 2
    text = tokenizer.apply_chat_template(list(bank.prompts[0]), tokenize=False, add_generation_prompt=True)
    assert list(bank.prompt_ids[0]) == tokenizer(text, add_special_tokens=False).input_ids
    assert load_bank(save_bank(bank, tmp_path / "bank.parquet")) == bank


def test_response_logits_do_not_depend_on_padding(tiny):
    _, tokenizer, student, _, bank = tiny
    with torch.no_grad():
        batched = response_logits(student, bank, slice(0, bank.rollouts), tokenizer.pad_token_id)
        for row in range(bank.rollouts):
            prompt, response = bank.prompt_ids[row], bank.response_ids[row]
            alone = student(input_ids=torch.tensor([prompt + response])).logits[0]
            expected = alone[len(prompt) - 1 : len(prompt) - 1 + len(response)]
            torch.testing.assert_close(batched[row, : len(response)], expected, atol=1e-4, rtol=1e-4)


def test_masked_training_moves_the_student_and_micro_batches_add_up(tiny, monkeypatch):
    _, tokenizer, student, teacher, bank = tiny
    settings = PassSettings(
        batch_size=4,
        vocab_size=431,
        pad_id=tokenizer.pad_token_id,
        device="cpu",
        dtype=torch.float32,
        quiet=True,
    )
    grids, entries = score_initial(student, teacher, bank, (K,), 16, settings, "test")
    valid = bank.valid_mask()
    mask = select_positions("teachability", _statistics(grids), valid, 0.3)
    common = dict(
        pad_id=tokenizer.pad_token_id, vocab_size=431, device="cpu", dtype=torch.float32, quiet=True
    )

    def train(name, **train_settings):
        return train_on_bank(
            student, bank, mask, entries, TrainSettings(**train_settings), name=name, **common
        )

    def moved(model):
        return any(
            not torch.equal(a, b) for a, b in zip(model.parameters(), student.parameters(), strict=True)
        )

    for loss in ("reverse_kl_topk", "pg_k1"):
        trained, losses = train("adam", steps=3, lr=1e-3, loss=loss)
        assert moved(trained)
        if loss == "reverse_kl_topk":
            assert losses[-1] < losses[0]
        # Micro-batches add up to the whole batch's gradient. Compared through one unclipped plain-SGD
        # step of lr 1, whose update IS the gradient: Adam's first update is about lr * sign(gradient),
        # which turns rounding-level differences of near-zero gradient entries into lr-sized ones.
        with monkeypatch.context() as patch:
            patch.setattr(torch.optim, "Adam", torch.optim.SGD)
            sgd = dict(steps=1, lr=1.0, loss=loss, grad_clip=1e9)
            whole, _ = train("whole", micro_batch=64, **sgd)
            split, _ = train("split", micro_batch=1, **sgd)
        for a, b, initial in zip(whole.parameters(), split.parameters(), student.parameters(), strict=True):
            gradient_whole, gradient_split = initial.detach() - a.detach(), initial.detach() - b.detach()
            torch.testing.assert_close(gradient_split, gradient_whole, atol=1e-6, rtol=1e-4)
        assert moved(whole)


# ---- checkpoint errors ---------------------------------------------------------------------------


def test_checkpoint_errors_name_the_path_and_key(tiny, tmp_path):
    pair = tiny[0]
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
        check_trained_checkpoint(missing, pair.teacher, 431)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty}.*config.json"):
        check_trained_checkpoint(empty, pair.teacher, 431)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((pair.student / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{wrong} has config.json but no weights.*model_merger"):
        check_trained_checkpoint(wrong, pair.teacher, 431)
    (wrong / "model.safetensors").write_bytes((pair.student / "model.safetensors").read_bytes())
    check_trained_checkpoint(wrong, pair.teacher, 431)
    (wrong / "config.json").write_text(json.dumps({**config, "vocab_size": 500}))
    with pytest.raises(CheckpointError, match=r"wrong/config.json: vocab_size 500 .*431.*teacher"):
        check_trained_checkpoint(wrong, pair.teacher, 431)
    (wrong / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match="'vocab_size'"):
        check_trained_checkpoint(wrong, pair.teacher, 431)


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "ckpt"
    assert (
        ta_opd(["diagnose", "--trained", str(missing), "--skip-training", "--out", str(tmp_path / "out")])
        == 2
    )
    assert f"trained student checkpoint {missing} does not exist" in capsys.readouterr().err


# ---- end to end ----------------------------------------------------------------------------------


def test_diagnose_end_to_end_on_the_tiny_pair(tmp_path):
    out = tmp_path / "out"
    argv = [
        "--rollouts",
        "8",
        "--samples-per-prompt",
        "2",
        "--response-tokens",
        "12",
        "--k",
        "4",
        "8",
        "--selectors",
        "teachability",
        "random",
        "--budgets",
        "0.1",
        "--train-steps",
        "2",
        "--bootstrap",
        "30",
        "--out",
        str(out),
        "--quiet",
    ]
    assert diagnose(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == summary["bank"]["positions"] and summary["bank"]["prompts"] == 4
    assert set(summary["masked_training"]) == {"full", "teachability@0.1", "random@0.1"}
    assert (tokens["gain"] - (tokens["forward_kl_0"] - tokens["forward_kl_tau"])).abs().max() < 1e-5
    assert {"gain[teachability@0.1]", "D_L@8", "C_lower_bound@4"} <= set(tokens.columns)
    for name in ("report.md", "gain_vs_scores.png", "dl_di_plane.png", "budget_curve.png", "bank.parquet"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "ABSOLUTE" in report and "Table 2" in report and "teachability_minus_raw_kl" in report
    # The saved bank reproduces the run's positions when passed back with --bank.
    assert load_bank(out / "bank.parquet").valid_mask().sum() == len(tokens)


def test_trained_checkpoint_equal_to_the_initial_student_gains_nothing(tmp_path):
    """θτ = θ0 (the student folder itself): G is 0 at every position, and the report still writes."""
    out = tmp_path / "out"
    student = build_tiny_pair(quiet=True).student
    argv = [
        "--trained",
        str(student),
        "--skip-training",
        "--rollouts",
        "6",
        "--response-tokens",
        "10",
        "--k",
        "4",
        "--bootstrap",
        "20",
        "--out",
        str(out),
        "--quiet",
    ]
    assert diagnose(argv) == 0
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens["gain"].abs().max() < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masked_training"] == {} and summary["models"]["theta_tau"] == f"checkpoint {student}"
    assert "n/a" in (out / "report.md").read_text()  # correlations with a constant gain are undefined
