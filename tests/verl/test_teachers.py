"""The teacher interface (`ta_opd_verl.teachers`): the choice is resolved from one key, and each teacher
does at each stage what the choice implies (checks: tests/verl/test_checks.py; the colocated teacher's
scoring: tests/verl/test_teacher_colocated.py; the server's row extraction: test_teacher_server.py)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from transfer_queue import KVBatchMeta
from verl.trainer.distillation import is_distillation_enabled
from verl.trainer.ppo.utils import need_teacher_policy
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl_fixtures import InMemoryTransferQueue, compose_config, nested

from ta_opd_verl.protocol import (
    SAMPLED_ID_FIELD,
    SAMPLED_LOGPROB_FIELD,
    TEACHER_ID_FIELD,
    TEACHER_LOGPROB_FIELD,
    teacher_entry_fields,
)
from ta_opd_verl.teachers import ColocatedFSDPTeacher, ServerTeacher, resolve_teacher

TEACHER = "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher"
FSDP = [
    "distillation.distillation_loss.ta_opd.teacher=fsdp",
    "distillation.distillation_loss.ta_opd.teacher_path=/nonexistent/fsdp-teacher",
]


def test_the_choice_is_read_from_its_key_with_server_as_verls_default():
    assert isinstance(resolve_teacher(compose_config("ta_opd_cpu", [TEACHER])), ServerTeacher)
    assert isinstance(resolve_teacher(compose_config("opd_cpu", [TEACHER])), ServerTeacher)
    colocated = resolve_teacher(compose_config("ta_opd_cpu", [TEACHER, *FSDP]))
    assert isinstance(colocated, ColocatedFSDPTeacher)
    # The teacher uses the student's attention kernel: the CPU runtime's sdpa here.
    assert colocated.attn_implementation == "sdpa"
    assert pickle.loads(pickle.dumps(colocated)).attn_implementation == "sdpa"


def test_each_teacher_names_the_model_folders_it_reads():
    config = compose_config("ta_opd_cpu", [TEACHER, *FSDP])
    assert ColocatedFSDPTeacher().model_paths(config) == {
        "distillation.distillation_loss.ta_opd.teacher_path": "/nonexistent/fsdp-teacher"
    }
    assert ColocatedFSDPTeacher().vllm_model_paths(config) == {}
    served = {"distillation.teacher_models.teacher_model.model_path": "/nonexistent/teacher"}
    assert ServerTeacher().model_paths(config) == ServerTeacher().vllm_model_paths(config) == served


def test_the_colocated_teacher_turns_off_verls_teacher_servers():
    """verl starts its teacher pool and servers (``need_teacher_policy``) and the agent loop asks them
    (``is_distillation_enabled``) from the same switch; the colocated teacher turns it off before verl reads
    the config, and TA-OPD's loss settings still build from the same block."""
    config = compose_config("ta_opd_cpu", [TEACHER, *FSDP])
    assert need_teacher_policy(config)
    resolve_teacher(config).prepare_config(config)
    assert not need_teacher_policy(config)
    assert not is_distillation_enabled(config.distillation)
    distillation = omega_conf_to_dataclass(config.distillation)
    assert distillation.distillation_loss.ta_opd.teacher == "fsdp"
    assert math.isclose(distillation.distillation_loss.ta_opd.teacher_temperature, 1.0)


def test_the_server_teacher_leaves_verls_teacher_on_and_installs_its_replica(monkeypatch):
    config = compose_config("ta_opd_cpu", [TEACHER])
    teacher = resolve_teacher(config)
    teacher.prepare_config(config)
    assert need_teacher_policy(config)
    registered = {}
    monkeypatch.setattr(
        RolloutReplicaRegistry, "register", lambda name, loader: registered.update({name: loader})
    )
    teacher.install()
    assert list(registered) == ["vllm"] and callable(registered["vllm"])
    assert teacher.update_leaves_out(16) == [] and teacher.score_fields(None, 16) == []


def test_the_colocated_teacher_stores_its_rows_where_the_update_reads_them(monkeypatch):
    """After the scoring forward the per-token fields become ``teacher_ids`` / ``teacher_logprobs`` rows
    (top-K then the sampled token), and the update is told to leave the per-token copies out."""
    topk, lengths = 3, (4, 2)
    generator = torch.Generator().manual_seed(5)
    fields = {}
    for name in teacher_entry_fields(topk):
        rows = [torch.randint(0, 50, (n,), generator=generator) for n in lengths]
        fields[name] = nested([-row.float() / 10 for row in rows] if "logprob" in name else rows)
    queue = InMemoryTransferQueue(fields).install(monkeypatch)
    teacher = ColocatedFSDPTeacher()
    batch = teacher.after_scoring(KVBatchMeta(keys=["a", "b"], tags=[{}, {}], partition_id="train"), topk)

    assert {"teacher_ids", "teacher_logprobs"} <= set(batch.fields)
    stored = queue.fields
    for sample, length in enumerate(lengths):
        ids, logprobs = stored["teacher_ids"][sample], stored["teacher_logprobs"][sample]
        assert ids.shape == logprobs.shape == (length, topk + 1)
        for i in range(topk):
            assert torch.equal(ids[:, i].long(), stored[TEACHER_ID_FIELD.format(i)][sample])
            assert torch.equal(logprobs[:, i], stored[TEACHER_LOGPROB_FIELD.format(i)][sample])
        assert torch.equal(ids[:, topk].long(), stored[SAMPLED_ID_FIELD][sample])
        assert torch.equal(logprobs[:, topk], stored[SAMPLED_LOGPROB_FIELD][sample])
    assert set(teacher.update_leaves_out(topk)) == set(teacher_entry_fields(topk))


@pytest.mark.parametrize("teacher", [ServerTeacher(), ColocatedFSDPTeacher("sdpa")], ids=["server", "fsdp"])
def test_teachers_travel_to_the_workers_inside_the_loss_callable(teacher):
    assert type(pickle.loads(pickle.dumps(teacher))) is type(teacher)
