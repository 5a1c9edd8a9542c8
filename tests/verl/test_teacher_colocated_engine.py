"""The colocated teacher inside verl's real FSDP2 actor worker: 2 data-parallel ranks (gloo, no Ray) x 2
scoring micro-batches each, the tiny pair's student in verl's ``TrainingWorker`` and the tiny teacher
loaded by TA-OPD's processor in the same processes, FSDP2-sharded over both ranks.

What the scoring forward returns through verl (``infer_batch``, the call behind the actor's
``compute_log_prob``) must equal one unsharded float32 computation made here: the student's log-probs, exact
C from the teacher's full softmax at the student's top-k, the teacher's top-K log-probs and its log-prob
of the sampled token.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_teacher_worker import TOPK, WORLD_SIZE, K, make_sequences, rank_main
from verl_rank import run_ranks

from ta_opd_verl.protocol import (
    COMPATIBILITY_FIELD,
    SAMPLED_LOGPROB_FIELD,
    TEACHER_ID_FIELD,
    TEACHER_LOGPROB_FIELD,
)

RANK_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def pair():
    from ta_opd_verl.tiny.build import build_tiny_pair

    return build_tiny_pair(quiet=True)


@pytest.fixture(scope="module")
def teachers(pair, tmp_path_factory) -> dict:
    """The tiny teacher as built (its output layer tied to its embedding), and a copy with an output layer
    of its own, as the 8B and 14B teachers have: FSDP2 then shards that layer as a unit of its own, which
    the blocked head must gather before using it."""
    import shutil

    from transformers import AutoModelForCausalLM

    untied = tmp_path_factory.mktemp("untied") / "teacher"
    shutil.copytree(pair.teacher, untied)
    model = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(untied)
    return {"tied": pair.teacher, "untied": untied}


def _run_ranks(student, teacher, sequences, report_path: str) -> list[dict]:
    run_ranks(rank_main, WORLD_SIZE, (str(student), str(teacher), sequences, report_path), RANK_TIMEOUT_S)
    return [torch.load(report_path.format(rank=rank)) for rank in range(WORLD_SIZE)]


def _log_softmax(model, sequence: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(sequence.unsqueeze(0)).logits[0].double(), dim=-1)


@pytest.mark.parametrize("output_layer", ["tied", "untied"])
def test_fsdp2_teacher_in_verls_actor_worker_scores_exactly(pair, teachers, output_layer, tmp_path):
    from transformers import AutoModelForCausalLM

    load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    student = AutoModelForCausalLM.from_pretrained(pair.student, **load)
    teacher = AutoModelForCausalLM.from_pretrained(teachers[output_layer], **load)
    assert teacher.config.tie_word_embeddings == (output_layer == "tied")
    sequences = make_sequences(student.config.vocab_size)
    reports = _run_ranks(pair.student, teachers[output_layer], sequences, str(tmp_path / "rank{rank}.pt"))

    # The teacher was sharded by FSDP2 over both ranks (dim 0 of each parameter), not replicated.
    assert all(report["teacher_is_fsdp2"] for report in reports)
    local_rows = [report["teacher_embedding_local_rows"] for report in reports]
    assert sum(local_rows) == teacher.config.vocab_size and max(local_rows) < teacher.config.vocab_size
    for report in reports:
        outputs = report["outputs"]
        assert len(outputs[COMPATIBILITY_FIELD]) == len(report["rows"])
        for index, row in enumerate(report["rows"]):
            sequence = sequences[row]
            student_lp, teacher_lp = _log_softmax(student, sequence), _log_softmax(teacher, sequence)
            # Row t describes token t + 1; the last row has no next token in this sequence.
            positions = slice(0, sequence.numel() - 1)
            next_tokens = sequence[1:].unsqueeze(-1)
            torch.testing.assert_close(
                outputs["log_probs"][index][positions].double(),
                student_lp[positions].gather(-1, next_tokens).squeeze(-1),
                rtol=1e-5,
                atol=1e-5,
            )
            student_topk = torch.topk(student_lp, K, dim=-1).indices
            exact_c = teacher_lp.gather(-1, student_topk).exp().sum(-1)
            torch.testing.assert_close(
                outputs[COMPATIBILITY_FIELD][index].double(), exact_c, rtol=1e-5, atol=1e-5
            )
            top = torch.topk(teacher_lp, TOPK, dim=-1)
            ids = torch.stack([outputs[TEACHER_ID_FIELD.format(i)][index] for i in range(TOPK)], -1)
            logprobs = torch.stack([outputs[TEACHER_LOGPROB_FIELD.format(i)][index] for i in range(TOPK)], -1)
            assert torch.equal(ids, top.indices)
            torch.testing.assert_close(logprobs.double(), top.values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                outputs[SAMPLED_LOGPROB_FIELD][index][positions].double(),
                teacher_lp[positions].gather(-1, next_tokens).squeeze(-1),
                rtol=1e-5,
                atol=1e-5,
            )
