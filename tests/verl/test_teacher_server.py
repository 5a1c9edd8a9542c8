"""TA-OPD's teacher-server extraction keeps the sampled token's log-prob that verl's drops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ta_opd_verl.teachers.server import extract_prompt_logprobs_with_sampled_token


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
