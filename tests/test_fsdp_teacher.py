"""The colocated FSDP teacher (``ta_opd.teacher=fsdp``, ta_opd_verl/fsdp_teacher.py) without verl's trainer:
the scoring processor with the real tiny teacher on a micro-batch in verl's layout, checked against a full
softmax of the teacher computed here sequence by sequence; the teacher rows the trainer stores; the
configuration checks; and the switch that keeps verl's teacher servers from starting."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from verl_fixtures import compose_config, nested, teacher_with_swapped_tokens

from ta_opd_verl.checks import TAOPDConfigError, check_model_paths, check_ta_opd_config
from ta_opd_verl.fsdp_teacher import (
    SAMPLED_ID_FIELD,
    SAMPLED_LOGPROB_FIELD,
    TEACHER_ID_FIELD,
    TEACHER_LOGPROB_FIELD,
    stack_teacher_rows,
    teacher_entry_fields,
)
from ta_opd_verl.loss import (
    COMPATIBILITY_FIELD,
    DISAGREEMENT_FIELD,
    SCORE_PHASE,
    TAOPDLossFunction,
    split_teacher_entries,
)

TOPK, K = 16, 8
LENGTHS = (7, 12, 5, 9)
# DistillationConfig validates verl's teacher entry while distillation.enabled=true; the fsdp teacher
# never loads it.
UNUSED_SERVER_TEACHER = "distillation.teacher_models.teacher_model.model_path=/nonexistent/teacher"


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair(quiet=True)


def _fsdp_overrides(teacher_path, *extra: str) -> list[str]:
    return [
        UNUSED_SERVER_TEACHER,
        "distillation.distillation_loss.ta_opd.teacher=fsdp",
        f"distillation.distillation_loss.ta_opd.teacher_path={teacher_path}",
        f"distillation.distillation_loss.topk={TOPK}",
        f"distillation.distillation_loss.ta_opd.k={K}",
        *extra,
    ]


def _loss_fn(teacher_path, compatibility: str) -> TAOPDLossFunction:
    from verl.utils.config import omega_conf_to_dataclass

    config = compose_config(
        "ta_opd_cpu",
        _fsdp_overrides(teacher_path, f"distillation.distillation_loss.ta_opd.compatibility={compatibility}"),
    )
    return TAOPDLossFunction(
        omega_conf_to_dataclass(config.actor_rollout_ref.actor),
        omega_conf_to_dataclass(config.distillation),
        teacher_attn_implementation="sdpa",
    )


def _micro_batch(vocab: int, use_remove_padding: bool, seed: int = 0):
    """A scoring micro-batch as ``FSDPEngineWithLMHead.prepare_model_outputs`` hands it to the processor:
    nested ``input_ids`` / ``position_ids`` (one row per sequence, no padding) and the non-tensor flags."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, vocab, (length,), generator=generator) for length in LENGTHS]
    data = TensorDict(
        {"input_ids": nested(sequences), "position_ids": nested([torch.arange(n) for n in LENGTHS])},
        batch_size=len(LENGTHS),
    )
    tu.assign_non_tensor(
        data, ta_opd_phase=SCORE_PHASE, use_remove_padding=use_remove_padding, pad_token_id=0, temperature=1.0
    )
    return data, sequences


