"""verl 0.9.1's agent loop, as TA-OPD's server teacher uses it to send each teacher its own request.

What we lean on, each checked by a fingerprint (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``TaskRunnerV1.init_agent_loop_manager`` (``verl/trainer/main_ppo.py``) builds the agent loop manager
  from the class named by ``actor_rollout_ref.rollout.agent.agent_loop_manager_class`` (default
  ``AgentLoopManagerTQ``) with ``.create(...)``, in the process where the trainer was built: the driver's
  task runner, where `use_teacher_requests` registers the requests.
- ``AgentLoopManagerTQ.__init__`` (``verl/trainer/ppo/v1/agent_loop_tq.py``) sets
  ``agent_loop_workers_class`` (a Ray actor class of ``AgentLoopWorkerTQ``) before
  ``AgentLoopManager.__init__``, and ``_init_agent_loop_workers`` builds every worker from it.
- ``AgentLoopWorker._compute_teacher_logprobs`` (``verl/experimental/agent_loop/agent_loop.py``) sends
  ``prompt_ids + response_ids`` to the teacher the sample routes to (single teacher: that one; else the
  sample's ``distillation.teacher_key`` field), resolved by
  ``AsyncTeacherLLMServerManager._resolve_teacher_key`` to a key of the manager's
  ``teacher_model_configs`` (verl's teacher configs by their ``key``, each with ``model_path`` as
  configured), and leaves the rows, one per token sent, in ``output.extra_fields["teacher_ids" /
  "teacher_logprobs"]``; ``AgentLoopWorkerTQ._agent_loop_postprocess`` then stores them with the sample,
  and the rest of ``extra_fields`` as its ``extra_fields`` field.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Protocol

import ray
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ta_opd_verl.verl_fence import FINGERPRINTS

FINGERPRINTS.update(
    {
        "verl.trainer.main_ppo:TaskRunnerV1.init_agent_loop_manager": "fbb991c10e6b6e70",
        "verl.trainer.ppo.v1.agent_loop_tq:AgentLoopManagerTQ.__init__": "9f1e99d66170d332",
        "verl.experimental.agent_loop.agent_loop:"
        "AgentLoopManager._init_agent_loop_workers": "7c577f83ba5d9f44",
        "verl.experimental.agent_loop.agent_loop:"
        "AgentLoopWorker._compute_teacher_logprobs": "9644b90ae461658c",
        "verl.experimental.teacher_loop.teacher_manager:"
        "AsyncTeacherLLMServerManager._resolve_teacher_key": "262596371c1588fe",
        "verl.experimental.teacher_loop.teacher_manager:"
        "AsyncTeacherLLMServerManager.__init__": "e4792ae6cbf8c35e",
    }
)

AGENT_LOOP_MANAGER_KEY = "actor_rollout_ref.rollout.agent.agent_loop_manager_class"
TEACHER_ROWS = ("teacher_ids", "teacher_logprobs")


class TeacherRequests(Protocol):
    """What one teacher server is sent for a sample, and how its rows come back to the student's sequence."""

    def teacher_sequence(
        self, prompt_ids: list[int], response_ids: list[int], sample: Mapping
    ) -> tuple[list[int], list[int]]:
        """The teacher's prompt and response ids for the student's ``prompt_ids`` and ``response_ids``
        (``sample``: the sample's dataset fields)."""

    def student_rows(
        self,
        rows: tuple[torch.Tensor, torch.Tensor],
        prompt_ids: list[int],
        response_ids: list[int],
        teacher_prompt_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's rows (ids, log-probs; one per token of the teacher's sequence) as rows of the
        student's sequence, in the student's ids."""


# Teacher model folder (as configured) -> its requests; set in the driver's task runner.
_REQUESTS: dict[str, TeacherRequests] = {}
# The per-sample ``extra_fields`` entry with the length of the teacher's prompt.
TEACHER_PROMPT_LENGTH_KEY = "ta_opd_teacher_prompt_length"


# The manager class as verl loads it by name; built on first access (`__getattr__`): importing verl's v1
# agent loop loads verl's plugins, which import TA-OPD's trainer, which imports this module.
MANAGER_CLASS_NAME = "TeacherRequestsAgentLoopManager"
AGENT_LOOP_MANAGER = f"{__name__}.{MANAGER_CLASS_NAME}"


def use_teacher_requests(config: DictConfig, requests: Mapping[str, TeacherRequests]) -> None:
    """Make verl's agent loop send each teacher (model folder -> requests) its own sequence: sets
    `AGENT_LOOP_MANAGER_KEY` in ``config`` and registers ``requests`` for this process's manager."""
    _REQUESTS.clear()
    _REQUESTS.update(requests)
    with open_dict(config):
        OmegaConf.update(config, AGENT_LOOP_MANAGER_KEY, AGENT_LOOP_MANAGER)


def __getattr__(name: str):
    if name == MANAGER_CLASS_NAME:
        return _manager_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _manager_class():
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ

    class TeacherRequestsAgentLoopManager(AgentLoopManagerTQ):
        """verl's TransferQueue agent loop manager whose workers send each teacher its own sequence."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not _REQUESTS:
                raise RuntimeError(
                    f"{AGENT_LOOP_MANAGER_KEY}={AGENT_LOOP_MANAGER} is set by TA-OPD's trainer "
                    "(ta_opd.teacher=server with a teacher prompt or a special-token map), which registers "
                    "the teacher requests in this process first; it cannot be used on its own"
                )
            self.agent_loop_workers_class = ray.remote(teacher_requests_worker_class(dict(_REQUESTS)))

    TeacherRequestsAgentLoopManager.__module__ = __name__
    return TeacherRequestsAgentLoopManager


def teacher_requests_worker_class(requests: Mapping[str, TeacherRequests]):
    """``AgentLoopWorkerTQ`` sending a teacher whose model folder is a key of ``requests`` the sequence those
    requests build, and storing its rows for the student's sequence."""
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    class TeacherRequestsAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):
        async def _compute_teacher_logprobs(
            self, output, prompt_ids, response_ids, validate, sample_kwargs=None
        ):
            request = None
            if self.distillation_enabled and not validate:
                routing_value = (sample_kwargs or {}).get(self.teacher_key)
                routing_key = routing_value.item() if hasattr(routing_value, "item") else routing_value
                manager = self.teacher_server_manager
                teacher = manager.teacher_model_configs[manager._resolve_teacher_key(routing_key)]
                request = requests.get(str(teacher.model_path))
            if request is None:
                return await super()._compute_teacher_logprobs(
                    output, prompt_ids, response_ids, validate, sample_kwargs
                )
            teacher_prompt, teacher_response = request.teacher_sequence(
                list(prompt_ids), list(response_ids), sample_kwargs or {}
            )
            await super()._compute_teacher_logprobs(
                output, teacher_prompt, teacher_response, validate, sample_kwargs
            )
            rows = tuple(output.extra_fields[name] for name in TEACHER_ROWS)
            rows = request.student_rows(rows, list(prompt_ids), list(response_ids), len(teacher_prompt))
            output.extra_fields.update(zip(TEACHER_ROWS, rows, strict=True))
            output.extra_fields[TEACHER_PROMPT_LENGTH_KEY] = len(teacher_prompt)

    return TeacherRequestsAgentLoopWorker
