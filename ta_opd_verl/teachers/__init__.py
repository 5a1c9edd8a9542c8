"""Who scores the teacher, chosen by ``distillation.distillation_loss.ta_opd.teacher``: verl's teacher
servers (`server.ServerTeacher`) or the teacher colocated in the actor's workers
(`colocated.ColocatedFSDPTeacher`), both behind `base.Teacher`.

`resolve_teacher` is the one place that reads the choice; the checks, the trainer and (through the loss
callable the trainer sends them) the workers ask the object it returns.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ta_opd_verl.config import TEACHERS, TAOPDConfigError
from ta_opd_verl.teachers.base import TEACHER_KEY, Teacher
from ta_opd_verl.teachers.colocated import ColocatedFSDPTeacher
from ta_opd_verl.teachers.server import ServerTeacher

__all__ = ["ColocatedFSDPTeacher", "ServerTeacher", "Teacher", "resolve_teacher"]

_IMPLEMENTATIONS = {teacher.name: teacher for teacher in (ServerTeacher, ColocatedFSDPTeacher)}
assert tuple(_IMPLEMENTATIONS) == TEACHERS, (
    "config.TEACHERS and the implementations must name the same teachers"
)


def resolve_teacher(config: DictConfig) -> Teacher:
    """The teacher a composed verl config asks for (``server`` when the key is absent: verl's own OPD)."""
    name = OmegaConf.select(config, TEACHER_KEY, default="server")
    if name not in _IMPLEMENTATIONS:
        # TAOPDConfig's own check says this too; this one covers callers that read the raw config first.
        raise TAOPDConfigError(f"{TEACHER_KEY} must be one of {list(_IMPLEMENTATIONS)}, got {name!r}")
    return _IMPLEMENTATIONS[name].from_config(config)