def _reference(teacher, sequences, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent float64 computation from the definitions: the teacher run on each sequence alone, full
    softmax; S = student top-k, T = teacher top-k, U = S ∪ T; exact C = Σ_S p_T; D = KL(p̄_T || p̄_S) on U."""
    with torch.no_grad():
        teacher_log_probs = torch.cat(
            [torch.log_softmax(teacher(s.unsqueeze(0)).logits[0].double(), -1) for s in sequences]
        )
    student_log_probs = torch.log_softmax(student_logits[0].double(), -1)
    sampled = torch.roll(torch.cat(sequences), -1)
    s_ids = torch.topk(student_logits[0], K, dim=-1).indices
    t_ids = torch.topk(teacher_log_probs, K, dim=-1).indices
    disagreement, compatibility = [], []
    for row in range(sampled.numel()):
        union = sorted(set(s_ids[row].tolist()) | set(t_ids[row].tolist()))
        p_t = teacher_log_probs[row, union].exp()
        p_s = student_log_probs[row, union].exp()
        p_t, p_s = p_t / p_t.sum(), p_s / p_s.sum()
        disagreement.append((p_t * (p_t.log() - p_s.clamp_min(1e-12).log())).sum())
        compatibility.append(teacher_log_probs[row, s_ids[row]].exp().sum())
    top = torch.topk(teacher_log_probs, TOPK, dim=-1)
    return {
        "disagreement": torch.stack(disagreement),
        "compatibility": torch.stack(compatibility),
        "lower_bound": torch.stack(
            [
                teacher_log_probs[row, sorted(set(s_ids[row].tolist()) & set(top.indices[row].tolist()))]
                .exp()
                .sum()
                for row in range(sampled.numel())
            ]
        ),
        "top_ids": top.indices,
        "top_logprobs": top.values,
        "sampled_ids": sampled,
        "sampled_logprobs": teacher_log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1),
    }


@pytest.fixture(scope="module")
def teacher_model(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_scoring_processor_gives_exact_compatibility_and_the_teachers_rows(
    pair, teacher_model, use_remove_padding
):
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(1)) * 3
    outputs = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    reference = _reference(teacher_model, sequences, student_logits)

    assert set(outputs) == {DISAGREEMENT_FIELD, COMPATIBILITY_FIELD, *teacher_entry_fields(TOPK)}
    for value in outputs.values():
        # verl's prepare_model_outputs asserts one value per packed token.
        assert value.shape == (1, sum(LENGTHS))
    compatibility = outputs[COMPATIBILITY_FIELD][0].double()
    torch.testing.assert_close(compatibility, reference["compatibility"], rtol=1e-5, atol=1e-5)
    # Exact C is not the lower bound here: the teacher puts mass on student candidates outside its top-16.
    assert (reference["compatibility"] - reference["lower_bound"]).max() > 1e-3
    torch.testing.assert_close(
        outputs[DISAGREEMENT_FIELD][0].double(), reference["disagreement"], rtol=1e-4, atol=2e-5
    )
    top_ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][0] for i in range(TOPK)], -1)
    top_logprobs = torch.stack([outputs[TEACHER_LOGPROB_FIELD.format(i)][0] for i in range(TOPK)], -1)
    assert torch.equal(top_ids, reference["top_ids"])
    torch.testing.assert_close(top_logprobs.double(), reference["top_logprobs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[SAMPLED_ID_FIELD][0], reference["sampled_ids"])
    torch.testing.assert_close(
        outputs[SAMPLED_LOGPROB_FIELD][0].double(), reference["sampled_logprobs"], rtol=0, atol=2e-5
    )


def test_lower_bound_mode_uses_only_the_teachers_top_k(pair, teacher_model):
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding=False, seed=2)
    student_logits = torch.randn(1, sum(LENGTHS), vocab, generator=torch.Generator().manual_seed(3)) * 3
    outputs = _loss_fn(pair.teacher, "lower_bound")(student_logits=student_logits, data=data)
    reference = _reference(teacher_model, sequences, student_logits)
    torch.testing.assert_close(
        outputs[COMPATIBILITY_FIELD][0].double(), reference["lower_bound"], rtol=0, atol=2e-5
    )


def test_stored_teacher_rows_have_the_teacher_servers_layout(pair, teacher_model):
    """What the trainer writes to ``teacher_ids`` / ``teacher_logprobs`` from the per-token fields verl
    collects (nested by sequence): top-K then the sampled token, row t for token t + 1, read back by the
    loss's ``split_teacher_entries`` exactly as a teacher server's rows."""
    vocab = teacher_model.config.vocab_size
    data, sequences = _micro_batch(vocab, use_remove_padding=True, seed=4)
    student_logits = torch.randn(1, sum(LENGTHS), vocab)
    outputs = _loss_fn(pair.teacher, "exact")(student_logits=student_logits, data=data)
    offsets = data["input_ids"].offsets()
    collected = {
        name: torch.nested.nested_tensor_from_jagged(value[0], offsets) for name, value in outputs.items()
    }
    teacher_ids, teacher_logprobs = stack_teacher_rows(collected, TOPK)
    assert teacher_ids.dtype == torch.int32 and teacher_logprobs.dtype == torch.float32
    reference = _reference(teacher_model, sequences, student_logits)
    start = 0
    for sequence, ids, logprobs in zip(
        sequences, teacher_ids.unbind(), teacher_logprobs.unbind(), strict=True
    ):
        rows = slice(start, start + sequence.numel())
        assert ids.shape == logprobs.shape == (sequence.numel(), TOPK + 1)
        top_ids, top_logprobs, sampled = split_teacher_entries(ids, logprobs, TOPK)
        # Row t holds the next token t + 1 (the last row's is the next sequence's first: never a response).
        assert torch.equal(ids[:-1, TOPK].long(), sequence[1:])
        assert torch.equal(top_ids.long(), reference["top_ids"][rows])
        torch.testing.assert_close(
            top_logprobs.double(), reference["top_logprobs"][rows], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            sampled.double(), reference["sampled_logprobs"][rows], rtol=1e-5, atol=1e-5
        )
        start += sequence.numel()


def test_teacher_rows_cover_the_students_vocabulary_when_embeddings_differ():
    from ta_opd_verl.fsdp_teacher import score_with_teacher_logits

    student_logits = torch.randn(1, 6, 10)
    wider = torch.randn(6, 13)
    wider[:, 10:] = 50.0  # teacher-only rows (padding) with large logits must not enter the top-K
    outputs = score_with_teacher_logits(
        student_logits,
        wider,
        torch.arange(6),
        k=3,
        topk=4,
        student_probs="exact",
        entropy_mode="full",
        exact_compatibility=True,
    )
    ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][0] for i in range(4)], -1)
    assert int(ids.max()) < 10
    expected = torch.log_softmax(wider[:, :10], -1).gather(-1, torch.arange(6).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(outputs[SAMPLED_LOGPROB_FIELD][0], expected)

    narrower = torch.randn(6, 8)  # ids 8, 9 exist only in the student's embedding: teacher probability 0
    outputs = score_with_teacher_logits(
        student_logits,
        narrower,
        torch.full((6,), 9),
        k=3,
        topk=4,
        student_probs="exact",
        entropy_mode="full",
        exact_compatibility=True,
    )
    assert torch.isinf(outputs[SAMPLED_LOGPROB_FIELD]).all()


# ---- configuration --------------------------------------------------------------------------------------
def _fsdp_config(teacher_path, *extra: str):
    return compose_config("ta_opd_cpu", _fsdp_overrides(teacher_path, *extra))


def test_fsdp_teacher_with_exact_compatibility_passes_the_checks(pair):
    config = _fsdp_config(
        pair.teacher,
        "distillation.distillation_loss.ta_opd.compatibility=exact",
        f"actor_rollout_ref.model.path={pair.student}",
    )
    check_ta_opd_config(config)
    check_model_paths(config)


@pytest.mark.parametrize(
    ("overrides", "key", "accepted"),
    [
        (["distillation.distillation_loss.ta_opd.teacher=vllm"], "ta_opd.teacher", "['server', 'fsdp']"),
        (["distillation.distillation_loss.ta_opd.teacher_path=null"], "ta_opd.teacher_path", "teacher=fsdp"),
        (
            ["distillation.distillation_loss.ta_opd.teacher=server"],
            "ta_opd.teacher_path",
            "null with teacher=server",
        ),
        (["distillation.distillation_loss.ta_opd.teacher_dtype=int8"], "ta_opd.teacher_dtype", "bfloat16"),
    ],
    ids=["teacher", "missing-path", "path-with-server", "dtype"],
)
def test_bad_teacher_keys_are_refused_with_the_key(pair, overrides, key, accepted):
    with pytest.raises(TAOPDConfigError) as info:
        check_ta_opd_config(_fsdp_config(pair.teacher, *overrides))
    assert f"distillation.distillation_loss.{key} must be" in str(info.value)
    assert accepted in str(info.value)


def test_teacher_temperature_other_than_one_is_refused(pair):
    config = _fsdp_config(pair.teacher, "distillation.distillation_loss.ta_opd.teacher_temperature=0.7")
    with pytest.raises(TAOPDConfigError, match=r"ta_opd\.teacher_temperature must be 1\.0.*got 0\.7"):
        check_ta_opd_config(config)


def test_exact_compatibility_with_server_teachers_is_still_refused():
    config = compose_config(
        "ta_opd_cpu", [UNUSED_SERVER_TEACHER, "distillation.distillation_loss.ta_opd.compatibility=exact"]
    )
    with pytest.raises(TAOPDConfigError, match=r"compatibility=exact.*ta_opd\.teacher=fsdp"):
        check_ta_opd_config(config)


def test_several_server_teachers_are_refused_with_the_fsdp_teacher(pair):
    config = _fsdp_config(pair.teacher)
    second = OmegaConf.to_container(config.distillation.teacher_models.teacher_model)
    with open_dict(config):
        config.distillation.teacher_models["math_teacher"] = second
    with pytest.raises(TAOPDConfigError, match=r"2 teachers \(teacher_model, math_teacher\).*teacher=server"):
        check_ta_opd_config(config)


def test_sequence_parallel_actor_is_refused_with_the_fsdp_teacher(pair):
    config = _fsdp_config(pair.teacher, "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2")
    with pytest.raises(TAOPDConfigError, match=r"actor_rollout_ref\.actor\.ulysses_sequence_parallel_size=2"):
        check_ta_opd_config(config)


def test_fsdp_teacher_with_another_vocabulary_is_refused_naming_its_key(pair, tmp_path):
    from ta_opd_verl.vocab import VocabularyMismatchError

    teacher = teacher_with_swapped_tokens(pair.teacher, tmp_path / "teacher")
    config = _fsdp_config(teacher, f"actor_rollout_ref.model.path={pair.student}")
    with pytest.raises(
        VocabularyMismatchError, match=r"^distillation\.distillation_loss\.ta_opd\.teacher_path: "
    ):
        check_model_paths(config)


def test_missing_fsdp_teacher_folder_is_named(pair):
    config = _fsdp_config("/nonexistent/fsdp-teacher", f"actor_rollout_ref.model.path={pair.student}")
    with pytest.raises(TAOPDConfigError, match=r"ta_opd\.teacher_path='/nonexistent/fsdp-teacher'"):
        check_model_paths(config)


def test_switching_to_the_colocated_teacher_turns_off_verls_teacher_servers(pair):
    """verl starts its teacher pool and servers (``need_teacher_policy``) and the agent loop asks them
    (``is_distillation_enabled``) from the same switch; the trainer turns it off before verl reads it."""
    from verl.trainer.distillation import is_distillation_enabled
    from verl.trainer.ppo.utils import need_teacher_policy
    from verl.utils.config import omega_conf_to_dataclass

    from ta_opd_verl.trainer import switch_to_colocated_teacher

    config = _fsdp_config(pair.teacher, f"actor_rollout_ref.model.path={pair.student}")
    assert need_teacher_policy(config)
    switch_to_colocated_teacher(config)
    assert not need_teacher_policy(config)
    assert not is_distillation_enabled(config.distillation)
    # The trainer still builds TA-OPD's loss settings from the same block.
    distillation = omega_conf_to_dataclass(config.distillation)
    assert distillation.distillation_loss.ta_opd.teacher == "fsdp"
    assert distillation.distillation_loss.ta_opd.teacher_path == str(pair.teacher)
    assert math.isclose(distillation.distillation_loss.ta_opd.teacher_temperature, 1.0)


def test_trainer_stores_the_teacher_rows_where_the_update_reads_them(monkeypatch):
    """``TAOPDTrainer._store_teacher_rows`` against an in-memory stand-in for TransferQueue's key-value calls:
    it reads the scoring forward's per-token fields and writes ``teacher_ids`` / ``teacher_logprobs``."""
    from types import SimpleNamespace

    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta

    from ta_opd_verl import trainer as trainer_module

    topk, lengths = 3, (4, 2)
    generator = torch.Generator().manual_seed(5)
    stored = {}
    for name in teacher_entry_fields(topk):
        rows = [torch.randint(0, 50, (n,), generator=generator) for n in lengths]
        if "logprob" in name:
            rows = [-row.float() / 10 for row in rows]
        stored[name] = nested(rows)
    keys = ["a", "b"]

    def kv_batch_get(keys, partition_id, select_fields):
        return TensorDict({name: stored[name] for name in select_fields}, batch_size=len(keys))

    def kv_batch_put(keys, partition_id, fields):
        stored.update(dict(fields.items()))
        return KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id=partition_id, fields=sorted(stored))

    monkeypatch.setattr(trainer_module.tq, "kv_batch_get", kv_batch_get)
    monkeypatch.setattr(trainer_module.tq, "kv_batch_put", kv_batch_put)
    trainer = object.__new__(trainer_module.TAOPDTrainer)
    trainer.distillation_config = SimpleNamespace(distillation_loss=SimpleNamespace(topk=topk))
    batch = trainer._store_teacher_rows(KVBatchMeta(keys=keys, tags=[{}, {}], partition_id="train"))

    assert {"teacher_ids", "teacher_logprobs"} <= set(batch.fields)
    for sample, length in enumerate(lengths):
        ids, logprobs = stored["teacher_ids"][sample], stored["teacher_logprobs"][sample]
        assert ids.shape == logprobs.shape == (length, topk + 1)
        for i in range(topk):
            assert torch.equal(ids[:, i].long(), stored[TEACHER_ID_FIELD.format(i)][sample])
            assert torch.equal(logprobs[:, i], stored[TEACHER_LOGPROB_FIELD.format(i)][sample])
        assert torch.equal(ids[:, topk].long(), stored[SAMPLED_ID_FIELD][sample])
        assert torch.equal(logprobs[:, topk], stored[SAMPLED_LOGPROB_FIELD][sample])
