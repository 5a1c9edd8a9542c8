"""Loud loading of this package's ``verl.plugins`` entry points (the plugin, the CPU runtime).

verl imports every ``verl.plugins`` entry point on ``import verl`` and swallows their import errors at
DEBUG level (``verl/__init__.py``, verl 0.9.1), so a broken plugin would be silent. `load_loudly` logs a
failure at ERROR level and keeps it in ``LOAD_ERRORS``; `require_plugin` (called by TA-OPD's checks) raises
it. No imports beyond the standard library: an entry point can import this module while any other module of
the package is half-imported.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

logger = logging.getLogger("ta_opd_verl")

# What loaded, and what failed to (part -> traceback), in this process.
LOADED: list[str] = []
LOAD_ERRORS: dict[str, str] = {}


def load_loudly(part: str, load: Callable[[], list[str]]) -> None:
    """Run ``load`` (returns what it set up); log and keep its failure instead of letting verl hide it."""
    try:
        loaded = load()
    except Exception:  # noqa: BLE001 - kept and re-raised by require_plugin(); verl would hide it otherwise
        LOAD_ERRORS[part] = traceback.format_exc()
        logger.error("ta_opd_verl: %s failed to load:\n%s", part, LOAD_ERRORS[part])
    else:
        LOADED.extend(loaded)
        if loaded:
            logger.info("ta_opd_verl: %s loaded: %s", part, "; ".join(loaded))


def require_plugin() -> None:
    """Raise if any part of the plugin failed to load in this process (verl itself would hide the error)."""
    if LOAD_ERRORS:
        details = "\n".join(f"{part}:\n{error}" for part, error in LOAD_ERRORS.items())
        raise RuntimeError(f"ta_opd_verl: the verl plugin failed to load in this process:\n{details}")
