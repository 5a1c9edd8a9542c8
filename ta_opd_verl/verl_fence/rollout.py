"""verl 0.9.1's vLLM rollout and teacher servers, as TA-OPD's server teacher uses them.

What we lean on, each checked by a fingerprint (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``extract_prompt_logprobs`` (``verl/workers/rollout/vllm_rollout/utils.py``) turns vLLM's prompt
  log-probs into verl's teacher rows and drops the actual token's entry when it is outside the top-K;
  ``vllm_async_server`` imports it by name, so a server process uses whatever that module global holds
  (`teacher_server_class` replaces it in the teacher's own actor process).
- ``RolloutReplicaRegistry`` (``verl/workers/rollout/replica.py``) maps ``inference.name`` to a loader of
  the replica class; ``vLLMReplica.__init__`` takes ``is_teacher_model`` and sets ``self.server_class``
  (`register_vllm_replica`); ``RolloutReplica.__init__`` keeps the model config, whose ``path`` is a
  teacher's ``model_path`` as configured (verl's teacher model builds it so), as ``self.model_config``.
- ``vLLMHttpServer.generate`` takes the sequence as ``prompt_ids`` and returns a ``TokenOutput`` whose
  ``extra_fields`` hold the extraction's rows; verl's teacher manager
  (``AsyncTeacherLLMServerManager.compute_teacher_logprobs_single``) sends it the student's whole sequence
  and reads the rows from there (a `RequestMap` translates both on the way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import ray
from verl.workers.rollout.replica import RolloutReplicaRegistry

from ta_opd_verl.verl_fence import FINGERPRINTS

FINGERPRINTS.update(
    {
        "verl.workers.rollout.vllm_rollout.utils:extract_prompt_logprobs": "7a3dfe3e8c60efdd",
        "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMReplica.__init__": "a43756da3be14482",
        "verl.workers.rollout.replica:RolloutReplicaRegistry.register": "283ce5dd7be73264",
        "verl.workers.rollout.replica:RolloutReplica.__init__": "2fabbc138e468d1f",
        "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMHttpServer.generate": "383d680001635a76",
        "verl.experimental.teacher_loop.teacher_manager:"
        "AsyncTeacherLLMServerManager.compute_teacher_logprobs_single": "6d67cd33736f6429",
    }
)


class RequestMap(Protocol):
    """How one teacher server translates a request from the student's ids and its rows back."""

    def teacher_prompt_ids(self, prompt_ids: list[int]) -> list[int]:
        """The sequence as the teacher reads it."""

    def to_student(self, prompt_ids: list[int], extra_fields: dict) -> None:
        """Rewrite, in place, the extraction's rows in ``extra_fields`` for the student's ``prompt_ids``."""


def register_vllm_replica(
    extract_prompt_logprobs: Callable, request_maps: Mapping[str, RequestMap] | None = None
) -> None:
    """Make verl build, for ``inference.name=vllm`` teachers, a server whose prompt-log-prob extraction is
    ``extract_prompt_logprobs`` (same contract as verl's) and which, for a teacher whose ``model_path`` is a
    key of ``request_maps``, translates each request through that map; student rollout replicas are
    unchanged."""
    maps = dict(request_maps or {})
    RolloutReplicaRegistry.register("vllm", lambda: _replica_class(extract_prompt_logprobs, maps))


def _replica_class(extract_prompt_logprobs: Callable, request_maps: dict[str, RequestMap]):
    # verl's registry defers the replica class to its loader so that vLLM is imported only in processes
    # that build a server; so do we.
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    class TAOPDvLLMReplica(vllm_async_server.vLLMReplica):
        def __init__(self, *args, is_teacher_model: bool = False, **kwargs):
            super().__init__(*args, is_teacher_model=is_teacher_model, **kwargs)
            if is_teacher_model:
                request_map = request_maps.get(str(self.model_config.path))
                self.server_class = ray.remote(teacher_server_class(extract_prompt_logprobs, request_map))

    return TAOPDvLLMReplica


def teacher_server_class(extract_prompt_logprobs: Callable, request_map: RequestMap | None):
    """verl's vLLM server class for one teacher: its prompt-log-prob extraction is
    ``extract_prompt_logprobs``, and with ``request_map`` each request is translated through it."""
    from verl.workers.rollout.vllm_rollout import vllm_async_server

    class TeacherServerKeepingSampledToken(vllm_async_server.vLLMHttpServer):
        def __init__(self, *args, **kwargs):
            # This actor's process serves only this teacher: the module-global swap stays local to it.
            vllm_async_server.extract_prompt_logprobs = extract_prompt_logprobs
            super().__init__(*args, **kwargs)

        async def generate(self, prompt_ids, *args, **kwargs):
            if request_map is None:
                return await super().generate(prompt_ids, *args, **kwargs)
            output = await super().generate(request_map.teacher_prompt_ids(prompt_ids), *args, **kwargs)
            request_map.to_student(list(prompt_ids), output.extra_fields)
            return output

    return TeacherServerKeepingSampledToken
