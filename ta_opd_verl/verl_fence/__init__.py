"""The one fence around verl's internals: every place where TA-OPD's plugin leans on verl code that verl
does not promise to keep (a private method we copy or override, a key, a tag, a module global, a key
format) goes through a module of this package, one per verl subsystem:

- `verl_fence.config`: the config classes, and the ``distillation.enabled`` switch for verl's teacher.
- `verl_fence.trainer`: the v1 trainer on the driver (the copied parts of ``_compute_old_log_prob`` and
  ``_update_actor`` with their ``extra_info`` keys, the sync-mode literal).
- `verl_fence.transfer_queue`: TransferQueue batches (field access, the key format, ``is_padding`` tags).
- `verl_fence.worker`: the actor worker and its FSDP engine (the logits-processor and loss-callable
  contract, non-tensor flags, padding, Ulysses slicing, the distillation-loss registry, verl's k1 and
  policy losses, the FSDP2 wrapping of a forward-only model).
- `verl_fence.rollout`: the vLLM teacher server (the replica registry, the prompt-log-prob extraction).
- `verl_fence.agent_loop`: the agent loop's teacher request (what a teacher server is sent per sample).

Written against verl 0.9.1: importing this package checks the installed version and refuses any other,
naming what to pin. `FINGERPRINTS` holds a hash of the source of every verl function whose code we copy
or whose behaviour we rely on; ``tests/verl/test_verl_fence.py`` recomputes them, so a verl upgrade fails
``make test`` there, not silently in training. ``python -m ta_opd_verl.verl_fence`` prints the current
hashes (after re-reading each function against what the fence module that names it assumes).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect

VERL_VERSION = "0.9.1"


class VerlVersionError(RuntimeError):
    """The installed verl is not the version the fence was written against."""


def check_verl_version() -> None:
    installed = importlib.metadata.version("verl")
    if installed != VERL_VERSION:
        raise VerlVersionError(
            f"ta_opd_verl needs verl=={VERL_VERSION} (installed: verl {installed}); it overrides verl "
            "internals that change between versions (ta_opd_verl/verl_fence/). "
            f"Pin it: pip install verl=={VERL_VERSION}"
        )


check_verl_version()

# "module:qualified name" -> the first 16 hex digits of the SHA-256 of its source (verl 0.9.1). Each entry
# is named, with what we take from it, in the fence module that leans on it.
FINGERPRINTS: dict[str, str] = {}


# Every module that records fingerprints (the CPU runtime's patches of verl are fingerprinted here too).
# `verl_fence.trainer` through TA-OPD's trainer: its first import of verl's v1 trainer package makes the
# plugin import TA-OPD's trainer, which must not find the fence module half-imported.
FINGERPRINTED_MODULES = (
    "ta_opd_verl.trainer",
    "ta_opd_verl.verl_fence.agent_loop",
    "ta_opd_verl.verl_fence.config",
    "ta_opd_verl.verl_fence.rollout",
    "ta_opd_verl.verl_fence.transfer_queue",
    "ta_opd_verl.verl_fence.worker",
    "ta_opd_verl.cpu.platform",
    "ta_opd_verl.cpu.replay_buffer",
)


def fingerprinted_modules() -> None:
    """Import every module of `FINGERPRINTED_MODULES`, so that `FINGERPRINTS` is complete."""
    for module in FINGERPRINTED_MODULES:
        importlib.import_module(module)


def locate(name: str):
    """The object for ``module:qualified.name``."""
    module_name, _, qualified = name.partition(":")
    target = importlib.import_module(module_name)
    for part in qualified.split("."):
        target = getattr(target, part)
    return target


def source_fingerprint(name: str) -> str:
    return hashlib.sha256(inspect.getsource(locate(name)).encode()).hexdigest()[:16]


# verl's plugin loading (on the first ``import verl``) imports fence modules: importing verl here, once the
# names above exist, runs it before any fence module can be half-imported by its own first verl import.
import verl  # noqa: E402, F401
