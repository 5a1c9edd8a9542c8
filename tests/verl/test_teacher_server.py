"""TA-OPD's teacher-server extraction keeps the sampled token's log-prob that verl's drops; with a
special-token map the server reads the mapped sequence and returns rows in the student's ids."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from ta_opd_verl.protocol import split_teacher_entries
from ta_opd_verl.special_tokens import SpecialTokenMap
from ta_opd_verl.teachability import token_statistics
from ta_opd_verl.teachers.server import StudentSpaceRequests, extract_prompt_logprobs_with_sampled_token


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


def test_a_teacher_server_with_a_map_reads_the_mapped_sequence_and_returns_student_ids(monkeypatch):
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    from ta_opd_verl.verl_fence.rollout import teacher_server_class

    read = []

    async def teacher_generate(self, prompt_ids, sampling_params, request_id, **kwargs):
        read.append(list(prompt_ids))
        extra_fields = {}
        extract_prompt_logprobs_with_sampled_token(_teacher_output(list(prompt_ids)), 2, extra_fields)
        return SimpleNamespace(extra_fields=extra_fields)

    monkeypatch.setattr(vllm_async_server.vLLMHttpServer, "generate", teacher_generate)
    server_class = teacher_server_class(
        extract_prompt_logprobs_with_sampled_token, StudentSpaceRequests(SMALL_MAP)
    )
    server = object.__new__(server_class)  # the generate path only; no vLLM engine
    student_ids = [5, 10, 4, 8]
    output = asyncio.run(server.generate(prompt_ids=student_ids, sampling_params={}, request_id="r"))

    assert read == [[5, 8, 4, 8]]
    # Teacher 8 is the student's 10 (its end of turn); the orphan 7 is verl's filler for a missing entry;
    # the sampled column holds the student's own token with the teacher's log-prob of the id it read.
    assert output.extra_fields["prompt_ids"] == [[3, 10, 10], [0, 3, 4], [10, 3, 8], [0, 0, 0]]
    assert output.extra_fields["prompt_logprobs"] == [
        [-0.5, -1.5, -1.5],
        [float("-inf"), -2.0, -6.0],
        [-0.1, -3.0, -0.1],
        [0.0, 0.0, 0.0],
    ]


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
    requests = StudentSpaceRequests(check_pair(student_folder, teacher_folder).token_map)
    student, teacher = (AutoTokenizer.from_pretrained(folder) for folder in (student_folder, teacher_folder))
    prompt = student.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    sequence = prompt + student.encode("The answer is 4.<|im_end|>")
    assert sequence[-1] == student.convert_tokens_to_ids("<|im_end|>")

    read = requests.teacher_prompt_ids(sequence)
    assert teacher.decode(read[len(prompt) :]) == "The answer is 4.<｜end▁of▁sentence｜>"
    end_of_thinking = teacher.convert_tokens_to_ids("</think>")
    listed = [None] + [{token_id: _entry(-0.1, 1), end_of_thinking: _entry(-2.5, 2)} for token_id in read[1:]]
    rows = {}
    extract_prompt_logprobs_with_sampled_token(
        SimpleNamespace(prompt_token_ids=read, prompt_logprobs=listed), 2, rows
    )
    requests.to_student(sequence, rows)
    # Row t describes token t + 1: top-1 the token itself, top-2 the filler, then the sampled token. The
    # prompt's <|im_start|> is R1's <｜User｜> to the teacher, which no student id reads: a filler too.
    im_start = student.convert_tokens_to_ids("<|im_start|>")
    expected = [[0 if token_id == im_start else token_id, 0, token_id] for token_id in sequence[1:]]
    assert rows["prompt_ids"][:-1] == expected
    assert rows["prompt_logprobs"][-2] == [-0.1, float("-inf"), -0.1]
