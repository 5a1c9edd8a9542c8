"""Exact-match reward for the tiny task mixture, in the shape verl's reward loop calls.

verl 0.9.1 loads it through ``reward.custom_reward_function.path=<this file>`` and ``.name=compute_score``
(`verl.trainer.ppo.reward.get_custom_reward_fn`); its reward managers (naive, dapo, ...) call it with
keyword arguments ``data_source``, ``solution_str``, ``ground_truth``, ``extra_info`` plus any
``reward_kwargs``, and decode ``solution_str`` with ``skip_special_tokens=True`` (no EOS in it). A float
return value is logged as ``acc`` as well as used as the score.

The answer parser is `ta_opd_verl.tiny.tasks.parse_answer`, the same one the pair builder's greedy
accuracy uses.
"""

from __future__ import annotations

from ta_opd_verl.tiny.tasks import is_correct


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the final answer after the last marker word equals ``ground_truth``, else 0.0.

    Malformed input (no marker, nothing after it, a non-string response) scores 0.0; ``data_source``,
    ``extra_info`` and extra keyword arguments are accepted and ignored.
    """
    if ground_truth is None:
        return 0.0
    return 1.0 if is_correct(solution_str, str(ground_truth)) else 0.0
