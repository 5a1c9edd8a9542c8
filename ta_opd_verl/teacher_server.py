"""verl's vLLM teacher server, keeping the teacher's log-prob of the sampled token.

vLLM's prompt log-probs list, for every position, the top-K entries plus the actual next token when it is
outside the top-K. verl 0.9.1's ``extract_prompt_logprobs`` (``verl/workers/rollout/vllm_rollout/utils.py``,
imported by name into ``vllm_async_server``) drops that extra entry, so the sampled token's teacher
log-prob is lost exactly where the teacher disagrees most. TA-OPD needs it for the sampled-token OPD loss.

Our server subclass replaces the extraction in its own Ray actor process only, so every row becomes
``top-K entries + [sampled token]`` (K + 1 columns; the sampled token's real log-prob, whether or not it is
in the top-K). The student's rollout servers run in other processes and are untouched. The replica class is
swapped through verl's ``RolloutReplicaRegistry`` ("vllm"), and only teacher replicas
(``is_teacher_model=True``) get the subclass.
"""

from __future__ import annotations

import ray


def extract_prompt_logprobs_with_sampled_token(output, num_prompt_logprobs, result_dict: dict) -> None:
    """verl's ``extract_prompt_logprobs`` contract, with one more column holding the actual token."""
    if num_prompt_logprobs is None:
        return
    if num_prompt_logprobs == 0:
        raise ValueError("TA-OPD's teacher server needs top-K prompt log-probs (distillation_loss.topk > 0)")
    prompt_ids = output.prompt_token_ids
    rows_ids, rows_logprobs = [], []
    # Position t's dictionary describes token t (None for t = 0); verl's row t is the distribution of t + 1.
    for position, logprobs_dict in enumerate(output.prompt_logprobs[1:], start=1):
        logprobs_dict = {int(token_id): entry for token_id, entry in logprobs_dict.items()}
        ids = [0] * num_prompt_logprobs
        logprobs = [float("-inf")] * num_prompt_logprobs
        for token_id, entry in logprobs_dict.items():
            if entry.rank <= num_prompt_logprobs:
                ids[entry.rank - 1] = token_id
                logprobs[entry.rank - 1] = entry.logprob
        actual = prompt_ids[position]
        rows_ids.append(ids + [int(actual)])
        rows_logprobs.append(logprobs + [logprobs_dict[actual].logprob])
    # verl pads one dummy row for the last position (no next token).
    rows_ids.append([0] * (num_prompt_logprobs + 1))
    rows_logprobs.append([0.0] * (num_prompt_logprobs + 1))
    result_dict["prompt_ids"] = rows_ids
    result_dict["prompt_logprobs"] = rows_logprobs


def _teacher_server_class():
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    class TeacherServerKeepingSampledToken(vllm_async_server.vLLMHttpServer):
        def __init__(self, *args, **kwargs):
            # This actor's process serves only this teacher: the module-global swap stays local to it.
            vllm_async_server.extract_prompt_logprobs = extract_prompt_logprobs_with_sampled_token
            super().__init__(*args, **kwargs)

    return TeacherServerKeepingSampledToken


def _load_replica_class():
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

    class TAOPDvLLMReplica(vLLMReplica):
        def __init__(self, *args, is_teacher_model: bool = False, **kwargs):
            super().__init__(*args, is_teacher_model=is_teacher_model, **kwargs)
            if is_teacher_model:
                self.server_class = ray.remote(_teacher_server_class())

    return TAOPDvLLMReplica


def install_teacher_server() -> None:
    """Make verl build TA-OPD's teacher server for ``inference.name=vllm`` teachers (driver process)."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("vllm", _load_replica_class)
