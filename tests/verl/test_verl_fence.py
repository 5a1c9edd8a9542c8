"""The fence around verl's internals (`ta_opd_verl.verl_fence`): the pinned version, the source
fingerprints of every verl function we copy or rely on, and the internals it interprets (key format,
padding tags)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transfer_queue import KVBatchMeta

from ta_opd_verl import verl_fence
from ta_opd_verl.verl_fence import (
    FINGERPRINTS,
    VERL_VERSION,
    VerlVersionError,
    check_verl_version,
    fingerprinted_modules,
    source_fingerprint,
)
from ta_opd_verl.verl_fence.__main__ import main as fingerprint_report
from ta_opd_verl.verl_fence.transfer_queue import not_padding_rows, rollout_ids


@pytest.fixture(scope="module", autouse=True)
def every_fingerprint():
    fingerprinted_modules()


def test_the_installed_verl_is_the_pinned_version():
    assert importlib.metadata.version("verl") == VERL_VERSION
    check_verl_version()


def test_another_verl_version_is_refused_naming_the_pin(monkeypatch):
    monkeypatch.setattr(verl_fence.importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(VerlVersionError, match=r"installed: verl 0\.10\.0.*pip install verl==0\.9\.1"):
        check_verl_version()


def test_every_verl_function_we_copy_or_rely_on_is_unchanged():
    """A verl upgrade that changes any of them fails here, naming each one, before any run trains wrong."""
    assert len(FINGERPRINTS) >= 20
    changed = [name for name, recorded in FINGERPRINTS.items() if source_fingerprint(name) != recorded]
    assert changed == [], f"verl changed under the fence: {changed} (python -m ta_opd_verl.verl_fence)"


def test_a_changed_function_is_reported(monkeypatch, capsys):
    name = "verl.trainer.ppo.v1.trainer_base:PPOTrainer._update_actor"
    monkeypatch.setitem(FINGERPRINTS, name, "0" * 16)
    assert fingerprint_report() == 1
    assert f"CHANGED {source_fingerprint(name)} {name}" in capsys.readouterr().out


def test_rollout_ids_drop_the_per_run_uid_of_transfer_queue_keys():
    batch = KVBatchMeta(keys=["3f2a_0_0", "3f2a_0_1", "b71c_2_0", "odd"], tags=[{}] * 4, partition_id="train")
    assert rollout_ids(batch) == ["0_0", "0_1", "2_0", "odd"]


def test_padding_rows_are_told_by_their_tag():
    batch = KVBatchMeta(
        keys=["a", "b", "c"], tags=[{}, {"is_padding": True}, {"is_padding": False}], partition_id="t"
    )
    assert torch.equal(not_padding_rows(batch), torch.tensor([True, False, True]))
