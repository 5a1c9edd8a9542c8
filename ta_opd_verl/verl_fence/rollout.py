"""verl 0.9.1's vLLM rollout and teacher servers, as TA-OPD's server teacher uses them.

What we lean on, each checked by a fingerprint (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``extract_prompt_logprobs`` (``verl/workers/rollout/vllm_rollout/utils.py``) turns vLLM's prompt
  log-probs into verl's teacher rows and drops the actual token's entry when it is outside the top-K;
  ``vllm_async_server`` imports it by name, so a server process uses whatever that module global holds
  (`teacher_server_class` replaces it in the teacher's own actor process).
- ``RolloutReplicaRegistry`` (``verl/workers/rollout/replica.py``) maps ``inference.name`` to a loader of
  the replica class; ``vLLMReplica.__init__`` takes ``is_teacher_model`` and sets ``self.server_class``
  (`register_vllm_replica`).
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from verl.workers.rollout.replica import RolloutReplicaRegistry

from ta_opd_verl.verl_fence import FINGERPRINTS

FINGERPRINTS.update(
    {
        "verl.workers.rollout.vllm_rollout.utils:extract_prompt_logprobs": "7a3dfe3e8c60efdd",
        "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMReplica.__init__": "a43756da3be14482",
        "verl.workers.rollout.replica:RolloutReplicaRegistry.register": "283ce5dd7be73264",
    }
)


def register_vllm_replica(extract_prompt_logprobs: Callable) -> None:
    """Make verl build, for ``inference.name=vllm`` teachers, a server whose prompt-log-prob extraction is
    ``extract_prompt_logprobs`` (same contract as verl's); student rollout replicas are unchanged."""
    RolloutReplicaRegistry.register("vllm", lambda: _replica_class(extract_prompt_logprobs))


def _replica_class(extract_prompt_logprobs: Callable):
    # verl's registry defers the replica class to its loader so that vLLM is imported only in processes
    # that build a server; so do we.
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    class TAOPDvLLMReplica(vllm_async_server.vLLMReplica):
        def __init__(self, *args, is_teacher_model: bool = False, **kwargs):
            super().__init__(*args, is_teacher_model=is_teacher_model, **kwargs)
            if is_teacher_model:
                self.server_class = ray.remote(teacher_server_class(extract_prompt_logprobs))

    return TAOPDvLLMReplica


def teacher_server_class(extract_prompt_logprobs: Callable):
    """verl's vLLM server class for a teacher, its prompt-log-prob extraction ``extract_prompt_logprobs``."""
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    class TeacherServerKeepingSampledToken(vllm_async_server.vLLMHttpServer):
        def __init__(self, *args, **kwargs):
            # This actor's process serves only this teacher: the module-global swap stays local to it.
            vllm_async_server.extract_prompt_logprobs = extract_prompt_logprobs
            super().__init__(*args, **kwargs)

    return TeacherServerKeepingSampledToken
