"""TA-OPD's teacher-server extraction keeps the sampled token's log-prob that verl's drops; with a
special-token map (or a teacher-side prompt) verl's agent loop sends the teacher its own sequence and
stores its rows in the student's ids, lined up with the student's sequence."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from ta_opd_verl.protocol import split_teacher_entries
from ta_opd_verl.special_tokens import SpecialTokenMap
from ta_opd_verl.teachability import token_statistics
from ta_opd_verl.teachers.server import ServerTeacherRequests, extract_prompt_logprobs_with_sampled_token


def _entry(logprob: float, rank: int):
    return SimpleNamespace(logprob=logprob, rank=rank)


def _fake_output():
    # Prompt tokens [5, 7, 9]; vLLM lists the top-2 per position plus the actual token when it is outside.
    return SimpleNamespace(
        prompt_token_ids=[5, 7, 9],
        prompt_logprobs=[
            None,
            {3: _entry(-0.1, 1), 7: _entry(-2.5, 2)},  # token 7 is inside the top-2
            {4: _entry(-0.2, 1), 6: _entry(-1.9, 2), 9: _entry(-7.25, 5)},  # token 9 is rank 5: outside
        ],
    )


def test_rows_hold_top_k_then_the_sampled_token_with_its_real_log_prob():
    result = {}
    extract_prompt_logprobs_with_sampled_token(_fake_output(), 2, result)
    assert result["prompt_ids"] == [[3, 7, 7], [4, 6, 9], [0, 0, 0]]
    assert result["prompt_logprobs"] == [[-0.1, -2.5, -2.5], [-0.2, -1.9, -7.25], [0.0, 0.0, 0.0]]


def test_verls_extraction_drops_the_token_outside_the_top_k():
    from verl.workers.rollout.vllm_rollout.utils import extract_prompt_logprobs

    result = {}
    extract_prompt_logprobs(_fake_output(), 2, result)
    assert -7.25 not in [value for row in result["prompt_logprobs"] for value in row]


def test_sampled_token_only_mode_is_refused():
    with pytest.raises(ValueError, match="top-K"):
        extract_prompt_logprobs_with_sampled_token(_fake_output(), 0, {})


# ---- a special-token map: the student's sequence in, rows in the student's ids out -------------------

# Student 10 (its end of turn) and 8 (its pad) are both the teacher's 8; teacher 7 has no student counterpart.
SMALL_MAP = SpecialTokenMap(
    entries={10: (8, "end_of_turn"), 8: (8, "pad")},
    teacher_orphans=frozenset({7}),
    unmapped_student_ids=frozenset(),
)


def _teacher_output(teacher_ids: list[int]):
    """vLLM's prompt log-probs for the sequence the teacher read, top-2 per position: position 2 lists the
    orphan 7 first, position 3 the teacher's end of sentence 8."""
    listed = {
        1: {3: _entry(-0.5, 1), 8: _entry(-1.5, 2)},
        2: {7: _entry(-0.25, 1), 3: _entry(-2.0, 2), 4: _entry(-6.0, 7)},
        3: {8: _entry(-0.1, 1), 3: _entry(-3.0, 2)},
    }
    for position, token_id in enumerate(teacher_ids[1:], start=1):
        assert token_id in listed[position], "the fixture lists the token read at every position"
    return SimpleNamespace(prompt_token_ids=teacher_ids, prompt_logprobs=[None, *listed.values()])


def _server_rows(teacher_ids: list[int], output) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows verl's teacher manager hands the agent loop for ``output``
    (``compute_teacher_logprobs_single``: int32 ids, float32 log-probs)."""
    rows = {}
    extract_prompt_logprobs_with_sampled_token(output, 2, rows)
    assert len(rows["prompt_ids"]) == len(teacher_ids)
    return torch.tensor(rows["prompt_ids"], dtype=torch.int32), torch.tensor(rows["prompt_logprobs"])


class _FakeTeacherManager:
    """verl's ``AsyncTeacherLLMServerManager`` as the agent loop worker calls it: one teacher server that
    answers with ``_teacher_output`` rows and records what it was sent."""

    def __init__(self, teachers: dict[str, str]):
        # verl's teacher model configs, keyed by their routing key, each with its model folder.
        self.teacher_model_configs = {key: SimpleNamespace(model_path=path) for key, path in teachers.items()}
        self.sent = []

    def _resolve_teacher_key(self, routing_key):
        configs = self.teacher_model_configs
        return routing_key if len(configs) > 1 else next(iter(configs))

    async def compute_teacher_logprobs_single(self, sequence_ids, routing_key=None, **kwargs):
        self.sent.append((self._resolve_teacher_key(routing_key), list(sequence_ids)))
        return _server_rows(sequence_ids, _teacher_output(list(sequence_ids)))


def _agent_loop_worker(teachers: dict[str, str], requests: dict):
    """TA-OPD's agent loop worker (its teacher request only: no Ray actor, no servers)."""
    from ta_opd_verl.verl_fence.agent_loop import teacher_requests_worker_class

    worker = object.__new__(teacher_requests_worker_class(requests))
    worker.distillation_enabled, worker.teacher_key = True, "teacher_key"
    worker.teacher_server_manager = _FakeTeacherManager(teachers)
    return worker


def _teacher_request(worker, prompt_ids, response_ids, sample=None):
    output = SimpleNamespace(extra_fields={}, multi_modal_data=None, mm_processor_kwargs=None)
    asyncio.run(worker._compute_teacher_logprobs(output, prompt_ids, response_ids, False, sample or {}))
    return output.extra_fields


