"""Entry point of the ``verl.plugins`` group: verl imports it on every ``import verl``, in the driver and
in every Ray worker (``verl/__init__.py``, verl 0.9.1).

What it does there: registers ``loss_mode=ta_opd`` in verl's distillation-loss registry (cheap, needed
wherever verl builds a ``DistillationConfig``), and registers ``trainer.v1.trainer_mode=ta_opd`` lazily,
when verl's v1 trainer package is first imported (only the process that runs the trainer pays for
importing it). Loaded loudly (`ta_opd_verl.plugin_loading`): a failure stops the run's checks.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ta_opd_verl.plugin_loading import load_loudly
from ta_opd_verl.verl_fence.worker import register_loss_mode

LOSS_MODE = "ta_opd"
# verl's v1 trainer package, whose __init__ defines the trainer registry, and our module registering in it.
VERL_TRAINER_PACKAGE = "verl.trainer.ppo.v1"
TRAINER_MODULE = "ta_opd_verl.trainer"


def ta_opd_needs_its_trainer(config, distillation_config, model_output, data):
    """verl's own dispatch of ``loss_mode=ta_opd``: reached only when TA-OPD's trainer was not used (it
    replaces the actor's loss with `ta_opd_verl.loss.TAOPDLossFunction`)."""
    raise RuntimeError(
        f"distillation.distillation_loss.loss_mode={LOSS_MODE} runs only with TA-OPD's trainer: set "
        "trainer.v1.trainer_mode=ta_opd (conf/ta_opd_trainer.yaml does)."
    )


class _RegisterTrainerAfterImport(importlib.abc.MetaPathFinder):
    """Import TA-OPD's trainer module (which registers the ``ta_opd`` trainer) right after verl's v1 trainer
    package finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != VERL_TRAINER_PACKAGE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]
            importlib.import_module(TRAINER_MODULE)

        spec.loader.exec_module = exec_module
        return spec


def _register() -> list[str]:
    # use_topk=True makes verl ask the teacher servers for top-K entries.
    register_loss_mode(LOSS_MODE, ta_opd_needs_its_trainer, use_topk=True)
    if VERL_TRAINER_PACKAGE in sys.modules:
        importlib.import_module(TRAINER_MODULE)
    else:
        sys.meta_path.insert(0, _RegisterTrainerAfterImport())
    return [f"distillation loss '{LOSS_MODE}'", "trainer 'ta_opd'"]


load_loudly("TA-OPD", _register)
