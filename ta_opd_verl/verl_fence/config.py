"""verl 0.9.1's config: the classes TA-OPD's ``ta_opd`` block extends, and the switch for verl's teacher.

What we lean on (`ta_opd_verl.verl_fence.FINGERPRINTS`):
- ``omega_conf_to_dataclass`` (``verl/utils/config.py``) instantiates ``distillation.distillation_loss``
  through its ``_target_`` with Hydra's ``_convert_="partial"``, so a nested node without its own
  ``_target_`` arrives as a plain dict; ``DistillationLossConfig.__post_init__`` rejects a ``loss_mode``
  missing from verl's loss registry.
- ``need_teacher_policy`` and ``is_distillation_enabled``: verl starts its teacher pool, its teacher
  servers and the agent loop's teacher calls from ``distillation.enabled`` alone (`disable_verl_teacher`).
"""

from __future__ import annotations

from verl.base_config import BaseConfig
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config.distillation import DistillationLossConfig

from ta_opd_verl.verl_fence import FINGERPRINTS

__all__ = ["BaseConfig", "DistillationLossConfig", "disable_verl_teacher", "omega_conf_to_dataclass"]

FINGERPRINTS.update(
    {
        "verl.utils.config:omega_conf_to_dataclass": "39fe5df6274a34f8",
        "verl.workers.config.distillation:DistillationLossConfig.__post_init__": "2da9d950b4303c5a",
        "verl.trainer.ppo.utils:need_teacher_policy": "1cf5704ab6b4defa",
        "verl.trainer.distillation.losses:is_distillation_enabled": "d320eccc028b2ae5",
    }
)


def disable_verl_teacher(config) -> None:
    """No teacher pool, teacher server or agent-loop teacher call: verl decides all three from this key.
    Call before verl reads the config."""
    config.distillation.enabled = False
