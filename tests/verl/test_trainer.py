"""TA-OPD's trainer on the driver, without Ray: `TAOPDTrainer._select` against an in-memory TransferQueue.
It must select over all real rows of the batch (never batch balancing's padding rows), write exactly that
selection as the update's ``loss_mask``, dump it, and report the step's metrics. (Through verl's real
trainer: tests/e2e/.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from transfer_queue import KVBatchMeta
from verl_fixtures import InMemoryTransferQueue, nested

from ta_opd_verl.batch_selection import (
    load_selection_dump,
    load_selection_header,
    select_rollout_batch,
    stable_sample_ids,
)
from ta_opd_verl.config import TAOPDConfig
from ta_opd_verl.protocol import COMPATIBILITY_FIELD, DISAGREEMENT_FIELD
from ta_opd_verl.teachability import SelectionRules, TokenStatistics
from ta_opd_verl.teachers import ServerTeacher
from ta_opd_verl.trainer import TAOPDTrainer

TOPK = 4
PROMPTS, RESPONSES = (3, 2, 4, 1), (6, 4, 5, 3)
KEYS = ["u7_0_0", "u7_0_1", "u9_0_0", "pad_0_0"]
STUDENT = "/models/student"
TAGS = [{}, {}, {}, {"is_padding": True}]


def _batch_fields(generator: torch.Generator) -> dict:
    fields = {
        "prompts": [],
        "responses": [],
        "response_mask": [],
        DISAGREEMENT_FIELD: [],
        COMPATIBILITY_FIELD: [],
    }
    fields |= {"entropy": [], "old_log_probs": [], "teacher_ids": [], "teacher_logprobs": []}
    for row, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        fields["prompts"].append(torch.randint(0, 50, (p,), generator=generator))
        fields["responses"].append(torch.randint(0, 50, (r,), generator=generator))
        fields["response_mask"].append(torch.ones(r, dtype=torch.int64))
        # The padding row scores highest everywhere: selected unless the trainer leaves it out.
        boost = 100.0 if TAGS[row] else 0.0
        fields[DISAGREEMENT_FIELD].append(torch.rand(r, generator=generator) + boost)
        fields[COMPATIBILITY_FIELD].append(torch.rand(r, generator=generator) + boost)
        fields["entropy"].append(torch.rand(r, generator=generator))
        fields["old_log_probs"].append(-torch.rand(r, generator=generator))
        ids = torch.randint(0, 50, (p + r, TOPK + 1), generator=generator)
        fields["teacher_ids"].append(ids)
        fields["teacher_logprobs"].append(-torch.rand(p + r, TOPK + 1, generator=generator) * 3)
    return {name: nested(rows) for name, rows in fields.items()}


def _trainer(tmp_path, ratio: float, **settings) -> TAOPDTrainer:
    trainer = object.__new__(TAOPDTrainer)
    trainer.teacher = ServerTeacher()
    trainer.ta_opd = TAOPDConfig(ratio=ratio, k=TOPK, selection_dump_dir=str(tmp_path / "dump"), **settings)
    trainer.loss_config = SimpleNamespace(topk=TOPK)
    trainer.global_steps = 3
    trainer.config = OmegaConf.create({"actor_rollout_ref": {"model": {"path": STUDENT}}})
    return trainer


def test_the_update_gets_the_global_selection_over_real_rows_only(tmp_path, monkeypatch):
    queue = InMemoryTransferQueue(_batch_fields(torch.Generator().manual_seed(0))).install(monkeypatch)
    fields = dict(queue.fields)
    trainer, metrics = _trainer(tmp_path, ratio=0.25), {}
    trainer._select(KVBatchMeta(keys=KEYS, tags=TAGS, partition_id="train"), metrics)

    written = queue.fields["loss_mask"].to_padded_tensor(0).bool()
    valid = fields["response_mask"].to_padded_tensor(0).bool()
    valid[3] = False
    stats = TokenStatistics(
        *(fields[name].to_padded_tensor(0.0) for name in (DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, "entropy"))
    )
    sample_ids = stable_sample_ids(["0_0", "0_1", "0_0", "0_0"], [row.tolist() for row in fields["prompts"]])
    expected, _ = select_rollout_batch(
        stats, valid, sample_ids, selector="teachability", ratio=0.25, rules=SelectionRules(),
        seed=0, global_step=3,
    )  # fmt: skip
    assert torch.equal(written, expected)
    assert not written[3].any(), "batch balancing's padding row was selected"
    n_valid = sum(RESPONSES[:3])
    assert int(written.sum()) == math.ceil(0.25 * n_valid) == metrics["actor/ta_opd/kept_positions"]
    assert metrics["actor/ta_opd/valid_positions"] == n_valid

    (records,) = load_selection_dump(tmp_path / "dump").values()
    dumped = {record["sample_id"]: record["selected"] for record in records}
    assert dumped == {sample_ids[row]: written[row].nonzero().flatten().tolist() for row in range(3)}
    header = load_selection_header(tmp_path / "dump", 3)
    assert (header["selector"], header["ratio"], header["student_path"]) == ("teachability", 0.25, STUDENT)
    assert header["kept_positions"] == int(written.sum()) and header["valid_positions"] == n_valid


def test_the_sampled_token_outside_the_teachers_top_k_is_counted(tmp_path, monkeypatch):
    fields = _batch_fields(torch.Generator().manual_seed(1))
    queue = InMemoryTransferQueue(fields).install(monkeypatch)
    trainer, metrics = _trainer(tmp_path, ratio=0.5), {}
    trainer._select(KVBatchMeta(keys=KEYS, tags=TAGS, partition_id="train"), metrics)
    outside, total = 0, 0
    for row in range(3):
        p, r = PROMPTS[row], RESPONSES[row]
        rows = queue.fields["teacher_ids"][row][p - 1 : p + r - 1]
        outside += int((~(rows[:, :TOPK] == rows[:, TOPK:]).any(-1)).sum())
        total += r
    assert metrics["actor/ta_opd/sampled_outside_teacher_topk"] == outside / total
    assert metrics["actor/ta_opd/teacher_is_fsdp"] == 0.0


def test_the_teacher_rows_size_in_transfer_queue_is_measured_as_stored(tmp_path, monkeypatch):
    fields = _batch_fields(torch.Generator().manual_seed(2))
    # verl's teacher servers store int32 ids; the fixture's are int64: each width must show.
    for ids_dtype, id_bytes in ((torch.int32, 4), (torch.int64, 8)):
        fields["teacher_ids"] = nested([rows.to(ids_dtype) for rows in fields["teacher_ids"].unbind()])
        InMemoryTransferQueue(dict(fields)).install(monkeypatch)
        trainer, metrics = _trainer(tmp_path, ratio=0.5), {}
        trainer._select(KVBatchMeta(keys=KEYS, tags=TAGS, partition_id="train"), metrics)
        assert metrics["actor/ta_opd/teacher_rows_bytes_per_token"] == (TOPK + 1) * (id_bytes + 4)


def test_the_authors_normalisation_runs_over_every_response_position(tmp_path, monkeypatch):
    """normalize_over=response: the quantiles take in the positions the response mask leaves out (a tool
    output, say); the selection still only keeps positions the mask allows."""
    fields = _batch_fields(torch.Generator().manual_seed(2))
    masks = [row.clone() for row in fields["response_mask"].unbind()]
    masks[1][1:3] = 0
    fields["response_mask"] = nested(masks)
    # Outliers at the two left-out positions: they set the upper quantile only when they count.
    disagreement = [row.clone() for row in fields[DISAGREEMENT_FIELD].unbind()]
    disagreement[1][1:3] = 50.0
    fields[DISAGREEMENT_FIELD] = nested(disagreement)
    stats = TokenStatistics(
        *(fields[name].to_padded_tensor(0.0) for name in (DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, "entropy"))
    )
    sample_ids = stable_sample_ids(["0_0", "0_1", "0_0", "0_0"], [row.tolist() for row in fields["prompts"]])
    valid = fields["response_mask"].to_padded_tensor(0).bool()
    valid[3] = False
    population = fields["response_mask"].to_padded_tensor(-1) >= 0
    population[3] = False
    written = {}
    for over in ("valid", "response"):
        queue = InMemoryTransferQueue(dict(fields)).install(monkeypatch)
        trainer = _trainer(tmp_path, ratio=0.5, normalize_over=over, selector="tip")
        trainer._select(KVBatchMeta(keys=KEYS, tags=TAGS, partition_id="train"), {})
        written[over] = queue.fields["loss_mask"].to_padded_tensor(0).bool()
        expected, _ = select_rollout_batch(
            stats,
            valid,
            sample_ids,
            selector="tip",
            ratio=0.5,
            rules=trainer.ta_opd.selection_rules(),
            seed=0,
            global_step=3,
            population=population if over == "response" else None,
        )
        assert torch.equal(written[over], expected), over
        assert not (written[over] & ~valid).any()
    assert not torch.equal(written["valid"], written["response"])


def test_setup_prints_and_logs_the_resolved_settings_once(monkeypatch, capsys, caplog):
    """What the preset and the explicit keys resolved to, printed once when the trainer starts; the loss
    callable the workers get carries the same settings."""
    from ta_opd_verl import trainer as trainer_module
    from ta_opd_verl.config import TAOPDDistillationLossConfig

    loss_config = TAOPDDistillationLossConfig(
        loss_mode="k1", topk=16, ta_opd=TAOPDConfig(preset="authors_code", min_keep_per_sample=2)
    )
    monkeypatch.setattr(trainer_module.PPOTrainerSync, "_setup", lambda self: None)
    monkeypatch.setattr(
        trainer_module,
        "distillation_dataclass",
        lambda config: SimpleNamespace(distillation_loss=loss_config),
    )
    monkeypatch.setattr(trainer_module, "actor_dataclass", lambda config: None)
    sent = []
    trainer = object.__new__(TAOPDTrainer)
    trainer.config, trainer.teacher = None, ServerTeacher()
    trainer.actor_rollout_wg = SimpleNamespace(set_loss_fn=sent.append)
    with caplog.at_level("INFO", logger="ta_opd_verl"):
        trainer._setup()
    printed = capsys.readouterr().out
    assert printed.count("distillation.distillation_loss.ta_opd (preset: authors_code):") == 1
    assert "min_keep_per_sample: 2  [set]" in printed and "note: " in printed  # loss_max_clamp=10
    assert printed.strip() in caplog.text
    (loss_fn,) = sent
    assert loss_fn.settings.min_keep_per_sample == 2 and loss_fn.settings.advantage_logprob == "old"


def test_special_token_metrics_count_mapped_positions_and_the_orphan_mass(tmp_path, monkeypatch):
    """With a map in use: the share of valid positions whose sampled id the map changes, and the colocated
    teacher's mean orphan mass over them; a teacher entry turned into the missing-entry filler (log-prob
    -inf) never holds the sampled token."""
    from ta_opd_verl.protocol import TEACHER_ORPHAN_MASS_FIELD
    from ta_opd_verl.special_tokens import SpecialTokenMap
    from ta_opd_verl.teachers import ColocatedFSDPTeacher

    generator = torch.Generator().manual_seed(3)
    fields = _batch_fields(generator)
    responses = [row.clone() for row in fields["responses"].unbind()]
    responses[0][:2] = 7  # the mapped id, at 2 of the 15 valid positions (row 3 is padding)
    responses[3][:] = 7
    fields["responses"] = nested(responses)
    orphan_mass = [torch.rand(r, generator=generator) for r in RESPONSES]
    fields[TEACHER_ORPHAN_MASS_FIELD] = nested(orphan_mass)
    # Row 0's first response position: its sampled token sits in the top-K only as a filler entry.
    ids, logprobs = fields["teacher_ids"].unbind(), fields["teacher_logprobs"].unbind()
    ids[0][PROMPTS[0] - 1] = torch.tensor([0, 1, 2, 3, 0])
    logprobs[0][PROMPTS[0] - 1, 0] = float("-inf")
    fields["teacher_ids"], fields["teacher_logprobs"] = nested(list(ids)), nested(list(logprobs))
    InMemoryTransferQueue(fields).install(monkeypatch)

    trainer = _trainer(tmp_path, ratio=0.5, teacher="fsdp", teacher_path="/models/teacher")
    trainer.teacher = ColocatedFSDPTeacher()
    token_map = SpecialTokenMap(
        entries={7: (3, "end_of_turn")}, teacher_orphans=frozenset({4}), unmapped_student_ids=frozenset()
    )
    trainer.teacher.use_special_token_maps({"/models/teacher": token_map})
    metrics = {}
    trainer._select(KVBatchMeta(keys=KEYS, tags=TAGS, partition_id="train"), metrics)

    n_valid = sum(RESPONSES[:3])
    expected_mapped = sum(int((row == 7).sum()) for row in responses[:3]) / n_valid
    assert math.isclose(metrics["actor/ta_opd/special_token_mapped_share"], expected_mapped, rel_tol=1e-6)
    expected_mass = torch.cat(orphan_mass[:3]).double().mean().item()
    assert math.isclose(metrics["actor/ta_opd/teacher_orphan_mass"], expected_mass, rel_tol=1e-6)
    outside = 0
    for row in range(3):
        p, r = PROMPTS[row], RESPONSES[row]
        rows, values = ids[row][p - 1 : p + r - 1], logprobs[row][p - 1 : p + r - 1]
        present = (rows[:, :TOPK] == rows[:, TOPK:]) & (values[:, :TOPK] > float("-inf"))
        outside += int((~present.any(-1)).sum())
    assert math.isclose(metrics["actor/ta_opd/sampled_outside_teacher_topk"], outside / n_valid, rel_tol=1e-6)
