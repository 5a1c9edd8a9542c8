"""Entry point of the ``verl.plugins`` group: verl imports it on every ``import verl``, in the driver
and in every Ray worker (``verl/__init__.py``, verl 0.9.1).

What it does there: activates the CPU runtime when ``VERL_PLATFORM=cpu``; registers ``loss_mode=ta_opd`` in
verl's distillation-loss registry (cheap, needed wherever verl builds a ``DistillationConfig``); and
registers ``trainer.v1.trainer_mode=ta_opd`` lazily, when verl's v1 trainer package is first imported (only
the process that runs the trainer pays for importing it).

verl swallows plugin import errors at DEBUG level, so a broken plugin would be silent. This module logs
failures at ERROR level, keeps them in ``LOAD_ERROR``, and ``require_plugin`` (called by TA-OPD's checks
and trainer) raises them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import traceback

logger = logging.getLogger("ta_opd_verl")

LOADED: list[str] = []
LOAD_ERROR: str | None = None

# verl's v1 trainer package; its __init__ defines the trainer registry (verl 0.9.1).
VERL_TRAINER_PACKAGE = "verl.trainer.ppo.v1"


class _RegisterTrainerAfterImport(importlib.abc.MetaPathFinder):
    """Import ``ta_opd_verl.trainer`` (which registers the ``ta_opd`` trainer) right after verl's v1 trainer
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
            importlib.import_module("ta_opd_verl.trainer")

        spec.loader.exec_module = exec_module
        return spec


def _load() -> None:
    from ta_opd_verl import cpu
    from ta_opd_verl.loss import register_ta_opd_loss

    LOADED.extend(cpu.activate())
    register_ta_opd_loss()
    LOADED.append("distillation loss 'ta_opd'")
    if VERL_TRAINER_PACKAGE in sys.modules:
        importlib.import_module("ta_opd_verl.trainer")
    else:
        sys.meta_path.insert(0, _RegisterTrainerAfterImport())
    LOADED.append("trainer 'ta_opd'")


try:
    _load()
except Exception:  # noqa: BLE001 - kept and re-raised by require_plugin(); verl would hide it otherwise
    LOAD_ERROR = traceback.format_exc()
    logger.error("ta_opd_verl: plugin failed to load:\n%s", LOAD_ERROR)
else:
    logger.info("ta_opd_verl: plugin loaded: %s", "; ".join(LOADED))


def require_plugin() -> None:
    """Raise if the plugin failed to load in this process (verl itself would hide the error)."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"ta_opd_verl: the verl plugin failed to load in this process:\n{LOAD_ERROR}")