def test_the_agent_loop_sends_a_mapped_teacher_the_mapped_sequence_and_stores_student_ids():
    worker = _agent_loop_worker({"t": "/teacher"}, {"/teacher": ServerTeacherRequests("/teacher", SMALL_MAP)})
    fields = _teacher_request(worker, [5, 10], [4, 8])

    assert worker.teacher_server_manager.sent == [("t", [5, 8, 4, 8])]
    # Teacher 8 is the student's 10 (its end of turn); the orphan 7 is verl's filler for a missing entry;
    # the sampled column holds the student's own token with the teacher's log-prob of the id it read.
    assert fields["teacher_ids"].tolist() == [[3, 10, 10], [0, 3, 4], [10, 3, 8], [0, 0, 0]]
    assert fields["teacher_logprobs"].tolist() == [
        [-0.5, -1.5, -1.5],
        [float("-inf"), -2.0, -6.0],
        [-0.10000000149011612, -3.0, -0.10000000149011612],
        [0.0, 0.0, 0.0],
    ]
    assert fields["ta_opd_teacher_prompt_length"] == 2


def test_the_agent_loop_leaves_a_teacher_without_requests_to_verl():
    """Of two routed teachers, the one with no map and no teacher prompt is sent verl's own sequence and
    its rows are left as the server wrote them."""
    teachers = {"mapped": "/mapped", "plain": "/plain"}
    worker = _agent_loop_worker(teachers, {"/mapped": ServerTeacherRequests("/mapped", SMALL_MAP)})
    fields = _teacher_request(worker, [5, 8], [4, 8], {"teacher_key": "plain"})
    assert worker.teacher_server_manager.sent == [("plain", [5, 8, 4, 8])]
    assert fields["teacher_ids"][1].tolist() == [7, 3, 4]  # the teacher's own ids, its 7 included
    assert "ta_opd_teacher_prompt_length" not in fields
    fields = _teacher_request(worker, [5, 8], [4, 8], {"teacher_key": "mapped"})
    assert fields["teacher_ids"][1].tolist() == [0, 3, 4]


def test_the_filler_of_an_orphan_entry_is_no_entry_for_the_scoring():
    """D and C from rows with an orphan turned into the filler equal those from the rows without it."""
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(1, 4, 12, generator=generator) * 2
    ids = torch.tensor([[[3, 0, 5, 1, 2], [4, 0, 6, 2, 4], [0, 9, 3, 7, 7], [1, 2, 0, 11, 0]]])
    logprobs = torch.log(torch.tensor([[[0.4, 0.2, 0.1, 0.05, 0.0]] * 4]).clamp_min(1e-30))
    logprobs[..., 1] = float("-inf")  # the filler sits in column 1 of every row
    top_ids, top_logprobs, _ = split_teacher_entries(ids, logprobs, 4)
    kept = [0, 2, 3]
    with_filler = token_statistics(student_logits, top_ids, top_logprobs, k=3)
    without = token_statistics(student_logits, top_ids[..., kept], top_logprobs[..., kept], k=3)
    for name in ("disagreement", "compatibility"):
        assert torch.equal(getattr(with_filler, name), getattr(without, name)), name


def test_a_qwen25_response_ending_in_its_end_of_turn_round_trips_through_an_r1_teacher_server(
    real_tokenizer_folders,
):
    """The paper's pair with the real tokenizers: the R1 teacher reads the student's <|im_end|> as its end
    of sentence, and its rows come back with the student's own ids (its </think>, which the student cannot
    place, as the filler)."""
    from transformers import AutoTokenizer

    from ta_opd_verl.vocab import check_pair

    student_folder, teacher_folder = (
        real_tokenizer_folders[n] for n in ("qwen2.5-instruct", "deepseek-r1-distill-qwen")
    )
    requests = ServerTeacherRequests(teacher_folder, check_pair(student_folder, teacher_folder).token_map)
    student, teacher = (AutoTokenizer.from_pretrained(folder) for folder in (student_folder, teacher_folder))
    prompt = student.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    response = student.encode("The answer is 4.<|im_end|>")
    assert response[-1] == student.convert_tokens_to_ids("<|im_end|>")

    teacher_prompt, teacher_response = requests.teacher_sequence(prompt, response, {})
    assert teacher.decode(teacher_response) == "The answer is 4.<｜end▁of▁sentence｜>"
    read = teacher_prompt + teacher_response
    end_of_thinking = teacher.convert_tokens_to_ids("</think>")
    listed = [None] + [{token_id: _entry(-0.1, 1), end_of_thinking: _entry(-2.5, 2)} for token_id in read[1:]]
    rows = _server_rows(read, SimpleNamespace(prompt_token_ids=read, prompt_logprobs=listed))
    ids, logprobs = requests.student_rows(rows, prompt, response, len(teacher_prompt))
    # Row t describes token t + 1: top-1 the token itself, top-2 the filler, then the sampled token. The
    # prompt's <|im_start|> is R1's <｜User｜> to the teacher, which no student id reads: a filler too.
    im_start = student.convert_tokens_to_ids("<|im_start|>")
    sequence = prompt + response
    expected = [[0 if token_id == im_start else token_id, 0, token_id] for token_id in sequence[1:]]
    assert ids[:-1].tolist() == expected
    assert logprobs[-2].tolist() == pytest.approx([-0.1, float("-inf"), -0.1])
